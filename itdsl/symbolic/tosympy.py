"""Checked IR -> sympy, through an allow-list: never from text, never `sympify`.

Every IR node maps to one sympy constructor (an elementwise function's is its entry's in
`itdsl.functions`: a sympy function, or an `Opaque` one; the bracket classes below).
Vectors follow the language's rule "scalars broadcast, vectors act elementwise": a vector
expression is translated one channel at a time, either an explicit channel `k` (what a
reduction `dot`/`sum`/`norm`/`sqnorm`, a component `u[k]` or an mlp argument needs) or the
*generic* channel `c`, one expression standing for every channel of an elementwise kernel.
Names say which is which:

    t, x[0], x[c]            a point's coordinate (scalar, explicit or generic component)
    f(x), f[3](x), f[c](x)   a field at a point
    a, a[3], a[c]            a param
    phi[c](...), W(u, v)     mlp and spline calls: opaque functions of their arguments

Iverson brackets become `Le0(z)` = [z <= 0], `Lt0(z)` = [z < 0], `Eq0(z)` = [z == 0]
with `z = left - right`: a bracket is a factor of its own (not `Heaviside`, whose value
at 0 is 1/2 in sympy), `expand` and `xreplace` reach inside it, and it prints as
`[z <= 0]`. `and` is a product, `or` is `a + b - a*b`.

One `SymbolTable` per operator creates every symbol once (all `real=True`), and
records which point variable each depends on. Sizes are capped (`TooBig`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import sympy as sp
from mpmath.libmp import prec_to_dps

from ..frontend import ir
from ..functions import FUNCTIONS, Elementwise

MAX_NODES = 20_000  # a translated expression larger than this is not analysed
MAX_REDUCE_NODES = 5_000  # width x size of the terms of one reduction


class TooBig(Exception):
    """An expression grew past a size cap; the analysis gives up (-> dense)."""


# ---- brackets --------------------------------------------------------------------------------


class Iverson(sp.Function):
    """[z REL 0] as a 0/1 factor; decided when z is a number or its sign is known."""

    nargs = 1
    rel = "?"

    @staticmethod
    def holds(z) -> bool | None:
        raise NotImplementedError

    @classmethod
    def eval(cls, z):
        verdict = cls.holds(z)
        if verdict is not None:
            return sp.S.One if verdict else sp.S.Zero
        return None

    def _eval_is_real(self):
        return True

    def _eval_is_nonnegative(self):
        return True

    def _sympystr(self, printer) -> str:
        return f"[{printer.doprint(self.args[0])} {self.rel} 0]"


class Le0(Iverson):
    """[z <= 0]"""

    rel = "<="

    @staticmethod
    def holds(z):
        if z.is_nonpositive:
            return True
        if z.is_positive:
            return False
        return None


class Lt0(Iverson):
    """[z < 0]"""

    rel = "<"

    @staticmethod
    def holds(z):
        if z.is_negative:
            return True
        if z.is_nonnegative:
            return False
        return None


class Eq0(Iverson):
    """[z == 0]"""

    rel = "=="

    @staticmethod
    def holds(z):
        if z.is_zero:
            return True
        if z.is_zero is False:
            return False
        return None


BRACKETS = (Le0, Lt0, Eq0)


# ---- the elementwise functions of `itdsl.functions` -----------------------------------------


class Opaque(sp.Function):
    """An elementwise function kept unevaluated (its entry's `opaque`): numbers evaluate
    through its formula, its derivative and sign are the entry's."""

    entry: Elementwise

    def _eval_is_real(self):
        real = True
        for a in self.args:
            real = real and a.is_real
        return real

    def _eval_evalf(self, prec):
        # numbers only (so that brackets and signs of constants can be decided)
        formula = self.entry.opaque.formula
        if formula is not None and self.args[0].is_number:
            return formula(SYM, *self.args).evalf(prec_to_dps(prec))
        return None

    def fdiff(self, argindex=1):
        spec = self.entry.opaque
        if spec.derivative is not None:
            return spec.derivative(SYM, self, *self.args)
        if spec.formula is None:  # (min, max) sympy's unevaluated derivative
            return super().fdiff(argindex)
        d = sp.Dummy(real=True)
        return sp.diff(spec.formula(SYM, d), d).xreplace({d: self.args[0]})

    def _eval_is_positive(self):
        return self.args[0].is_real if self.entry.opaque.sign == "positive" else None

    def _eval_is_nonnegative(self):
        return self.args[0].is_real if self.entry.opaque.sign is not None else None


class _Namespace:
    """What the table's sympy forms are written in: sympy, the brackets, and each opaque
    function by its name."""

    def __init__(self, **own):
        self.__dict__.update(own)

    def __getattr__(self, name):
        return getattr(sp, name)


OPAQUE = {f.name: type(f.name, (Opaque,), {"nargs": f.arity, "entry": f})
          for f in FUNCTIONS.values() if f.opaque is not None}
SYM = _Namespace(Le0=Le0, Lt0=Lt0, Eq0=Eq0, **OPAQUE)


def apply(name: str, *args) -> sp.Expr:
    """Elementwise function `name` of sympy expressions `args`."""
    f = FUNCTIONS[name]
    return OPAQUE[name](*args) if f.opaque is not None else f.sympy(SYM, *args)


def const(v: float) -> sp.Expr:
    """A number: exact when the float is an integer, pi, or a short fraction (0.2 -> 1/5)."""
    if v == math.pi:
        return sp.pi
    if float(v).is_integer() and abs(v) < 1e15:
        return sp.Integer(int(v))
    if math.isfinite(v):
        f = Fraction(v).limit_denominator(10**6)
        if float(f) == v:
            return sp.Rational(f.numerator, f.denominator)
    return sp.Float(v)


# ---- symbols ---------------------------------------------------------------------------------


class SymbolTable:
    """Every symbol and opaque function of one operator, created once per name."""

    def __init__(self, reserved: set[str] = frozenset()):
        self._symbols: dict[str, sp.Symbol] = {}
        self._functions: dict[str, type] = {}
        self.dep: dict[sp.Symbol, str] = {}  # symbol -> the point variable it depends on
        self.reserved = set(reserved)

    def symbol(self, name: str, var: str | None = None) -> sp.Symbol:
        s = self._symbols.get(name)
        if s is None:
            s = self._symbols[name] = sp.Symbol(name, real=True)
            if var is not None:
                self.dep[s] = var
        return s

    def fresh(self, base: str) -> sp.Symbol:
        """A symbol whose name no declaration of the operator uses (the lag `d`, ...)."""
        name = base
        while name in self.reserved or name in self._symbols:
            name += "_"
        return self.symbol(name)

    def function(self, name: str):
        f = self._functions.get(name)
        if f is None:
            f = self._functions[name] = sp.Function(name, real=True)
        return f

    def deps(self, e: sp.Expr) -> frozenset[str]:
        """The point variables `e` depends on."""
        return frozenset(self.dep[s] for s in e.free_symbols if s in self.dep)

    def symbols_of(self, var: str) -> list[sp.Symbol]:
        return [s for s, v in self.dep.items() if v == var]


# ---- the translation -------------------------------------------------------------------------


class Translator:
    """IR -> sympy for one operator. `expr(e)` is the generic channel of `e`."""

    def __init__(self, op: ir.Operator, table: SymbolTable | None = None):
        self.op = op
        if table is None:
            names = ({d.name for d in op.domains} | {i.name for i in op.inputs}
                     | {p.name for p in op.params} | {k.name for k in op.kernels}
                     | {op.output.name, op.output.var})
            for n in ir.walk(op.output.body):
                if isinstance(n, ir.Coord | ir.FieldAt):
                    names.add(n.var)
            table = SymbolTable(names)
        self.table = table
        self._memo: dict[tuple[int, int | None], tuple[sp.Expr, int]] = {}
        self._keep: list[ir.Expr] = []  # memo keys are ids: keep the nodes alive

    def expr(self, e: ir.Expr, channel: int | None = None) -> sp.Expr:
        """`e` as sympy: channel `channel` of a vector (None: the generic channel)."""
        return self._tr(e, channel)[0]

    def size(self, e: ir.Expr, channel: int | None = None) -> int:
        return self._tr(e, channel)[1]

    def coord(self, var: str) -> sp.Symbol:
        """The symbol of a scalar coordinate (grid or index point)."""
        return self.table.symbol(var, var)

    # -- per node --
    def _tr(self, e: ir.Expr, ch: int | None) -> tuple[sp.Expr, int]:
        if e.width is None:
            ch = None
        key = (id(e), ch)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        value, size = self._node(e, ch)
        if size > MAX_NODES:
            raise TooBig(f"the expression grows past {MAX_NODES} nodes")
        self._memo[key] = (value, size)
        self._keep.append(e)
        return value, size

    def _node(self, e: ir.Expr, ch: int | None) -> tuple[sp.Expr, int]:
        t = self.table
        tag = "c" if ch is None else str(ch)
        if isinstance(e, ir.Const):
            return const(e.value), 1
        if isinstance(e, ir.Coord):
            name = e.var if e.width is None else f"{e.var}[{tag}]"
            return t.symbol(name, e.var), 1
        if isinstance(e, ir.FieldAt):
            name = f"{e.field}({e.var})" if e.width is None else f"{e.field}[{tag}]({e.var})"
            return t.symbol(name, e.var), 1
        if isinstance(e, ir.ParamRef):
            return t.symbol(e.param if e.width is None else f"{e.param}[{tag}]"), 1
        if isinstance(e, ir.Op):
            return self._op(e, ch)
        if isinstance(e, ir.Reduce):
            return self._reduce(e)
        if isinstance(e, ir.Component):
            return self._tr(e.arg, e.index)
        if isinstance(e, ir.MlpCall | ir.SplineCall):
            args, size = [], 1
            for a in e.args:
                for k in ([None] if a.width is None else range(a.width)):
                    v, n = self._tr(a, k)
                    args.append(v)
                    size += n
            name = e.param if e.width is None else f"{e.param}[{tag}]"
            return t.function(name)(*args), size
        raise TypeError(f"cannot translate {type(e).__name__} (an integral inside an integrand?)")

    def _op(self, e: ir.Op, ch: int | None) -> tuple[sp.Expr, int]:
        parts = [self._tr(a, ch) for a in e.args]
        args = [p[0] for p in parts]
        size = 1 + sum(p[1] for p in parts)
        return apply(e.fn.value, *args), FUNCTIONS[e.fn.value].sympy_size * size

    def _reduce(self, e: ir.Reduce) -> tuple[sp.Expr, int]:
        width = e.args[0].width
        chans = [None] if width is None else range(width)
        terms, size = [], 1
        for k in chans:
            parts = [self._tr(a, k) for a in e.args]
            size += sum(p[1] for p in parts) + 1
            if size > MAX_REDUCE_NODES:
                raise TooBig(f"`{e.fn.value}` over {width} channels grows past "
                             f"{MAX_REDUCE_NODES} nodes")
            vals = [p[0] for p in parts]
            terms.append(vals[0] * vals[1] if e.fn is ir.RFn.DOT
                         else vals[0] ** 2 if e.fn in (ir.RFn.SQNORM, ir.RFn.NORM) else vals[0])
        total = sp.Add(*terms)
        return (sp.sqrt(total) if e.fn is ir.RFn.NORM else total), size


# ---- guarded algebra -------------------------------------------------------------------------

MAX_TERMS = 2_000  # estimated terms of an expansion
_PRIME = 2_147_483_647  # 2^31 - 1: products of two residues fit in int64


def estimate_terms(e: sp.Expr, cap: int = MAX_TERMS) -> int:
    """An upper bound (capped at cap + 1) of the number of terms `expand(e)` makes, checking
    the arguments of functions too (deep expansion reaches them). Raises `TooBig` if any part
    would pass `cap`."""
    memo: dict[sp.Expr, int] = {}

    def go(x: sp.Expr) -> int:
        if x in memo:
            return memo[x]
        if x.is_Atom:
            n = 1
        elif x.is_Add:
            n = sum(go(a) for a in x.args)
        elif x.is_Mul:
            n = 1
            for a in x.args:
                n = min(n * go(a), cap + 1)
        elif x.is_Pow:
            base = go(x.base)
            go(x.exp)
            ex = x.exp
            if ex.is_Integer and ex > 0:
                n = math.comb(base + int(ex) - 1, int(ex)) if base < cap else cap + 1
            else:
                n = 1
        else:  # a function: its arguments expand inside it
            for a in x.args:
                go(a)
            n = 1
        n = min(n, cap + 1)
        if n > cap:
            raise TooBig(f"expanding it would make more than {cap} terms")
        memo[x] = n
        return n

    return go(e)


def expand(e: sp.Expr, power_exp: bool = True) -> sp.Expr:
    """`sympy.expand` behind a term-count guard (`TooBig` when it would explode)."""
    estimate_terms(e)
    return sp.expand(e, power_exp=power_exp)


def split_trig(e: sp.Expr, side: Callable[[sp.Expr], str]) -> sp.Expr:
    """Separate sin and cos of a sum of an x-part and a y-part with the addition theorems,
    cos(P + Q) = cos P·cos Q − sin P·sin Q and sin(P + Q) = sin P·cos Q + cos P·sin Q, where
    `side(term)` says "x", "y" or "const" for a term that depends on x alone, y alone or
    neither, anything else for both. One application per function, not sympy's full
    `expand(trig=True)`: that one also rewrites tanh of sums, and a sum of n terms inside a
    cosine into 2^(n-1) terms (a 16-term argument ran for 40 s)."""
    memo: dict[sp.Expr, sp.Expr] = {}

    def go(n: sp.Expr) -> sp.Expr:
        if n.is_Atom:
            return n
        hit = memo.get(n)
        if hit is not None:
            return hit
        args = tuple(go(a) for a in n.args)
        new = n.func(*args) if args != n.args else n
        if isinstance(new, (sp.sin, sp.cos)):
            parts: dict[str, list[sp.Expr]] = {"x": [], "y": [], "const": []}
            for term in sp.Add.make_args(expand(new.args[0])):
                where = side(term)
                if where not in parts:
                    break
                parts[where].append(term)
            else:
                if parts["x"] and parts["y"]:
                    p = sp.Add(*parts["x"], *parts["const"])
                    q = sp.Add(*parts["y"])
                    if isinstance(new, sp.cos):
                        new = sp.cos(p) * sp.cos(q) - sp.sin(p) * sp.sin(q)
                    else:
                        new = sp.sin(p) * sp.cos(q) + sp.cos(p) * sp.sin(q)
        memo[n] = new
        return new

    return go(e)


def generic_rank(entries: dict[tuple[int, int], sp.Expr], nrows: int, ncols: int) -> int:
    """The rank of the coefficient matrix for generic param values: exact when it is a
    matching (one entry per row and column), else Gaussian elimination modulo a prime at
    random values of the params (Schwartz–Zippel: right with overwhelming probability)."""
    rs = Counter(i for i, _ in entries)
    cs = Counter(j for _, j in entries)
    if all(v == 1 for v in rs.values()) and all(v == 1 for v in cs.values()):
        return len(entries)
    best = 0
    for seed in (1, 2):
        try:
            value = _ModP(seed)
            m = np.zeros((nrows, ncols), dtype=np.int64)
            for (i, j), c in entries.items():
                m[i, j] = value(c)
        except ZeroDivisionError:
            continue
        best = max(best, _rank_mod_p(m))
    return best


class _ModP:
    """A sympy expression in params, mod a prime, with a random value for each atom
    (symbol, function call, irrational power)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.atoms: dict[sp.Expr, int] = {}

    def __call__(self, e: sp.Expr) -> int:
        if e.is_Integer:
            return int(e) % _PRIME
        if e.is_Rational:
            return int(e.p) * self._inv(int(e.q)) % _PRIME
        if e.is_Float:
            num, den = float(e).as_integer_ratio()
            return num * self._inv(den) % _PRIME
        if e.is_Add:
            return sum(self(a) for a in e.args) % _PRIME
        if e.is_Mul:
            out = 1
            for a in e.args:
                out = out * self(a) % _PRIME
            return out
        if e.is_Pow and e.exp.is_Integer:
            b, n = self(e.base), int(e.exp)
            return pow(b, n, _PRIME) if n >= 0 else pow(self._inv(b), -n, _PRIME)
        if e not in self.atoms:
            self.atoms[e] = int(self.rng.integers(1, _PRIME))
        return self.atoms[e]

    @staticmethod
    def _inv(v: int) -> int:
        if v % _PRIME == 0:
            raise ZeroDivisionError
        return pow(v, _PRIME - 2, _PRIME)


def _rank_mod_p(m: np.ndarray) -> int:
    m = m % _PRIME
    rank = 0
    nrows, ncols = m.shape
    for c in range(ncols):
        if rank == nrows:
            break
        nz = np.nonzero(m[rank:, c])[0]
        if nz.size == 0:
            continue
        p = rank + int(nz[0])
        m[[rank, p]] = m[[p, rank]]
        m[rank] = m[rank] * pow(int(m[rank, c]), _PRIME - 2, _PRIME) % _PRIME
        below = m[rank + 1:, c].copy()
        if below.any():
            m[rank + 1:] = (m[rank + 1:] - np.outer(below, m[rank]) % _PRIME) % _PRIME
        rank += 1
    return rank


def count(e: sp.Expr) -> int:
    """The number of nodes of `e` (cheap: a preorder walk)."""
    return sum(1 for _ in sp.preorder_traversal(e))
