"""Local derivatives of the elementwise functions, derived by sympy.

Each elementwise function's entry in `itdsl.functions` gives its sympy form in its
arguments `a0, a1, ...`; `sympy.diff` gives its partial derivatives once, and `to_pexpr`
turns them into plan expressions with the op's actual arguments substituted. So the
calculus is sympy's, and the chain rule over tensors (dot products, MLP layers, splines)
is `autodiff`'s. Where the textbook derivative is numerically poor (softplus' =
e^x/(1+e^x) overflows), the function is opaque to sympy and its entry states the stable
form; where calculus leaves a choice (ties of min and max, a zero base of a power), the
entry's `partials` are torch's, so that gradients agree with the reference's autograd.
"""

from __future__ import annotations

import math

import sympy as sp

from ..functions import FUNCTIONS
from . import pexpr as P
from .tosympy import OPAQUE, SYM, Eq0, Le0, Lt0, apply

A = sp.symbols("a0:3", real=True)

# The sympy meaning of each elementwise function with a sympy form, in A[0], A[1], ...
DEFINITIONS = {name: apply(name, *A[:f.arity]) for name, f in FUNCTIONS.items()
               if f.sympy is not None or f.opaque is not None}
_PARTIALS: dict[str, tuple[sp.Expr, ...]] = {}

# sympy function -> the plan function of that name (exp -> "exp", the opaque sigmoid, ...)
_HEADS = {type(e): name for name, e in DEFINITIONS.items()
          if isinstance(e, sp.Function) and e.args == A[:FUNCTIONS[name].arity]}
_BRACKETS = {Lt0: "<", Le0: "<=", Eq0: "=="}
_FLIPPED = {Lt0: ">", Le0: ">=", Eq0: "=="}  # [-z < 0] = [z > 0]


def sympy_partials(op: str) -> tuple[sp.Expr, ...]:
    """The partial derivatives of `op`'s sympy form, each in A[0], A[1], ... (memoised)."""
    if op not in _PARTIALS:
        _PARTIALS[op] = tuple(sp.diff(DEFINITIONS[op], A[k])
                              for k in range(FUNCTIONS[op].arity))
    return _PARTIALS[op]


def partials(n: P.Node) -> list[P.Node]:
    """The partial derivatives of elementwise node `n` with respect to each argument."""
    env = {A[k]: a for k, a in enumerate(n.args)}

    def derived() -> list[P.Node]:
        return [to_pexpr(e, env, n) for e in sympy_partials(n.op)]
    rule = FUNCTIONS[n.op].partials
    return derived() if rule is None else rule(P, n.args, derived)


_FORMULAS: dict[str, sp.Expr] = {}
_LOADS = P.LEAVES | {"linear", "dot", "sum", "read"}  # (a kernel reads them, or stages them)
_ARITH = frozenset({"+", "-", "*", "neg"})


def expand_formulas(roots: list[P.Node]) -> tuple[list[P.Node], set[P.Node]]:
    """`roots` with the functions whose entry says `expand` written as their formula (gelu(z)
    as z/2·(1 + erf(√2·z/2))) where that pays: where the formula's subexpression that is
    not z itself (gelu's erf(√2·z/2)) is already in `roots`, as in a derivative sympy took of
    that formula, so that it becomes one node read twice; and where z is a value read from
    memory or computed once (a leaf, a matrix product, a dot or a sum; short ones are written
    out, a few operations) or one operation on such values, since the formula reads z
    several times and nothing binds it once (a gelu of another gelu stays whole: its copies
    would nest, and the code generator's time grows exponentially with nesting).
    Returns the new roots and the expanded values (which a kernel computes once each, for
    the same reason)."""
    order = P.toposort(roots)
    present = set(order)
    memo: dict[P.Node, P.Node] = {}
    expanded: set[P.Node] = set()
    for n in order:
        args = tuple(memo[a] for a in n.args)
        # (whether it pays is read from the roots as given; the formula is written over the
        # arguments as rewritten: a gelu of a product of an expanded gelu reads that one)
        e = _expansion(n, present, args)
        if e is not None:
            memo[n] = e
            expanded.add(e)
        elif any(x is not y for x, y in zip(args, n.args)):
            memo[n] = P.rebuild(n, args)
        else:
            memo[n] = n
    return [memo[r] for r in roots], expanded


def _formula(op: str) -> sp.Expr:
    if op not in _FORMULAS:
        f = FUNCTIONS[op]
        _FORMULAS[op] = f.opaque.formula(SYM, *A[:f.arity])
    return _FORMULAS[op]


def _expansion(n: P.Node, present: set, args: tuple[P.Node, ...]) -> P.Node | None:
    """`n` written as its function's formula over `args` (its arguments, rewritten), if its
    entry says `expand`, its arguments are flat and a costly part of the formula (erf, exp,
    ...) over its own arguments is in `present`; else None."""
    f = FUNCTIONS.get(n.op)
    if f is None or f.opaque is None or not f.opaque.expand:
        return None
    if not all(a.op in _LOADS or (a.op in _ARITH and all(b.op in _LOADS for b in a.args))
               for a in (*n.args, *args)):  # (flat as given and as rewritten)
        return None
    e = to_pexpr(_formula(n.op), dict(zip(A, n.args)))
    shared = any(m in present for m in P.toposort([e])
                 if m.op in FUNCTIONS and FUNCTIONS[m.op].let_depth > 0)
    if not shared:
        return None
    return e if args == n.args else to_pexpr(_formula(n.op), dict(zip(A, args)))


def to_pexpr(e: sp.Expr, env: dict, origin: P.Node | None = None) -> P.Node:
    """A sympy expression (from DEFINITIONS and their partials) as a plan expression; `env`
    maps symbols to nodes. If `e` is the op's own definition, the op node itself is reused."""
    if origin is not None and e == DEFINITIONS.get(origin.op):
        return origin
    if e in env:
        return env[e]
    if e.is_Number:
        return P.const(float(e))
    if e == sp.pi:
        return P.const(math.pi)
    if type(e) in _BRACKETS:  # an Iverson bracket [z REL 0]
        z = e.args[0]
        if z.could_extract_minus_sign():
            return P.ew(_FLIPPED[type(e)], to_pexpr(-z, env, origin), P.ZERO)
        return P.ew(_BRACKETS[type(e)], to_pexpr(z, env, origin), P.ZERO)
    args = [to_pexpr(a, env, origin) for a in e.args]
    if isinstance(e, sp.Add):
        out = args[0]
        for a in args[1:]:
            out = P.add(out, a)
        return out
    if isinstance(e, sp.Mul):
        out = args[0]
        for a in args[1:]:
            out = P.mul(out, a)
        return out
    if isinstance(e, sp.Pow):
        base, exp = args
        if exp.is_const:
            c = exp.value
            if c == -1:
                return P.div(P.ONE, base)
            if c == 0.5:
                return P.ew("sqrt", base)
            if c == -0.5:
                return P.div(P.ONE, P.ew("sqrt", base))
            if c < 0:
                return P.div(P.ONE, P.power(base, -c))
            return P.power(base, c)
        return P.ew("^", base, exp)
    name = _HEADS.get(type(e))
    if name is not None:
        if name == "exp" and origin is not None and origin.op == "exp" and args[0] is \
                origin.args[0]:
            return origin
        return P.ew(name, *args)
    raise NotImplementedError(f"no plan expression for {e.func}")  # pragma: no cover


__all__ = ["DEFINITIONS", "OPAQUE", "SYM", "expand_formulas", "partials", "sympy_partials",
           "to_pexpr"]
