"""Arithmetic: negation, + - * / and the power a^b (the operators of `.it`)."""

from __future__ import annotations

from .entry import Elementwise


def _pow_partials(P, args, d) -> list:
    """d a^b as torch.pow's backward. A constant exponent c: c a^(c-1), no log(a) term.
    Otherwise b a^(b-1) for the base (sympy's b a^b / a is 0/0 at a = 0), 0 where b = 0
    (not 0 · 0^-1 = NaN); for the exponent sympy's a^b log a, but 0 where a = 0 and b >= 0
    (not 0^b · log 0 = NaN)."""
    a, b = args
    if b.is_const:
        c = b.value
        return [P.mul(P.const(c), P.power(a, c - 1)), P.ZERO]
    _, db = d()
    da = P.mul(b, P.ew("^", a, P.sub(b, P.ONE)))
    return [P.where(P.ew("==", b, P.ZERO), P.ZERO, da),
            P.where(P.ew("and", P.ew("==", a, P.ZERO), P.ew(">=", b, P.ZERO)), P.ZERO, db)]


def _div_partials(P, args, d) -> list:
    """d(a/c): 1/c, and −(a/c)·(1/c) for the denominator, as torch's −(a/c)/c — sympy's
    −a/c² squares c first, which underflows to 0 (then 1/0 = inf) for a float32 c below
    1e-19, where the quotient a/c (the forward's own value) and 1/c stay finite; 1/c of a
    per-call c (negated) hoists out of the pair loop: the pair pays one multiply."""
    a, c = args
    inv = P.div(P.ONE, c)
    return [inv, P.mul(P.div(a, c), P.neg(inv))]


FUNCTIONS = [
    Elementwise(
        name="neg", arity=1, syntax="prefix",
        sympy=lambda S, a: -a, fold=lambda a: -a,
        numpy=lambda np, a: np.negative(a), torch=lambda T, a: T.neg(a),
        tvm=lambda b, x: -x),
    Elementwise(
        name="+", arity=2, syntax="infix", member="ADD",
        sympy=lambda S, a, c: a + c, fold=lambda a, c: a + c,
        numpy=lambda np, a, c: np.add(a, c), torch=lambda T, a, c: T.add(a, c),
        tvm=lambda b, x, y: x + y),
    Elementwise(
        name="-", arity=2, syntax="infix", member="SUB",
        sympy=lambda S, a, c: a - c, fold=lambda a, c: a - c,
        numpy=lambda np, a, c: np.subtract(a, c), torch=lambda T, a, c: T.sub(a, c),
        tvm=lambda b, x, y: x - y),
    Elementwise(
        name="*", arity=2, syntax="infix", member="MUL",
        sympy=lambda S, a, c: a * c, fold=lambda a, c: a * c,
        numpy=lambda np, a, c: np.multiply(a, c), torch=lambda T, a, c: T.mul(a, c),
        tvm=lambda b, x, y: x * y),
    Elementwise(
        name="/", arity=2, syntax="infix", member="DIV",
        sympy=lambda S, a, c: a / c, partials=_div_partials,
        numpy=lambda np, a, c: np.divide(a, c), torch=lambda T, a, c: T.div(a, c),
        tvm=lambda b, x, y: x / y),
    # x^0.5 is sqrt(x) in the kernels, NaN at -inf as torch.pow (powf gives inf)
    Elementwise(
        name="^", arity=2, syntax="infix", member="POW",
        sympy=lambda S, a, c: S.Pow(a, c), partials=_pow_partials,
        numpy=lambda np, a, c: np.power(a, c), torch=lambda T, a, c: T.pow(a, c),
        tvm=lambda b, x, y: b.power(x, y), let_depth=1),
]
