"""Local derivatives of the elementwise functions, derived by sympy.

Each elementwise op has a sympy definition in its arguments `a0, a1, ...`; `sympy.diff`
gives its partial derivatives once, at import, and `to_pexpr` turns them into plan
expressions with the op's actual arguments substituted. So the calculus is sympy's,
and the chain rule over tensors (dot products, MLP layers, splines) is `autodiff`'s.
Where the textbook derivative is numerically poor (softplus' = e^x/(1+e^x) overflows),
the function is a sympy `Function` whose `fdiff` states the stable form.
"""

from __future__ import annotations

import math

import sympy as sp

from . import pexpr as P

A = sp.symbols("a0:3", real=True)


class sigmoid(sp.Function):
    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)


class softplus(sp.Function):
    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])


class relu(sp.Function):
    def fdiff(self, argindex=1):
        return step(self.args[0])


class step(sp.Function):
    def fdiff(self, argindex=1):
        return sp.Integer(0)


class sign(sp.Function):
    def fdiff(self, argindex=1):
        return sp.Integer(0)


class absf(sp.Function):
    def fdiff(self, argindex=1):
        return sign(self.args[0])


class less(sp.Function):
    def fdiff(self, argindex=1):
        return sp.Integer(0)


def _gelu(x):
    return x * (1 + sp.erf(x / sp.sqrt(2))) / 2


# The sympy meaning of each differentiable elementwise op, in its arguments A[0], A[1].
DEFINITIONS = {
    "neg": -A[0],
    "+": A[0] + A[1],
    "-": A[0] - A[1],
    "*": A[0] * A[1],
    "/": A[0] / A[1],
    "^": A[0] ** A[1],
    "exp": sp.exp(A[0]),
    "log": sp.log(A[0]),
    "sqrt": sp.sqrt(A[0]),
    "abs": absf(A[0]),
    "sin": sp.sin(A[0]),
    "cos": sp.cos(A[0]),
    "tanh": sp.tanh(A[0]),
    "sigmoid": sigmoid(A[0]),
    "relu": relu(A[0]),
    "gelu": _gelu(A[0]),
    "softplus": softplus(A[0]),
    "erf": sp.erf(A[0]),
    # min(a, b) = a [a < b] + b (1 - [a < b]): the derivative follows the smaller argument
    "min": A[0] * less(A[0], A[1]) + A[1] * (1 - less(A[0], A[1])),
    "max": A[1] * less(A[0], A[1]) + A[0] * (1 - less(A[0], A[1])),
}
CONSTANT = {"<", "<=", ">", ">=", "==", "!=", "and", "or", "sign"}  # piecewise constant: d = 0

_ARITY = {op: (2 if A[1] in e.free_symbols else 1) for op, e in DEFINITIONS.items()}
PARTIALS: dict[str, tuple[sp.Expr, ...]] = {
    op: tuple(sp.diff(e, A[k]) for k in range(_ARITY[op])) for op, e in DEFINITIONS.items()
}


def partials(n: P.Node) -> list[P.Node]:
    """The partial derivatives of elementwise node `n` with respect to each argument."""
    if n.op in CONSTANT:
        return [P.ZERO for _ in n.args]
    if n.op == "where":
        cond, a, b = n.args
        return [P.ZERO, P.where(cond, P.ONE, P.ZERO), P.where(cond, P.ZERO, P.ONE)]
    env = {A[k]: a for k, a in enumerate(n.args)}
    if n.op == "^" and n.args[1].is_const:  # d/da a^c = c a^(c-1); no log(a) term
        c = n.args[1].value
        return [P.mul(P.const(c), _pow(n.args[0], c - 1)), P.ZERO]
    d = [to_pexpr(e, env, n) for e in PARTIALS[n.op]]
    return TORCH_CONVENTIONS[n.op](*n.args, *d) if n.op in TORCH_CONVENTIONS else d


def _tie_split(a: P.Node, b: P.Node, first: str, second: str) -> list[P.Node]:
    """d min(a, b) (first, second = ">", "<") or d max(a, b) ("<", ">"), as torch
    differentiates them: the whole gradient to the chosen argument, half to each at a tie,
    and all of it to both where one is NaN (no comparison holds). Each is a mask (where(c,
    ., 0)), as torch's masked_fill: the outer derivative it selects away may be infinite."""
    share = P.where(P.ew("==", a, b), P.const(0.5), P.ONE)
    return [P.where(P.ew("==", P.ew(cmp, a, b), P.ZERO), share, P.ZERO)
            for cmp in (first, second)]


def _pow_partials(a: P.Node, b: P.Node, _, db: P.Node) -> list[P.Node]:
    """d a^b as torch.pow's backward: b a^(b-1) for the base (sympy's b a^b / a is 0/0 at
    a = 0), 0 where b = 0 (not 0 · 0^-1 = NaN); for the exponent 0 where a = 0 and b >= 0
    (not 0^b · log 0 = NaN)."""
    da = P.mul(b, P.ew("^", a, P.sub(b, P.ONE)))
    return [P.where(P.ew("==", b, P.ZERO), P.ZERO, da),
            P.where(P.ew("and", P.ew("==", a, P.ZERO), P.ew(">=", b, P.ZERO)), P.ZERO, db)]


# Derivatives where calculus leaves a choice (ties, zero bases): torch's, so that gradients
# agree with the reference's autograd; (args..., sympy's partials...) -> partials
TORCH_CONVENTIONS = {
    "min": lambda a, b, *_: _tie_split(a, b, ">", "<"),
    "max": lambda a, b, *_: _tie_split(a, b, "<", ">"),
    "^": _pow_partials,
}


def _pow(a: P.Node, c: float) -> P.Node:
    if c == 0:
        return P.ONE
    if c == 1:
        return a
    if c == 2:
        return P.mul(a, a)
    return P.ew("^", a, P.const(c))


def to_pexpr(e: sp.Expr, env: dict, origin: P.Node | None = None) -> P.Node:
    """A sympy expression (from DEFINITIONS/PARTIALS) as a plan expression; `env` maps
    symbols to nodes. If `e` is the op's own definition, the op node itself is reused."""
    if origin is not None and e == DEFINITIONS.get(origin.op):
        return origin
    if e in env:
        return env[e]
    if e.is_Number:
        return P.const(float(e))
    if e == sp.pi:
        return P.const(math.pi)
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
                return P.div(P.ONE, _pow(base, -c))
            return _pow(base, c)
        return P.ew("^", base, exp)
    name = {sp.exp: "exp", sp.log: "log", sp.sin: "sin", sp.cos: "cos", sp.tanh: "tanh",
            sp.erf: "erf", sigmoid: "sigmoid", softplus: "softplus", relu: "relu",
            sign: "sign", absf: "abs"}.get(e.func)
    if name is not None:
        if name == "exp" and origin is not None and origin.op == "exp" and args[0] is \
                origin.args[0]:
            return origin
        return P.ew(name, *args)
    if e.func is step:  # relu's derivative as torch's: 0 where x <= 0, else 1 (NaN too)
        return P.where(P.ew("<=", args[0], P.ZERO), P.ZERO, P.ONE)
    if e.func is less:
        return P.ew("<", args[0], args[1])
    if isinstance(e, sp.Abs):
        return P.ew("abs", *args)
    raise NotImplementedError(f"no plan expression for {e.func}")  # pragma: no cover
