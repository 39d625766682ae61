"""exp, log, sqrt, abs, the trigonometric functions and atan; erf and sign (of plans only: in
gelu's and abs' derivatives)."""

from __future__ import annotations

import math

from .entry import Elementwise, constant_partials

FUNCTIONS = [
    # the float32 kernels: a polynomial that vectorises and overflows to inf where expf does
    Elementwise(
        name="exp", arity=1, sympy=lambda S, x: S.exp(x), fold=math.exp,
        numpy=lambda np, x: np.exp(x), torch=lambda T, x: T.exp(x),
        tvm=lambda b, x: b.exp(x), let_depth=2),
    Elementwise(
        name="log", arity=1, sympy=lambda S, x: S.log(x),
        numpy=lambda np, x: np.log(x), torch=lambda T, x: T.log(x),
        tvm=lambda b, x: b.let(x, b.te.log)),
    Elementwise(
        name="sqrt", arity=1, sympy=lambda S, x: S.sqrt(x), fold=math.sqrt,
        numpy=lambda np, x: np.sqrt(x), torch=lambda T, x: T.sqrt(x),
        tvm=lambda b, x: b.let(x, b.te.sqrt)),
    Elementwise(
        name="abs", arity=1, sympy=lambda S, x: S.Abs(x), fold=abs,
        numpy=lambda np, x: np.abs(x), torch=lambda T, x: T.abs(x),
        tvm=lambda b, x: b.let(x, b.te.abs),
        signed=lambda P, a, s: a if s > 0 else P.neg(a)),
    Elementwise(
        name="sin", arity=1, sympy=lambda S, x: S.sin(x),
        numpy=lambda np, x: np.sin(x), torch=lambda T, x: T.sin(x),
        tvm=lambda b, x: b.let(x, b.te.sin)),
    Elementwise(
        name="cos", arity=1, sympy=lambda S, x: S.cos(x),
        numpy=lambda np, x: np.cos(x), torch=lambda T, x: T.cos(x),
        tvm=lambda b, x: b.let(x, b.te.cos)),
    Elementwise(
        name="tanh", arity=1, sympy=lambda S, x: S.tanh(x),
        numpy=lambda np, x: np.tanh(x), torch=lambda T, x: T.tanh(x),
        tvm=lambda b, x: b.tanh(x), let_depth=2, module=lambda nn: nn.Tanh()),
    # atan(±inf) = ±π/2, atan(NaN) = NaN
    Elementwise(
        name="atan", arity=1, sympy=lambda S, x: S.atan(x),
        numpy=lambda np, x: np.arctan(x), torch=lambda T, x: T.atan(x),
        tvm=lambda b, x: b.libm("atan", x)),
    Elementwise(
        name="erf", arity=1, syntax="internal", sympy=lambda S, x: S.erf(x),
        torch=lambda T, x: T.erf(x), tvm=lambda b, x: b.erf(x), let_depth=1),
    # torch.sign(NaN) is 0, as in the kernels
    Elementwise(
        name="sign", arity=1, syntax="internal", sympy=lambda S, x: S.sign(x),
        partials=constant_partials, torch=lambda T, x: T.sign(x),
        tvm=lambda b, x: b.let(x, lambda x: b.tirx.Select(
            x > b.c(0.0), b.c(1.0), b.tirx.Select(x < b.c(0.0), b.c(-1.0), b.c(0.0)))),
        let_depth=1),
]
