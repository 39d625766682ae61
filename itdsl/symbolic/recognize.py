"""Which strategy computes an operator: the engine the strategies' rules run on.

The rules themselves live with their strategies (`symbolic/strategies/<name>.py`), in the
registry's order (`RULES`). `recognize(op)` tries them in order; the first that matches
every integral of the output (a normalised ratio `∫ K·v / ∫ K` counts as one) gives the
`Verdict`, with the reason each earlier rule did not match. When in doubt, dense.

What "K" is: the pair-dependent factors of the integrand and, for a plain integral,
its factors of the output point alone too (`t·g(t − s)` is not called a convolution:
the forms are about K(x, y) as a whole). In a ratio those x-only factors
cancel; the factors of y alone are the values v(y).

`Analysis` holds what the rules share: the sympy translation, the items (integrals), the
checks (one grid, no fields, a causal bracket), separation and numeric guards.

Decisions (see also each strategy's docstring):
- An exponential whose rate is provably negative (`exp(+a·(t − s))·[s <= t]`) is not
  a recurrence: its state grows without bound, and the chunked form of a scan multiplies
  exp(a·t) by exp(−a·s), which overflows. It stays a causal convolution. A rate of
  unknown sign (a plain param `a` in `exp(−a·(t − s))`) is assumed to be a decay and
  reported as `decay: "assumed"`; the scan is built from the ratio exp(−a·h) anyway.
- `[s <= t]` alone is a recurrence with one state of rate 0 (a running sum).
- A strict `[s < t]` is not the recurrence form (the diagonal is excluded); it stays a
  causal convolution.
- The low-rank split never factors an exponential of a pair, exp(a·t − a·s) =
  exp(a·t)·exp(−a·s): on long axes the two factors overflow. Such kernels are
  convolutions when translation invariant, else dense.
- Montecarlo and Gauss quadratures do not put the integral's points on the output's
  grid, so neither convolution nor recurrence applies to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from ..frontend import ir
from ..frontend.ast import DomainKind, ParamKind
from ..frontend.printer import format_ir_expr
from . import structure as st
from .plan import Verdict
from .strategies import IR_RULES, PLAN_RULES, RULES  # noqa: F401  (RULES: every rule, in order)
from .strategies.entry import Match, Miss, short
from .tosympy import BRACKETS, Eq0, Lt0, TooBig, Translator, expand, generic_rank, split_trig

MAX_RANK_TERMS = 512  # separated functions on either side: beyond this, not low rank


# ---- the analysis of one operator ------------------------------------------------------------


@dataclass
class Item:
    """One unit (plain integral or normalised ratio) with what the rules look at."""

    unit: st.Unit
    x: str
    y: str
    xdom: ir.Domain
    ydom: ir.Domain
    kernel: tuple[ir.Expr, ...]  # the factors of K
    cache: dict = field(default_factory=dict)

    @property
    def brackets(self) -> list[ir.Expr]:
        return [f for f in self.kernel if st.is_bracket(f)]

    @property
    def smooth(self) -> list[ir.Expr]:
        return [f for f in self.kernel if not st.is_bracket(f)]

    @property
    def scalar_coords(self) -> bool:
        return self.xdom.kind is not DomainKind.POINTS and self.ydom.kind is not DomainKind.POINTS


@dataclass(frozen=True)
class _Interval:
    lo: float = -math.inf
    lo_closed: bool = False
    hi: float = math.inf
    hi_closed: bool = False

    def __and__(self, o: _Interval) -> _Interval:
        lo, lc = max((self.lo, not self.lo_closed), (o.lo, not o.lo_closed))
        hi, hc = min((self.hi, self.hi_closed), (o.hi, o.hi_closed))
        return _Interval(lo, not lc, hi, hc)

    def on_integers(self) -> _Interval:
        lo = self.lo if math.isinf(self.lo) else (
            math.ceil(self.lo) if self.lo_closed else math.floor(self.lo) + 1)
        hi = self.hi if math.isinf(self.hi) else (
            math.floor(self.hi) if self.hi_closed else math.ceil(self.hi) - 1)
        return _Interval(lo, not math.isinf(lo), hi, not math.isinf(hi))

    def text(self) -> str:
        lo = "-∞" if math.isinf(self.lo) else f"{self.lo:g}"
        hi = "∞" if math.isinf(self.hi) else f"{self.hi:g}"
        return f"{'[' if self.lo_closed else '('}{lo}, {hi}{']' if self.hi_closed else ')'}"


CAUSAL_SUPPORT = _Interval(0.0, True, math.inf, False)


class Analysis:
    def __init__(self, op: ir.Operator):
        self.op = op
        self.tr = Translator(op)
        self.table = self.tr.table
        self.rng_seed = 20240
        self.d = self.table.fresh("d")  # the lag t − s
        out = op.output
        units = st.integral_units(out.body)
        self.items: list[Item] = []
        for u in units:
            kernel = u.split.pair if u.normalised else u.split.pair + u.split.x_only
            self.items.append(Item(u, out.var, u.var, op.domain(out.domain),
                                    op.domain(u.domain), kernel))

    # -- sympy forms --
    def product(self, factors) -> sp.Expr:
        return sp.Mul(*(self.tr.expr(f) for f in factors))

    def lag(self, item: Item) -> tuple[sp.Symbol, sp.Symbol, sp.Symbol]:
        """(t, s, d): the coordinates of x and y, and the lag d = t − s."""
        return self.tr.coord(item.x), self.tr.coord(item.y), self.d

    def shift(self, item: Item, e: sp.Expr) -> tuple[sp.Expr, str] | None:
        """g with K(t, s) = g(t − s), and how it was found; None if K is not translation
        invariant (substitute s = t − d, expand; else check ∂K/∂t + ∂K/∂s = 0)."""
        t, s, d = self.lag(item)
        g = e.xreplace({s: t - d})
        if t not in g.free_symbols:
            return g, "K(t, t−d) is free of t"
        g = expand(g)
        if t not in g.free_symbols:
            return g, "K(t, t−d) is free of t once expanded"
        if expand(sp.diff(e, t) + sp.diff(e, s)) == 0:
            return e.xreplace({t: d, s: sp.S.Zero}), "∂K/∂t + ∂K/∂s = 0"
        return None

    def support(self, item: Item, brackets) -> _Interval | None:
        """An interval of t − s outside which the brackets vanish (None: no bound found)."""
        t, s, d = self.lag(item)
        integer = item.xdom.kind is DomainKind.INDEX and item.ydom.kind is DomainKind.INDEX
        out = None
        for b in brackets:
            g = self.tr.expr(b).xreplace({s: t - d})
            if t in g.free_symbols:
                continue
            part = _Interval()
            known = False
            for f in sp.Mul.make_args(g):
                iv = _bracket_interval(f, d)
                if iv is not None:
                    part, known = part & iv, True
            if known:
                out = part if out is None else out & part
        if out is not None and integer:
            out = out.on_integers()
        return out

    def edges(self, item: Item, brackets) -> tuple[float, ...] | None:
        """Every t − s at which one of the brackets may change its value (the finite ends of
        the intervals each holds on), or None if a bracket is not of a form understood here."""
        t, s, d = self.lag(item)
        out: set[float] = set()
        for b in brackets:
            g = self.tr.expr(b).xreplace({s: t - d})
            if t in g.free_symbols:
                return None
            for f in sp.Mul.make_args(g):
                iv = _bracket_interval(f, d)
                if iv is None:
                    if f.is_number:
                        continue
                    return None
                out.update(float(e) for e in (iv.lo, iv.hi) if not math.isinf(e))
        return tuple(sorted(out))

    def separation(self, item: Item, factors) -> Match | Miss:
        """Split K = Σ c_ij φ_i(x) ψ_j(y) and read the rank of the coefficient matrix."""
        key = ("sep", tuple(id(f) for f in factors))
        if key not in item.cache:
            item.cache[key] = _separate(self, item, factors)
        return item.cache[key]

    # -- checks the rules share --
    @staticmethod
    def numeric_rank(mat: np.ndarray, rtol: float = 1e-9) -> int:
        sv = np.linalg.svd(mat, compute_uv=False)
        return int(np.sum(sv > rtol * sv[0])) if sv.size and sv[0] > 0 else 0

    def sampled_rank(self, item: Item, factors, n: int) -> int | None:
        """The numeric rank of K sampled at n × n random points (max over channels)."""
        rng = np.random.default_rng(self.rng_seed)
        xp, yp = self.points(item.xdom, n, rng), self.points(item.ydom, n, rng)
        grid = np.arange(n)
        env = self.env(item, xp, yp, rng, np.repeat(grid, n), np.tile(grid, n))
        vals = self.kernel_values(item, env, n * n, factors)
        if not np.all(np.isfinite(vals)):
            return None
        return max(self.numeric_rank(vals[:, w].reshape(n, n)) for w in range(vals.shape[1]))

    @staticmethod
    def one_grid(item: Item, what: str) -> Miss | None:
        """x and y on one index or grid domain, integrated on its own points."""
        if item.xdom.name != item.ydom.name:
            return Miss(f"{item.x} and {item.y} live on different domains {item.xdom.name} and "
                        f"{item.ydom.name}; {what} needs one domain")
        if not item.xdom.kind.entry.regular:
            return Miss(f"{item.xdom.name} is points({item.xdom.dim}); {what} needs an index or "
                        "grid domain")
        rule = item.unit.integral.quad.rule
        if not rule.entry.on_domain_points:
            return Miss(f"the `{rule.value}` quadrature does not integrate over the points of "
                        f"{item.xdom.name}")
        return None

    def no_fields(self, item: Item) -> Miss | None:
        found = self.kernel_fields(item)
        if found:
            names = ", ".join(f"`{format_ir_expr(f)}`" for f in found)
            return Miss(f"K reads the sampled field{'s' if len(found) > 1 else ''} {names}")
        return None

    def causal_bracket(self, item: Item) -> Miss | None:
        """K has exactly one bracket, and it means s <= t."""
        bs = item.brackets
        if not bs:
            return Miss(f"K has no causal bracket [{item.y} <= {item.x}]")
        if len(bs) > 1:
            shown = " ".join(f"`{format_ir_expr(b)}`" for b in bs)
            return Miss(f"K has several brackets {shown}; the recurrence form has one, "
                        f"[{item.y} <= {item.x}]")
        iv = self.support(item, bs)
        if iv != CAUSAL_SUPPORT:
            where = "an unrecognised set" if iv is None else iv.text()
            return Miss(f"the bracket `{format_ir_expr(bs[0])}` holds for t − s in {where}, "
                        f"not [0, ∞) as [{item.y} <= {item.x}]")
        return None

    def per_item(self, check) -> tuple[list[Match], Miss | None]:
        if not self.items:
            return [], Miss("the output has no integral")
        matches = []
        for i, item in enumerate(self.items):
            m = check(self, item)
            if isinstance(m, Miss):
                prefix = "" if len(self.items) == 1 else f"integral {i + 1}: "
                return [], Miss(prefix + m.why)
            matches.append(m)
        return matches, None

    @staticmethod
    def joined(matches: list[Match]) -> str:
        if len(matches) == 1:
            return matches[0].reason
        return "; ".join(f"integral {i + 1}: {m.reason}" for i, m in enumerate(matches))

    # -- numeric guards --
    def env(self, item: Item, xp: np.ndarray, yp: np.ndarray, rng,
            ix: np.ndarray | None = None, iy: np.ndarray | None = None) -> st.Env:
        """Values at the pairs (xp[ix[k]], yp[iy[k]]) (point coordinates [n, D or 1]; no index
        arrays: the k-th rows), with random fields at each point and random positive params."""
        ix = np.arange(len(xp)) if ix is None else ix
        iy = np.arange(len(yp)) if iy is None else iy
        env = st.Env(coords={item.x: xp[ix], item.y: yp[iy]})
        for p in self.op.params:
            if p.kind is ParamKind.REAL:
                env.params[p.name] = rng.uniform(0.3, 1.2, size=(1, p.width or 1))
        for f in self.kernel_fields(item):
            pts, idx = (xp, ix) if f.var == item.x else (yp, iy)
            env.fields[(f.field, f.var)] = rng.normal(size=(len(pts), f.width or 1))[idx]
        return env

    def kernel_fields(self, item: Item) -> list[ir.FieldAt]:
        out: dict[ir.FieldAt, None] = {}
        for f in item.kernel:
            for n in st.fields_in(f):
                out.setdefault(n, None)
        return list(out)

    def kernel_values(self, item: Item, env: st.Env, n: int, factors=None) -> np.ndarray:
        vals = np.ones((n, 1))
        with np.errstate(all="ignore"):
            for f in item.kernel if factors is None else factors:
                vals = vals * st.evaluate(f, env, n)
        return vals

    def points(self, dom: ir.Domain, n: int, rng) -> np.ndarray:
        return dom.kind.entry.sample(dom, n, rng)


def _bracket_interval(b: sp.Expr, d: sp.Symbol) -> _Interval | None:
    """The set of d where the bracket `b` (Le0/Lt0/Eq0 of c·d + e or c·|d| + e, numbers c, e)
    holds, as an interval enclosing it; None for any other form."""
    if not isinstance(b, BRACKETS):
        return None
    lin = absval = e0 = sp.S.Zero
    for term in sp.Add.make_args(sp.expand(b.args[0])):
        c, rest = term.as_independent(d, as_Add=False)
        if not (c.is_number and c.is_comparable):
            return None
        if rest == 1:
            e0 += c
        elif rest == d:
            lin += c
        elif rest == sp.Abs(d):
            absval += c
        else:
            return None
    lin, absval, e0 = float(lin), float(absval), float(e0)
    closed = not isinstance(b, Lt0)
    if lin and not absval:
        bound = -e0 / lin
        if isinstance(b, Eq0):
            return _Interval(bound, True, bound, True)
        return _Interval(hi=bound, hi_closed=closed) if lin > 0 else _Interval(bound, closed)
    if absval > 0 and not lin:
        w = -e0 / absval
        return _Interval(-w, closed, w, closed)
    return None


# ---- low rank: separation and rank -----------------------------------------------------------


def _separate(A: Analysis, item: Item, factors) -> Match | Miss:
    """K = Σ c_ij φ_i(x)·ψ_j(y): expand (sin/cos of x-part + y-part split first), split each
    term into params × x-part × y-part, and take the generic rank of [c_ij]. That rank bounds
    the true one (the φ_i may be dependent functions, as cos², sin² and 1 are)."""
    for b in factors:
        if st.is_bracket(b) and {item.x, item.y} <= ir.free_vars(b):
            return Miss(f"the bracket `{format_ir_expr(b)}` couples the two points: a mask has "
                        "no finite rank")

    def side(term: sp.Expr) -> str:
        dep = A.table.deps(term)
        return "const" if not dep else "x" if dep == {item.x} else "y" if dep == {item.y} else ""

    e = expand(split_trig(A.product(factors), side), power_exp=False)
    xsyms = set(A.table.symbols_of(item.x))
    ysyms = set(A.table.symbols_of(item.y))
    rows: dict[sp.Expr, int] = {}
    cols: dict[sp.Expr, int] = {}
    entries: dict[tuple[int, int], sp.Expr] = {}
    terms = sp.Add.make_args(e)
    for term in terms:
        coef, rest = term.as_independent(*(xsyms | ysyms), as_Add=False)
        phi, psi = [], []
        for f in sp.Mul.make_args(rest):
            dep = A.table.deps(f)
            if dep == {item.x}:
                phi.append(f)
            elif dep == {item.y}:
                psi.append(f)
            elif not dep:
                coef *= f
            else:
                return Miss(f"`{short(f)}` depends on both points and does not separate "
                            f"(K expanded has {len(terms)} terms)")
        i = rows.setdefault(sp.Mul(*phi), len(rows))
        j = cols.setdefault(sp.Mul(*psi), len(cols))
        entries[(i, j)] = entries.get((i, j), sp.S.Zero) + coef
        if len(rows) > MAX_RANK_TERMS or len(cols) > MAX_RANK_TERMS:
            return Miss(f"K separates into more than {MAX_RANK_TERMS} functions of each point: "
                        "no useful finite rank")
    entries = {ij: v for ij, c in entries.items() if (v := sp.expand(c)) != 0}
    rank = generic_rank(entries, len(rows), len(cols))
    return Match(f"K expands to {len(terms)} terms in {len(rows)} functions of {item.x} and "
                 f"{len(cols)} of {item.y}; coefficient matrix rank {rank}", {"rank": rank})


def structured(op: ir.Operator) -> str | None:
    """Why `op` is outside the one-variable forms the rules read (an output or an integral
    over several variables, a domain of several axes, a field read at a computed point, a
    spline per point of a stencil); None if it is not."""
    if len(op.output.vars) > 1:
        return f"the output is a field on {' * '.join(op.output.domains)}"
    for n in ir.walk(op.output.body):
        if isinstance(n, ir.Integral) and len(n.vars) > 1:
            return f"an integral runs over {len(n.vars)} variables"
        if isinstance(n, ir.FieldAt) and not n.plain:
            return f"the field `{n.field}` is read at a computed point"
        if isinstance(n, ir.SplineCall) and n.at is not None:
            return f"the spline `{n.param}` is one per point of a stencil"
    for d in op.domains:
        if len(d.axes) > 1:
            return f"the domain `{d.name}` has {len(d.axes)} axes"
    for i in op.inputs:
        if len(i.domains) > 1:
            return f"the input `{i.name}` is a field on {' * '.join(i.domains)}"
    return None


def recognize(op: ir.Operator) -> Verdict:
    """The strategy of `op`: the first rule that matches, with the reasons the earlier ones
    did not. A program of one variable per side is read by the IR's rules (`IR_RULES`); a
    version-1 program (`structured`) by the rules that read its built Plan (`PLAN_RULES`:
    lattice convolutions), else the general path."""
    why = structured(op)
    if why is not None:
        return _recognize_structured(op, why)
    analysis = Analysis(op)
    rejected: list[tuple[str, str]] = []
    for rule in IR_RULES:
        try:
            m = rule.match(analysis)
        except TooBig as e:
            m = Miss(f"gave up: {e}")
        if isinstance(m, Match):
            return Verdict(strategy=rule.strategy, rule=rule.name, form=rule.form,
                           reason=m.reason, details=dict(m.details), rejected=tuple(rejected))
        rejected.append((rule.name, m.why))
    raise AssertionError("the last rule matches everything")


def _recognize_structured(op: ir.Operator, why: str) -> Verdict:
    from .strategies.lattice_conv import OnPlan
    on_plan = OnPlan(op)
    rejected: list[tuple[str, str]] = [("one-variable forms", why)]
    for rule in PLAN_RULES:
        m = rule.match(on_plan)
        if isinstance(m, Match):
            return Verdict(strategy=rule.strategy, rule=rule.name, form=rule.form,
                           reason=m.reason, details=dict(m.details), rejected=tuple(rejected))
        rejected.append((rule.name, m.why))
    return Verdict(strategy="dense", rule="general", form="any K(x,y)",
                   reason=f"{why}: the general path", details={}, rejected=tuple(rejected))
