"""Which strategy computes an operator: an ordered list of recognisers (`RULES`).

`recognize(op)` tries the rules in order; the first that matches every integral of
the output (a normalised ratio `∫ K·v / ∫ K` counts as one) gives the `Verdict`, with
the reason each earlier rule did not match. When in doubt, dense.

What "K" is: the pair-dependent factors of the integrand and, for a plain integral,
its factors of the output point alone too (`t·g(t − s)` is not called a convolution:
the forms below are about K(x, y) as a whole). In a ratio those x-only factors
cancel; the factors of y alone are the values v(y).

Decisions (see also each rule's docstring):
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
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from ..frontend import ir
from ..frontend.ast import DomainKind, ParamKind
from ..frontend.printer import format_ir_expr
from . import structure as st
from .plan import Verdict
from .tosympy import BRACKETS, Eq0, Lt0, TooBig, Translator, expand, generic_rank, split_trig

STRATEGIES = ("attention", "recurrence", "convolution", "lowrank", "matmul", "dense")
MAX_RANK_TERMS = 512  # separated functions on either side: beyond this, not low rank
MAX_EVIDENCE_RANK = 48  # sample a matrix to check the symbolic rank up to this rank


@dataclass(frozen=True)
class Match:
    reason: str
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Miss:
    why: str


@dataclass(frozen=True)
class Rule:
    """A recogniser: `match` returns a `Match`, or a `Miss` saying why not."""

    name: str
    strategy: str
    form: str
    match: Callable[[_Analysis], Match | Miss]


# ---- the analysis of one operator ------------------------------------------------------------


@dataclass
class _Item:
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


class _Analysis:
    def __init__(self, op: ir.Operator):
        self.op = op
        self.tr = Translator(op)
        self.table = self.tr.table
        self.rng_seed = 20240
        self.d = self.table.fresh("d")  # the lag t − s
        out = op.output
        units = st.integral_units(out.body)
        self.items: list[_Item] = []
        for u in units:
            kernel = u.split.pair if u.normalised else u.split.pair + u.split.x_only
            self.items.append(_Item(u, out.var, u.var, op.domain(out.domain),
                                    op.domain(u.domain), kernel))

    # -- sympy forms --
    def product(self, factors) -> sp.Expr:
        return sp.Mul(*(self.tr.expr(f) for f in factors))

    def lag(self, item: _Item) -> tuple[sp.Symbol, sp.Symbol, sp.Symbol]:
        """(t, s, d): the coordinates of x and y, and the lag d = t − s."""
        return self.tr.coord(item.x), self.tr.coord(item.y), self.d

    def shift(self, item: _Item, e: sp.Expr) -> tuple[sp.Expr, str] | None:
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

    def support(self, item: _Item, brackets) -> _Interval | None:
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

    def separation(self, item: _Item, factors) -> Match | Miss:
        """Split K = Σ c_ij φ_i(x) ψ_j(y) and read the rank of the coefficient matrix."""
        key = ("sep", tuple(id(f) for f in factors))
        if key not in item.cache:
            item.cache[key] = _separate(self, item, factors)
        return item.cache[key]

    # -- numeric guards --
    def env(self, item: _Item, xp: np.ndarray, yp: np.ndarray, rng,
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

    def kernel_fields(self, item: _Item) -> list[ir.FieldAt]:
        out: dict[ir.FieldAt, None] = {}
        for f in item.kernel:
            for n in st.fields_in(f):
                out.setdefault(n, None)
        return list(out)

    def kernel_values(self, item: _Item, env: st.Env, n: int, factors=None) -> np.ndarray:
        vals = np.ones((n, 1))
        with np.errstate(all="ignore"):
            for f in item.kernel if factors is None else factors:
                vals = vals * st.evaluate(f, env, n)
        return vals

    def points(self, dom: ir.Domain, n: int, rng) -> np.ndarray:
        if dom.kind is DomainKind.INDEX:
            return rng.permutation(4 * n + 16)[:n, None].astype(float)
        if dom.kind is DomainKind.GRID:
            return rng.uniform(dom.lo, dom.hi, size=(n, 1))
        return rng.normal(size=(n, dom.dim))


def _short(e, limit: int = 160) -> str:
    """`e` printed, cut to `limit` characters."""
    text = str(e)
    return text if len(text) <= limit else text[:limit - 1] + "…"


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


def _separate(A: _Analysis, item: _Item, factors) -> Match | Miss:
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
                return Miss(f"`{_short(f)}` depends on both points and does not separate "
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


def _numeric_rank(mat: np.ndarray, rtol: float = 1e-9) -> int:
    sv = np.linalg.svd(mat, compute_uv=False)
    return int(np.sum(sv > rtol * sv[0])) if sv.size and sv[0] > 0 else 0


def _sampled_rank(A: _Analysis, item: _Item, factors, n: int) -> int | None:
    """The numeric rank of K sampled at n × n random points (max over channels)."""
    rng = np.random.default_rng(A.rng_seed)
    xp, yp = A.points(item.xdom, n, rng), A.points(item.ydom, n, rng)
    grid = np.arange(n)
    env = A.env(item, xp, yp, rng, np.repeat(grid, n), np.tile(grid, n))
    vals = A.kernel_values(item, env, n * n, factors)
    if not np.all(np.isfinite(vals)):
        return None
    return max(_numeric_rank(vals[:, w].reshape(n, n)) for w in range(vals.shape[1]))


# ---- shared checks ---------------------------------------------------------------------------


def _one_grid(item: _Item, what: str) -> Miss | None:
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


def _no_fields(item: _Item, A: _Analysis) -> Miss | None:
    found = A.kernel_fields(item)
    if found:
        names = ", ".join(f"`{format_ir_expr(f)}`" for f in found)
        return Miss(f"K reads the sampled field{'s' if len(found) > 1 else ''} {names}")
    return None


def _causal_bracket(A: _Analysis, item: _Item) -> Miss | None:
    """K has exactly one bracket, and it means s <= t."""
    bs = item.brackets
    if not bs:
        return Miss(f"K has no causal bracket [{item.y} <= {item.x}]")
    if len(bs) > 1:
        shown = " ".join(f"`{format_ir_expr(b)}`" for b in bs)
        return Miss(f"K has several brackets {shown}; the recurrence form has one, "
                    f"[{item.y} <= {item.x}]")
    iv = A.support(item, bs)
    if iv != CAUSAL_SUPPORT:
        where = "an unrecognised set" if iv is None else iv.text()
        return Miss(f"the bracket `{format_ir_expr(bs[0])}` holds for t − s in {where}, "
                    f"not [0, ∞) as [{item.y} <= {item.x}]")
    return None


def _per_item(A: _Analysis, check) -> tuple[list[Match], Miss | None]:
    if not A.items:
        return [], Miss("the output has no integral")
    matches = []
    for i, item in enumerate(A.items):
        m = check(A, item)
        if isinstance(m, Miss):
            prefix = "" if len(A.items) == 1 else f"integral {i + 1}: "
            return [], Miss(prefix + m.why)
        matches.append(m)
    return matches, None


def _joined(matches: list[Match]) -> str:
    if len(matches) == 1:
        return matches[0].reason
    return "; ".join(f"integral {i + 1}: {m.reason}" for i, m in enumerate(matches))


# ---- the rules -------------------------------------------------------------------------------


def _attention_item(A: _Analysis, item: _Item) -> Match | Miss:
    if not item.unit.normalised:
        return Miss("a plain integral, not a normalised ratio ∫K·v / ∫K")
    smooth = item.smooth
    if not smooth:
        return Miss("K has no exponential factor")
    for f in smooth:
        if not (isinstance(f, ir.Op) and f.fn is ir.Fn.EXP):
            return Miss(f"the kernel factor `{format_ir_expr(f)}` is not an exponential")
    score = " + ".join(format_ir_expr(f.args[0]) for f in smooth)
    masks = item.brackets
    causal = False
    if masks and item.scalar_coords:
        iv = A.support(item, masks)
        causal = iv is not None and iv.lo >= 0
    mask = " * ".join(format_ir_expr(b) for b in masks) or None
    why = f"K = exp({score})" + (f" masked by {mask}" if mask else "")
    if causal:
        why += f" (causal: the mask keeps {item.y} <= {item.x})"
    return Match(why + "; the ratio is a softmax", {"causal": causal, "score": score,
                                                     "mask": mask})


def match_attention(A: _Analysis) -> Match | Miss:
    """out(x) = ∫ exp(s(x,y))·[mask]·v(y) / ∫ exp(s(x,y))·[mask]  ->  attention"""
    ms, miss = _per_item(A, _attention_item)
    if miss is not None:
        return miss
    masks = [m.details["mask"] for m in ms if m.details["mask"]]
    return Match(_joined(ms), {"causal": all(m.details["causal"] for m in ms),
                               "score": " ; ".join(m.details["score"] for m in ms),
                               "mask": " ; ".join(masks) if masks else None})


def _exponential_item(A: _Analysis, item: _Item) -> Match | Miss:
    miss = _one_grid(item, "a recurrence") or _no_fields(item, A) or _causal_bracket(A, item)
    if miss is not None:
        return miss
    shifted = A.shift(item, A.product(item.smooth))
    if shifted is None:
        return Miss("K without its bracket is not a function of t − s")
    g, how = shifted
    d = A.d
    rates: dict[sp.Expr, sp.Expr] = {}
    for term in sp.Add.make_args(expand(g)):
        coef, dep = term.as_independent(d, as_Add=False)
        exponent = sp.S.Zero
        for f in sp.Mul.make_args(dep):
            if isinstance(f, sp.exp):
                exponent += f.args[0]
            elif f != 1:
                return Miss(f"g(d) = {_short(g)}: the factor `{_short(f, 60)}` is not an "
                            "exponential of d")
        c0, lin = sp.expand(exponent).as_independent(d, as_Add=True)
        rate = sp.expand(-lin / d)
        if d in rate.free_symbols:
            return Miss(f"g(d) = {_short(g)}: the exponent `{_short(exponent, 60)}` is not "
                        "linear in d")
        rates[rate] = rates.get(rate, sp.S.Zero) + coef * sp.exp(c0)
    rates = {r: c for r, c in rates.items() if sp.expand(c) != 0}
    if not rates:
        return Miss(f"g(d) = {_short(g)} vanishes")
    decay = "proven"
    for r in rates:
        if r.is_nonnegative:
            continue
        if r.is_negative or r.could_extract_minus_sign():
            return Miss(f"g(d) = {_short(g)} grows: the rate {r} is negative, and a scan of a "
                        "growing exponential overflows; it stays a causal convolution")
        decay = "assumed"
    n = len(rates)
    hankel = _hankel_rank(A, item, n)
    if hankel is not None and hankel > n:
        return Miss(f"g(d) = {_short(g)} looked like {n} exponentials, but a Hankel matrix of "
                    f"samples has rank {hankel}")
    shown = ", ".join(str(r) for r in rates)
    why = (f"{how}; g(d) = {_short(g)}: {n} exponential state{'s' if n > 1 else ''} with rate"
           f"{'s' if n > 1 else ''} {shown} (decay {decay})")
    if hankel is not None:
        why += f"; Hankel rank of samples {hankel}"
    return Match(why, {"kind": "exponential", "states": n,
                       "rates": tuple(str(r) for r in rates), "decay": decay})


def _hankel_rank(A: _Analysis, item: _Item, states: int) -> int | None:
    """The numeric rank of the Hankel matrix [g((i + j)·h)] of samples of K(t0 + d, t0)."""
    n = states + 2
    k = np.arange(2 * n - 1, dtype=float)[:, None]
    if item.xdom.kind is DomainKind.INDEX:
        t0, h = 2.0, 1.0
    else:
        t0, h = item.xdom.lo, (item.xdom.hi - item.xdom.lo) / (4 * n)
    rng = np.random.default_rng(A.rng_seed)
    env = A.env(item, t0 + k * h, np.full_like(k, t0), rng)
    vals = A.kernel_values(item, env, len(k))
    if not np.all(np.isfinite(vals)):
        return None
    idx = np.arange(n)[:, None] + np.arange(n)[None, :]
    return max(_numeric_rank(vals[idx, w]) for w in range(vals.shape[1]))


def match_exponential_recurrence(A: _Analysis) -> Match | Miss:
    """K(t,s) = g(t−s)·[s<=t],  g(d) = Σ_k c_k·exp(−a_k·d), a_k >= 0  ->  recurrence"""
    ms, miss = _per_item(A, _exponential_item)
    if miss is not None:
        return miss
    return Match(_joined(ms), {"kind": "exponential",
                               "states": sum(m.details["states"] for m in ms),
                               "rates": tuple(r for m in ms for r in m.details["rates"]),
                               "decay": "assumed" if any(m.details["decay"] == "assumed"
                                                         for m in ms) else "proven"})


def _causal_lowrank_item(A: _Analysis, item: _Item) -> Match | Miss:
    miss = _one_grid(item, "a recurrence") or _causal_bracket(A, item)
    if miss is not None:
        return miss
    sep = A.separation(item, item.smooth)
    if isinstance(sep, Miss):
        return sep
    return Match(f"K = (finite-rank kernel)·[{item.y} <= {item.x}]: {sep.reason}",
                 {"kind": "lowrank", "states": sep.details["rank"], "rates": ()})


def match_causal_lowrank(A: _Analysis) -> Match | Miss:
    """K(t,s) = Σ_{r<R} φ_r(t)·ψ_r(s)·[s<=t]  ->  recurrence with R states (causal linear
    attention)"""
    ms, miss = _per_item(A, _causal_lowrank_item)
    if miss is not None:
        return miss
    return Match(_joined(ms), {"kind": "lowrank",
                               "states": sum(m.details["states"] for m in ms), "rates": ()})


def _convolution_item(A: _Analysis, item: _Item) -> Match | Miss:
    miss = _one_grid(item, "a convolution") or _no_fields(item, A)
    if miss is not None:
        return miss
    if not item.unit.split.pair:
        return Miss("K does not depend on both points (it is rank 1, not a convolution)")
    shifted = A.shift(item, A.product(item.kernel))
    if shifted is None:
        return Miss("K(t, t−d) still depends on t after expanding, and ∂K/∂t + ∂K/∂s ≠ 0")
    g, how = shifted
    bad = _translation_guard(A, item)
    if bad:
        return Miss(f"{how} symbolically, but {bad}")
    iv = A.support(item, item.brackets)
    causal = iv is not None and iv.lo >= 0
    half = None
    if iv is not None and not (math.isinf(iv.lo) or math.isinf(iv.hi)):
        half = float(max(abs(iv.lo), abs(iv.hi)))
    why = f"{how}; g(d) = {_short(g)}"
    if iv is not None:
        why += f", supported on d = t − s in {iv.text()}"
    why += " (compact: direct)" if half is not None else " (global: FFT)"
    return Match(why, {"causal": causal, "half_width": half, "kernel": str(g)})


def _translation_guard(A: _Analysis, item: _Item) -> str | None:
    """Numerically, K(t + δ, s + δ) = K(t, s) at random points and params."""
    rng = np.random.default_rng(A.rng_seed)
    n = 12
    t, s = A.points(item.xdom, n, rng), A.points(item.xdom, n, rng)
    delta = A.points(item.xdom, n, rng) - A.points(item.xdom, n, rng)
    env = A.env(item, t, s, rng)
    a = A.kernel_values(item, env, n)
    env.coords = {item.x: t + delta, item.y: s + delta}  # (K reads no field here)
    b = A.kernel_values(item, env, n)
    if not np.allclose(a, b, rtol=1e-8, atol=1e-12, equal_nan=True):
        return "K(t + δ, s + δ) ≠ K(t, s) at random points"
    return None


def match_convolution(A: _Analysis) -> Match | Miss:
    """K(t,s) = g(t−s; params), t and s on one grid or index domain  ->  convolution"""
    ms, miss = _per_item(A, _convolution_item)
    if miss is not None:
        return miss
    halves = [m.details["half_width"] for m in ms]
    return Match(_joined(ms), {
        "causal": all(m.details["causal"] for m in ms),
        "half_width": None if None in halves else max(halves),
        "kernel": " ; ".join(m.details["kernel"] for m in ms)})


def _lowrank_item(A: _Analysis, item: _Item) -> Match | Miss:
    sep = A.separation(item, item.kernel)
    if isinstance(sep, Miss):
        return sep
    rank = sep.details["rank"]
    why = sep.reason
    if rank <= MAX_EVIDENCE_RANK:
        sampled = _sampled_rank(A, item, item.kernel, rank + 4)
        if sampled is not None and sampled > rank:
            return Miss(f"{why}, but K sampled at random points has numeric rank {sampled}")
        if sampled is not None:
            why += f"; sampled numeric rank {sampled} <= {rank}"
    return Match(why, {"rank": rank, "normalised": item.unit.normalised})


def match_lowrank(A: _Analysis) -> Match | Miss:
    """K(x,y) = Σ_{r<R} φ_r(x)·ψ_r(y), R finite  ->  lowrank (with a ratio: linear attention)"""
    ms, miss = _per_item(A, _lowrank_item)
    if miss is not None:
        return miss
    return Match(_joined(ms), {"rank": sum(m.details["rank"] for m in ms),
                               "normalised": all(m.details["normalised"] for m in ms)})


def _matmul_item(A: _Analysis, item: _Item) -> Match | Miss:
    for dom in (item.xdom, item.ydom):
        if dom.kind is not DomainKind.GRID:
            return Miss(f"{dom.name} is {dom.kind.value}, not a grid")
    miss = _no_fields(item, A)
    if miss is not None:
        return miss
    return Match(f"K reads no sampled field, and {item.xdom.name} × {item.ydom.name} are grids: "
                 "sample K once")


def match_matmul(A: _Analysis) -> Match | Miss:
    """K(u,v) = k(u, v; params), u and v on grids  ->  K sampled once, then a GEMM"""
    ms, miss = _per_item(A, _matmul_item)
    return miss or Match(_joined(ms), {})


def match_dense(A: _Analysis) -> Match:
    """any K(x,y)  ->  a tiled, fused pairwise reduction"""
    return Match("no special structure was recognised" if A.items else
                 "the output has no integral")


RULES: list[Rule] = [
    # out(x) = ∫ exp(s(x,y))·[mask]·v(y) / ∫ exp(s(x,y))·[mask]
    Rule("softmax-attention", "attention",
         "out(x) = ∫ exp(s(x,y))·[mask]·v(y) / ∫ exp(s(x,y))·[mask]", match_attention),
    # K(t,s) = g(t−s)·[s<=t], g = Σ_k c_k·exp(−a_k·(t−s))
    Rule("causal-exponential-decay", "recurrence",
         "K(t,s) = g(t−s)·[s<=t], g = Σ_k c_k·exp(−a_k·(t−s)), a_k >= 0",
         match_exponential_recurrence),
    # K(t,s) = Σ_r φ_r(t)·ψ_r(s)·[s<=t]
    Rule("causal-lowrank", "recurrence", "K(t,s) = Σ_{r<R} φ_r(t)·ψ_r(s)·[s<=t]",
         match_causal_lowrank),
    # K(t,s) = g(t−s)
    Rule("translation-invariant", "convolution",
         "K(t,s) = g(t−s; params), t and s on one grid/index domain", match_convolution),
    # K(x,y) = Σ_r φ_r(x)·ψ_r(y)
    Rule("finite-rank", "lowrank", "K(x,y) = Σ_{r<R} φ_r(x)·ψ_r(y)", match_lowrank),
    # K(u,v) = k(u,v; params) on grids
    Rule("coordinates-only", "matmul", "K(u,v) = k(u,v; params), u and v on grids",
         match_matmul),
    # anything
    Rule("general", "dense", "any K(x,y)", match_dense),
]


def recognize(op: ir.Operator) -> Verdict:
    """The strategy of `op`: the first rule of `RULES` that matches, with the reasons the
    earlier ones did not."""
    analysis = _Analysis(op)
    rejected: list[tuple[str, str]] = []
    for rule in RULES:
        try:
            m = rule.match(analysis)
        except TooBig as e:
            m = Miss(f"gave up: {e}")
        if isinstance(m, Match):
            return Verdict(strategy=rule.strategy, rule=rule.name, form=rule.form,
                           reason=m.reason, details=dict(m.details), rejected=tuple(rejected))
        rejected.append((rule.name, m.why))
    raise AssertionError("the last rule matches everything")
