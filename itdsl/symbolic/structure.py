"""Structural helpers on the checked IR, shared by the recognisers and the Plan builder.

An integrand is a product of factors (`factors`). Against the output's point x and
the integral's point y each factor is one of

    pair     depends on x and y        -> the kernel K(x, y)
    y-only   depends on y alone        -> the values v(y) (and quadrature-like weights)
    x-only   depends on x alone        -> a per-point factor
    const    depends on neither        -> a constant

(`split_integrand`). `normalised_pairs` finds the kernel-weighted averages
`∫ K·v / ∫ K`, and `integral_units` lists what a strategy must handle: each
normalised ratio once, each other integral on its own.

`evaluate` computes an IR expression with numpy on a batch of points, with random
stand-ins for mlps and splines: the independent numeric guard the recognisers use to
double-check what sympy concluded.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..frontend import ir
from ..functions import FUNCTIONS

# ---- factors ---------------------------------------------------------------------------------


def factors(e: ir.Expr) -> list[ir.Expr]:
    """The factors of a product, left to right: `a * (b * c)` -> [a, b, c]; `-a` -> [-1, a];
    `a / b` -> [a's factors..., 1/b]."""
    out: list[ir.Expr] = []
    stack = [e]
    while stack:
        n = stack.pop()
        if isinstance(n, ir.Op) and n.fn is ir.Fn.MUL:
            stack.extend(reversed(n.args))
        elif isinstance(n, ir.Op) and n.fn is ir.Fn.NEG:
            out.append(ir.Const(value=-1.0, width=None, span=n.span))
            stack.append(n.args[0])
        elif (isinstance(n, ir.Op) and n.fn is ir.Fn.DIV
              and not (isinstance(n.args[0], ir.Const) and n.args[0].value == 1.0)):
            num, den = n.args
            stack.append(ir.Op(fn=ir.Fn.DIV, args=(ir.Const(value=1.0, width=None), den),
                               width=den.width, span=n.span))
            stack.append(num)
        else:
            out.append(n)
    return out


def integrals(e: ir.Expr) -> list[ir.Integral]:
    """Every integral in `e`, in reading order (integrals do not nest)."""
    return [n for n in ir.walk(e) if isinstance(n, ir.Integral)]


def is_bracket(e: ir.Expr) -> bool:
    """An Iverson bracket: a comparison, or comparisons joined by `and`/`or`."""
    return isinstance(e, ir.Op) and e.fn in ir.BRACKET_FNS


def fields_in(e: ir.Expr) -> list[ir.FieldAt]:
    """The sampled fields read by `e` (no repeats, in reading order)."""
    seen: dict[ir.FieldAt, None] = {}
    for n in ir.walk(e):
        if isinstance(n, ir.FieldAt):
            seen.setdefault(n, None)
    return list(seen)


class Split(NamedTuple):
    """The factors of an integrand by what they depend on (see the module docstring);
    unpacks as (kernel_factors, y_factors, x_factors, const_factors)."""

    pair: tuple[ir.Expr, ...]
    y_only: tuple[ir.Expr, ...]
    x_only: tuple[ir.Expr, ...]
    const: tuple[ir.Expr, ...]


def split_integrand(integral: ir.Integral) -> Split:
    """Sort the factors of `integral`'s integrand into pair / y-only / x-only / const.
    The pair factors form the kernel K; the y-only ones are the values."""
    groups: dict[str, list[ir.Expr]] = {"pair": [], "y": [], "x": [], "const": []}
    for f in factors(integral.body):
        vs = ir.free_vars(f)
        inner = integral.var in vs
        outer = bool(vs - {integral.var})
        groups["pair" if inner and outer else "y" if inner else "x" if outer else "const"].append(f)
    return Split(tuple(groups["pair"]), tuple(groups["y"]), tuple(groups["x"]),
                 tuple(groups["const"]))


# ---- normalised integrals --------------------------------------------------------------------


@dataclass(frozen=True)
class NormalisedPair:
    """`numerator / denominator` = ∫ K·v / ∫ K: the numerator's factors are the
    denominator's times `values` (factors of the integration variable alone, or constants)."""

    ratio: ir.Op
    numerator: ir.Integral
    denominator: ir.Integral
    values: tuple[ir.Expr, ...]


def normalised_pair(e: ir.Expr) -> NormalisedPair | None:
    """`e` as a normalised ratio, or None."""
    if not (isinstance(e, ir.Op) and e.fn is ir.Fn.DIV):
        return None
    num, den = e.args
    if not (isinstance(num, ir.Integral) and isinstance(den, ir.Integral)):
        return None
    if (num.var, num.domain, num.quad) != (den.var, den.domain, den.quad):
        return None
    fn, fd = Counter(factors(num.body)), Counter(factors(den.body))
    if fd - fn:  # a denominator factor missing from the numerator
        return None
    extra = list((fn - fd).elements())
    if any(not ir.free_vars(f) <= {num.var} for f in extra):
        return None
    return NormalisedPair(e, num, den, tuple(extra))


def normalised_pairs(output_expr: ir.Expr) -> list[NormalisedPair]:
    """Every `∫ K·v / ∫ K` ratio in `output_expr`: equal variable, domain and quadrature, and
    a numerator that is the denominator times factors of the integration variable alone."""
    return [p for n in ir.walk(output_expr) if (p := normalised_pair(n)) is not None]


@dataclass(frozen=True)
class Unit:
    """One thing a strategy computes: a plain integral, or a normalised ratio.

    `split` sorts the integrand of the denominator (ratio) or of the integral (plain);
    `values` are the factors that only the numerator has (ratio) or the y-only factors
    (plain)."""

    integral: ir.Integral  # the numerator of a ratio, or the integral itself
    denominator: ir.Integral | None
    split: Split
    values: tuple[ir.Expr, ...]

    @property
    def normalised(self) -> bool:
        return self.denominator is not None

    @property
    def var(self) -> str:
        return self.integral.var

    @property
    def domain(self) -> str:
        return self.integral.domain


def integral_units(output_expr: ir.Expr) -> list[Unit]:
    """The integrals of `output_expr`, a normalised ratio counting as one, in reading order."""
    units: list[Unit] = []
    taken: set[int] = set()
    for n in ir.walk(output_expr):
        if id(n) in taken:
            continue
        pair = normalised_pair(n)
        if pair is not None:
            taken |= {id(pair.numerator), id(pair.denominator)}
            units.append(Unit(pair.numerator, pair.denominator,
                              split_integrand(pair.denominator), pair.values))
        elif isinstance(n, ir.Integral):
            s = split_integrand(n)
            units.append(Unit(n, None, s, s.y_only))
    return units


# ---- a numpy evaluator for numeric guards ----------------------------------------------------


@dataclass
class Env:
    """Values for `evaluate` on a batch of P points: every value is an array [P, width]
    (width 1 for a scalar); params are [1, width]."""

    coords: dict[str, np.ndarray] = field(default_factory=dict)  # var -> [P, D or 1]
    fields: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (field, var)
    params: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [1, C or 1]


def _stand_in(name: str, n_in: int, n_out: int):
    """A fixed smooth random function R^n_in -> R^n_out standing for an mlp or a spline."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    a = rng.normal(size=(n_in, n_out)) / math.sqrt(n_in)
    b = rng.normal(size=n_out)
    return lambda z: np.tanh(z @ a + b)


def evaluate(e: ir.Expr, env: Env, n: int) -> np.ndarray:
    """`e` on a batch of `n` points as an array [n, width or 1] (float64, nan where undefined).
    mlps and splines are fixed random smooth functions of their arguments."""
    memo: dict[int, np.ndarray] = {}

    def go(x: ir.Expr) -> np.ndarray:
        hit = memo.get(id(x))
        if hit is not None:
            return hit
        v = node(x)
        memo[id(x)] = v
        return v

    def node(x: ir.Expr) -> np.ndarray:
        if isinstance(x, ir.Const):
            return np.full((1, 1), x.value)
        if isinstance(x, ir.Coord):
            return env.coords[x.var]
        if isinstance(x, ir.FieldAt):
            return env.fields[(x.field, x.var)]
        if isinstance(x, ir.ParamRef):
            return env.params[x.param]
        if isinstance(x, ir.Op):
            args = [go(a) for a in x.args]
            return FUNCTIONS[x.fn.value].numpy(np, *args).astype(float)  # (comparisons: bool)
        if isinstance(x, ir.Reduce):
            a = go(x.args[0])
            if x.fn is ir.RFn.DOT:
                return np.sum(a * go(x.args[1]), axis=-1, keepdims=True)
            if x.fn is ir.RFn.SUM:
                return np.sum(a, axis=-1, keepdims=True)
            sq = np.sum(a * a, axis=-1, keepdims=True)
            return np.sqrt(sq) if x.fn is ir.RFn.NORM else sq
        if isinstance(x, ir.Component):
            return go(x.arg)[:, x.index:x.index + 1]
        if isinstance(x, ir.MlpCall | ir.SplineCall):
            parts = [np.broadcast_to(go(a), (n, a.width or 1)) for a in x.args]
            z = np.concatenate(parts, axis=-1)
            return _stand_in(x.param, z.shape[1], x.width or 1)(z)
        raise TypeError(f"cannot evaluate {type(x).__name__} here")

    with np.errstate(all="ignore"):
        return np.broadcast_to(go(e), (n, e.width or 1)).astype(float)
