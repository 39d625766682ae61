"""min and max; comparisons and `and`/`or` (0/1 values: Iverson brackets, which mask the
product they are a factor of); `where` (of plans only)."""

from __future__ import annotations

from .entry import Elementwise, Opaque, constant_partials


def _tie_split(first: str, second: str):
    """d min(a, b) (first, second = ">", "<") or d max(a, b) ("<", ">"), as torch
    differentiates them: the whole gradient to the chosen argument, half to each at a tie,
    and all of it to both where one is NaN (no comparison holds). Each is a mask (where(c,
    ., 0)), as torch's masked_fill: the outer derivative it selects away may be infinite."""
    def partials(P, args, d) -> list:
        a, b = args
        share = P.where(P.ew("==", a, b), P.const(0.5), P.ONE)
        return [P.where(P.ew("==", P.ew(cmp, a, b), P.ZERO), share, P.ZERO)
                for cmp in (first, second)]
    return partials


def _where_partials(P, args, d) -> list:
    cond, _, _ = args
    return [P.ZERO, P.where(cond, P.ONE, P.ZERO), P.where(cond, P.ZERO, P.ONE)]


def _compare(name: str, member: str, sympy, numpy, torch, tvm,
             negate: bool = False) -> Elementwise:
    one, zero = (0.0, 1.0) if negate else (1.0, 0.0)
    return Elementwise(name=name, arity=2, syntax="infix", member=member, condition="compare",
                       sympy=sympy, partials=constant_partials, numpy=numpy, torch=torch,
                       tvm=lambda b, x, y: b.tirx.Select(tvm(x, y), b.c(one), b.c(zero)))


FUNCTIONS = [
    # NaN in either argument gives NaN, as torch.minimum does (TVM's min would drop it)
    Elementwise(
        name="min", arity=2, opaque=Opaque(), partials=_tie_split(">", "<"),
        numpy=lambda np, a, c: np.minimum(a, c), torch=lambda T, a, c: T.minimum(a, c),
        tvm=lambda b, x, y: b.minimum(x, y), let_depth=1),
    Elementwise(
        name="max", arity=2, opaque=Opaque(), partials=_tie_split("<", ">"),
        numpy=lambda np, a, c: np.maximum(a, c), torch=lambda T, a, c: T.maximum(a, c),
        tvm=lambda b, x, y: b.maximum(x, y), let_depth=1),
    # a bracket [l REL r] is [(l - r) REL 0] in sympy (`Le0`, `Lt0`, `Eq0`), never Heaviside
    _compare("<", "LT", lambda S, a, c: S.Lt0(a - c), lambda np, a, c: np.less(a, c),
             lambda T, a, c: T.lt(a, c), lambda x, y: x < y),
    _compare("<=", "LE", lambda S, a, c: S.Le0(a - c), lambda np, a, c: np.less_equal(a, c),
             lambda T, a, c: T.le(a, c), lambda x, y: x <= y),
    _compare(">", "GT", lambda S, a, c: S.Lt0(c - a), lambda np, a, c: np.greater(a, c),
             lambda T, a, c: T.gt(a, c), lambda x, y: x > y),
    _compare(">=", "GE", lambda S, a, c: S.Le0(c - a),
             lambda np, a, c: np.greater_equal(a, c), lambda T, a, c: T.ge(a, c),
             lambda x, y: x >= y),
    _compare("==", "EQ", lambda S, a, c: S.Eq0(a - c), lambda np, a, c: np.equal(a, c),
             lambda T, a, c: T.eq(a, c), lambda x, y: x == y),
    _compare("!=", "NE", lambda S, a, c: 1 - S.Eq0(a - c), lambda np, a, c: np.not_equal(a, c),
             # not (x == y): true where either is NaN, as torch.ne (TVM's `!=` is ordered)
             lambda T, a, c: T.ne(a, c), lambda x, y: x == y, negate=True),
    # of two 0/1 values
    Elementwise(
        name="and", arity=2, syntax="infix", condition="logic",
        sympy=lambda S, a, c: a * c, partials=constant_partials,
        numpy=lambda np, a, c: np.multiply(a, c), torch=lambda T, a, c: a * c,
        tvm=lambda b, x, y: x * y),
    Elementwise(
        name="or", arity=2, syntax="infix", condition="logic",
        sympy=lambda S, a, c: a + c - a * c, sympy_size=2, partials=constant_partials,
        numpy=lambda np, a, c: np.maximum(a, c), torch=lambda T, a, c: T.maximum(a, c),
        tvm=lambda b, x, y: b.te.max(x, y)),
    # where(cond, a, b): a where cond is not 0, else b
    Elementwise(
        name="where", arity=3, syntax="internal", partials=_where_partials,
        torch=lambda T, c, a, e: T.where(c != 0, a, e),
        tvm=lambda b, c, x, y: b.tirx.Select(c != b.c(0.0), x, y)),
]
