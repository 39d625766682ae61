"""sigmoid, relu, gelu, softplus: kept opaque in sympy (with their stable derivatives), and
allowed as mlp activations (with tanh, silu and identity; see `itdsl.functions.MLP_ONLY`)."""

from __future__ import annotations

import math

from .entry import Elementwise, Opaque


def _gelu_written(T, x):
    return 0.5 * x * (1 + T.erf(x * (1 / math.sqrt(2.0))))


def _gelu_fused(T, x):
    """x/2 · (1 + erf(x/√2)) by torch's one fused `gelu`, with the written-out formula's
    special values: the sign of x on a zero (−30 gives −0.0) and +inf at +inf (F.gelu has
    given NaN there in float32 on some vector paths); NaN at −inf and at NaN, as the
    formula. No branch on the values (torch.compile, torch.func): the +inf fix-up is left
    out only where a probe showed F.gelu right there (`_gelu_keeps_inf`)."""
    out = T.nn.functional.gelu(x).copysign_(x)
    if _gelu_keeps_inf(T, x.dtype, x.device):
        return out
    return T.where(x == math.inf, x, out)


_GELU_INF: dict = {}  # (dtype, device) → whether F.gelu gives +inf at +inf on every lane


def _gelu_keeps_inf(T, dtype, device) -> bool:
    """Whether torch's gelu maps +inf to +inf here, on every lane of its vector loops and
    their tails (probed once per dtype and device, on vectors of 1 to 80 elements): then no
    fix-up pass is needed."""
    key = (dtype, str(device))
    if key not in _GELU_INF:
        with T.no_grad():
            _GELU_INF[key] = all(
                bool(T.isposinf(T.nn.functional.gelu(
                    T.full((n,), math.inf, dtype=dtype, device=device))).all())
                for n in range(1, 81))
    return _GELU_INF[key]


_GELU_FUNCTION: dict = {}  # the torch module → its autograd Function (made on first use)


def _gelu_function(T):
    """An autograd Function of the gelu whose backward is torch's one fused
    `gelu_backward` (itself differentiable, so double backward works), not autograd through
    the five ops of the formula: 3–4× less time and memory on the pair tensors of the
    materialised paths. Its gradient is the formula's, NaN at ±inf as the formula's.
    (`setup_context` and a generated vmap rule: torch.func's transforms take it.)"""
    if T not in _GELU_FUNCTION:
        class Gelu(T.autograd.Function):
            generate_vmap_rule = True

            @staticmethod
            def forward(x):
                return _gelu_fused(T, x)

            @staticmethod
            def setup_context(ctx, inputs, output):
                ctx.save_for_backward(inputs[0])

            @staticmethod
            def backward(ctx, grad):
                (x,) = ctx.saved_tensors
                return T.ops.aten.gelu_backward(grad, x)
        _GELU_FUNCTION[T] = Gelu
    return _GELU_FUNCTION[T]


def _gelu_torch(T, x):
    """The exact (erf) gelu with the written-out formula's values (`_gelu_fused`),
    differentiated by torch's fused `gelu_backward` (`_gelu_function`). While torch.compile
    traces, the formula as written: the compiler fuses it, and traces no Function."""
    if T.compiler.is_compiling():
        return _gelu_written(T, x)
    if T.is_grad_enabled() and x.requires_grad:
        return _gelu_function(T).apply(x)
    return _gelu_fused(T, x)


def _gelu_numpy(np, x):
    return 0.5 * x * (1 + np.vectorize(math.erf, otypes=[float])(x / math.sqrt(2)))


FUNCTIONS = [
    Elementwise(
        name="sigmoid", arity=1,
        opaque=Opaque(formula=lambda S, z: 1 / (1 + S.exp(-z)),
                      derivative=lambda S, f, z: f * (1 - f), sign="positive"),
        numpy=lambda np, z: 1 / (1 + np.exp(-z)), torch=lambda T, x: T.sigmoid(x),
        tvm=lambda b, x: b.c(1.0) / (b.c(1.0) + b.exp(-x)), let_depth=2,
        module=lambda nn: nn.Sigmoid()),
    # relu(NaN) = NaN (x < 0 is false for NaN); its derivative is torch's: 0 where x <= 0
    # (at 0 too), else 1, so a NaN argument passes the gradient through
    Elementwise(
        name="relu", arity=1,
        opaque=Opaque(formula=lambda S, z: S.Max(z, 0),
                      derivative=lambda S, f, z: S.Lt0(-z), sign="nonnegative"),
        # (a mask, where(not [x <= 0], 1, 0): the cotangent goes inside it, so a NaN
        # cotangent gives 0 where x <= 0, as torch's threshold_backward selects)
        partials=lambda P, args, d: [P.where(
            P.ew("==", P.ew("<=", args[0], P.ZERO), P.ZERO), P.ONE, P.ZERO)],
        numpy=lambda np, z: np.maximum(z, 0), torch=lambda T, x: T.relu(x),
        tvm=lambda b, x: b.let(x, lambda x: b.tirx.Select(x < b.c(0.0), b.c(0.0), x)),
        let_depth=1, module=lambda nn: nn.ReLU(),
        signed=lambda P, a, s: a if s > 0 else P.zeros(a.shape)),
    # the exact (erf) form, as torch's default: written out in sympy, numpy and TVM; torch's
    # fused gelu with the formula's special values in torch (see _gelu_torch)
    Elementwise(
        name="gelu", arity=1,
        opaque=Opaque(formula=lambda S, z: z * (1 + S.erf(z / S.sqrt(2))) / 2, expand=True),
        numpy=_gelu_numpy, torch=_gelu_torch,
        tvm=lambda b, x: b.let(x, lambda x: b.c(0.5) * x * (
            b.c(1.0) + b.erf(x * b.c(1 / math.sqrt(2.0))))),
        let_depth=2, module=lambda nn: nn.GELU()),
    # log(1 + e^x), and x itself beyond 20 (as torch); the derivative sigmoid never overflows
    Elementwise(
        name="softplus", arity=1,
        opaque=Opaque(formula=lambda S, z: S.log(1 + S.exp(z)),
                      derivative=lambda S, f, z: S.sigmoid(z), sign="positive"),
        numpy=lambda np, z: np.logaddexp(0, z),
        torch=lambda T, x: T.nn.functional.softplus(x),
        tvm=lambda b, x: b.let(x, b.softplus), let_depth=3,
        module=lambda nn: nn.Softplus()),
]
