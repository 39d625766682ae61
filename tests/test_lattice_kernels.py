"""Pair kernels that read input fields at computed integer points (`read` nodes: the
stencils and strided reads of language version 1), against torch's own convolutions.

Every operator is compiled for the CPU with strategy="dense", so that the TVM pair
kernels run (whatever a convolution strategy would do): forward and gradients are
compared with `F.conv1d/2d/3d` written independently of itdsl, in float64 and float32,
and with the Plan evaluator (`evaluate_plan`), NaN and inf included.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import itdsl
from itdsl.runtime.binding import bind
from itdsl.runtime.params import spline_eval
from itdsl.runtime.plan_eval import evaluate_backward, evaluate_plan

DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-4, atol=2e-4)}

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

BLUR2D = (EXAMPLES / "blur2d.it").read_text()  # the example, as written

INTEGRAL_CONV3X3 = (EXAMPLES / "integral_conv3x3.it").read_text()  # the example, as written

# reads at 2q + t (stride 2), p - t (a flipped kernel), p + t - 1 (shifted), in 1, 2 and 3
# axes; the kernels K(t) = exp(a . t) are not symmetric, so a flip or a shift would show
READS = """
operator stride2 {
    domain P = index(2)
    domain Q = index(2)
    domain T = stencil(3, 3)
    input  f : P -> R^3
    param  a : R^2 = 0.3
    output g(q: Q) = integral(t: T) exp(a[0] * t[0] + a[1] * t[1]) * f(2 * q + t)
}

operator flipped {
    domain P = index(2)
    domain T = stencil(3, 3)
    input  f : P -> R
    param  a : R^2 = 0.3
    output g(p: P) = integral(t: T) exp(a[0] * t[0] + a[1] * t[1]) * f(p - t)
}

operator shifted {
    domain P = index(2)
    domain T = stencil(3, 3)
    input  f : P -> R^2
    param  a : R^2 = 0.3
    output g(p: P) = integral(t: T) exp(a[0] * t[0] + a[1] * t[1]) * f(p + t - 1)
}

operator line {
    domain P = index
    domain T = stencil(5)
    input  f : P -> R^2
    param  a : R = 0.3
    output g(p: P) = integral(t: T) exp(a * t) * f(p + t)
}

operator cube {
    domain P = index(3)
    domain T = stencil(3, 3, 3)
    input  f : P -> R
    param  a : R^3 = 0.3
    output g(p: P) = integral(t: T) exp(a[0] * t[0] + a[1] * t[1] + a[2] * t[2]) * f(p + t)
}

operator scaled {
    domain P = index(2)
    domain T = stencil(3, 3)
    input  f : P -> R
    input  s : P -> R
    output g(p: P) = integral(t: T) s(p) * exp(-sqnorm(t)) * f(p + t)
}
"""


@functools.cache
def _program(src: str):
    return itdsl.compile_source(src, target="cpu", strategy="dense")


def compiled(src: str, name: str, dtype: torch.dtype, seed: int = 0):
    """A fresh module of operator `name` (the general path forced), params perturbed."""
    op = _program(src)[name].to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in op.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return op


def run(op, inputs: dict, cot_seed: int = 7):
    """Output and gradients (inputs in order, then params) of the compiled op for a random
    cotangent; the op must have run its kernels."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()
              if isinstance(v, torch.Tensor)}
    out = op(**{**inputs, **leaves})
    assert op.last_run == "kernels"
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(cot_seed),
                      dtype=out.dtype)
    params = dict(op.named_parameters())
    grads = torch.autograd.grad(out, [*leaves.values(), *params.values()], cot)
    names = [f"input:{k}" for k in leaves] + [f"param:{k}" for k in params]
    return out.detach(), dict(zip(names, grads)), cot


def reference_grads(fn, leaves: dict, cot):
    """Output and gradients of a torch function of `leaves` (name -> tensor)."""
    ts = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    out = fn(**ts)
    return out.detach(), dict(zip(ts, torch.autograd.grad(out, list(ts.values()), cot)))


def assert_matches_plan(op, inputs: dict, out, grads, cot, **tol):
    """The kernels' output and gradients equal the Plan evaluator's (NaN where it is)."""
    with torch.no_grad():
        bound = bind(op.ir, inputs, out.dtype)
        want, ev = evaluate_plan(op.plan, op, bound)
        wgrads = evaluate_backward(op.plan, ev, cot)
    torch.testing.assert_close(out, want, equal_nan=True, **tol)
    for key, g in grads.items():
        torch.testing.assert_close(g, wgrads[key], equal_nan=True, **tol)


def offsets(*sizes: int, dtype=torch.float64) -> list[torch.Tensor]:
    """The stencil offsets along each axis, broadcast to the stencil's shape."""
    axes = [torch.arange(k, dtype=dtype) - (k - 1) // 2 for k in sizes]
    return list(torch.meshgrid(*axes, indexing="ij"))


# ---- blur2d -------------------------------------------------------------------------------


def blur_reference(f, w):
    """Depthwise 5x5 Gaussian of widths w, channels last."""
    t0, t1 = offsets(5, 5, dtype=f.dtype)
    weight = torch.exp(-(t0 ** 2 + t1 ** 2)[None] / (2 * w[:, None, None] ** 2))  # [8, 5, 5]
    out = F.conv2d(f.permute(0, 3, 1, 2), weight[:, None], padding=2, groups=8)
    return out.permute(0, 2, 3, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_blur2d_equals_depthwise_conv2d(dtype):
    op = compiled(BLUR2D, "blur2d", dtype)
    with torch.no_grad():
        op.w.copy_(0.6 + torch.rand(8, generator=torch.Generator().manual_seed(3), dtype=dtype))
    x = torch.randn(2, 9, 7, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    out, grads, cot = run(op, {"f": x})
    want, wgrads = reference_grads(blur_reference, {"f": x, "w": op.w}, cot)
    torch.testing.assert_close(out, want, **TOL[dtype])
    torch.testing.assert_close(grads["input:f"], wgrads["f"], **TOL[dtype])
    torch.testing.assert_close(grads["param:w"], wgrads["w"], **TOL[dtype])
    assert_matches_plan(op, {"f": x}, out, grads, cot, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_blur2d_without_batch_and_with_two_batch_dims(dtype):
    op = compiled(BLUR2D, "blur2d", dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, 8, generator=g, dtype=dtype)
    out, _, _ = run(op, {"f": x})
    torch.testing.assert_close(out, blur_reference(x[None], op.w.detach())[0], **TOL[dtype])
    x = torch.randn(2, 3, 4, 6, 8, generator=g, dtype=dtype)
    out, _, _ = run(op, {"f": x})
    want = blur_reference(x.reshape(6, 4, 6, 8), op.w.detach()).reshape(2, 3, 4, 6, 8)
    torch.testing.assert_close(out, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_in_the_field(dtype):
    """A NaN at the point (0, 0) (where a masked-out read's clamped index points), +inf
    and -inf elsewhere: the outputs are NaN or inf exactly where torch's are, and the
    windows that miss them are finite; the gradients equal the Plan evaluator's."""
    op = compiled(BLUR2D, "blur2d", dtype)
    x = torch.randn(2, 12, 11, 8, generator=torch.Generator().manual_seed(4), dtype=dtype)
    x[0, 0, 0, :] = float("nan")
    x[0, 8, 9, 2] = float("inf")
    x[1, 6, 5, 3] = float("inf")
    x[1, 6, 6, 3] = -float("inf")
    out, grads, cot = run(op, {"f": x})
    want = blur_reference(x, op.w.detach())
    torch.testing.assert_close(out, want, equal_nan=True, **TOL[dtype])
    assert out[0, :3, :3, :].isnan().all() and not out[0, 3:].isnan().any()
    assert not out[0, :, 3:].isnan().any() and not out[1].isnan().all()
    assert out[0, 8, 9, 2] == float("inf") and out[1, 6, 5:7, 3].isnan().all()
    assert_matches_plan(op, {"f": x}, out, grads, cot, **TOL[dtype])


# ---- integral_conv3x3 ----------------------------------------------------------------------


def integral_conv_reference(f, W, c, n_u: int):
    """F.conv2d with weight[u, v, t0 + 1, t1 + 1] = q_v W(u_u, v_v, (t0, t1)), bias c(u_u)."""
    n_v = f.shape[1]
    u = torch.linspace(0, 1, n_u, dtype=f.dtype)
    v = torch.linspace(0, 1, n_v, dtype=f.dtype)
    h = 1.0 / (n_v - 1)
    q = torch.full((n_v,), h, dtype=f.dtype)
    q[0] = q[-1] = h / 2
    taps = [[spline_eval(W[a, b], [u[:, None], v[None, :]]) for b in range(3)] for a in range(3)]
    weight = torch.stack([torch.stack(row, -1) for row in taps], -2)  # [n_u, n_v, 3, 3]
    weight = weight * q[None, :, None, None]
    bias = spline_eval(c, [u])
    return F.conv2d(f, weight, bias, padding=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_integral_conv3x3_equals_conv2d(dtype):
    op = compiled(INTEGRAL_CONV3X3, "integral_conv3x3", dtype)
    x = torch.randn(2, 5, 6, 7, generator=torch.Generator().manual_seed(5), dtype=dtype)
    out, grads, cot = run(op, {"f": x, "U": 4})
    assert out.shape == (2, 4, 6, 7)

    def ref(f, W, c):
        return integral_conv_reference(f, W, c, 4)
    want, wgrads = reference_grads(ref, {"f": x, "W": op.W, "c": op.c}, cot)
    torch.testing.assert_close(out, want, **TOL[dtype])
    for key in ("f", "W", "c"):
        got = grads["input:f" if key == "f" else f"param:{key}"]
        torch.testing.assert_close(got, wgrads[key], **TOL[dtype])
    assert_matches_plan(op, {"f": x, "U": 4}, out, grads, cot, **TOL[dtype])


# ---- strided, flipped and shifted reads; one and three axes ------------------------------


def exp_taps(a, sizes):
    """K(t) = exp(a . t) on the stencil of `sizes`."""
    ts = offsets(*sizes, dtype=a.dtype)
    return torch.exp(sum(a[k] * ts[k] for k in range(len(sizes))))


def depthwise(conv, f, taps, channels_last: bool = True, **kw):
    """conv (F.conv1d/2d/3d) of a channels-last field (or a scalar one) with the same
    taps for every channel."""
    if not channels_last:
        f = f[..., None]
    C = f.shape[-1]
    out = conv(f.movedim(-1, 1), taps.expand(C, 1, *taps.shape), groups=C, **kw).movedim(1, -1)
    return out if channels_last else out[..., 0]


# Without batch dims where the Plan hoists a part of an index (2 q, -t, p - 1) into a
# per-point step: the Plan evaluator cannot read or scatter at such indices under a batch
# yet (`test_hoisted_index_parts_under_a_batch`).
CASES = {
    # name: (inputs, the reference of (f, a))
    "stride2": (lambda g, d: {"f": torch.randn(9, 8, 3, generator=g, dtype=d), "Q": (5, 4)},
                lambda f, a: depthwise(F.conv2d, f[None], exp_taps(a, (3, 3)), stride=2,
                                       padding=1)[0]),
    "flipped": (lambda g, d: {"f": torch.randn(7, 6, generator=g, dtype=d)},
                lambda f, a: depthwise(F.conv2d, f[None], exp_taps(a, (3, 3)).flip(0, 1),
                                       channels_last=False, padding=1)[0]),
    "shifted": (lambda g, d: {"f": torch.randn(6, 7, 2, generator=g, dtype=d)},
                lambda f, a: depthwise(F.conv2d, F.pad(f, (0, 0, 2, 0, 2, 0))[None],
                                       exp_taps(a, (3, 3)))[0]),
    "line": (lambda g, d: {"f": torch.randn(2, 11, 2, generator=g, dtype=d)},
             lambda f, a: depthwise(F.conv1d, f, exp_taps(a.reshape(1), (5,)), padding=2)),
    "cube": (lambda g, d: {"f": torch.randn(2, 5, 4, 6, generator=g, dtype=d)},
             lambda f, a: depthwise(F.conv3d, f, exp_taps(a, (3, 3, 3)), channels_last=False,
                                    padding=1)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_reads_equal_torch_convolutions(name, dtype):
    make, reference = CASES[name]
    op = compiled(READS, name, dtype)
    inputs = make(torch.Generator().manual_seed(6), dtype)
    out, grads, cot = run(op, inputs)
    want, wgrads = reference_grads(reference, {"f": inputs["f"], "a": op.a}, cot)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, **TOL[dtype])
    torch.testing.assert_close(grads["input:f"], wgrads["f"], **TOL[dtype])
    torch.testing.assert_close(grads["param:a"], wgrads["a"].reshape(op.a.shape), **TOL[dtype])
    assert_matches_plan(op, inputs, out, grads, cot, **TOL[dtype])


def test_hoisted_index_parts_under_a_batch():
    """Per-point steps holding parts of an index (`2*q[0]`) are expanded over the batch."""
    dtype = torch.float64
    op = compiled(READS, "stride2", dtype)
    f = torch.randn(2, 9, 8, 3, generator=torch.Generator().manual_seed(9), dtype=dtype)
    out, grads, cot = run(op, {"f": f, "Q": (5, 4)})
    want, wgrads = reference_grads(
        lambda f, a: depthwise(F.conv2d, f, exp_taps(a, (3, 3)), stride=2, padding=1),
        {"f": f, "a": op.a}, cot)
    torch.testing.assert_close(out, want, **TOL[dtype])
    torch.testing.assert_close(grads["input:f"], wgrads["f"], **TOL[dtype])
    torch.testing.assert_close(grads["param:a"], wgrads["a"], **TOL[dtype])
    assert_matches_plan(op, {"f": f, "Q": (5, 4)}, out, grads, cot, **TOL[dtype])


def test_read_field_broadcast_over_the_batch():
    """A field read at computed points with batch [2, 1] beside one with batch [3]: the
    kernel's table holds it for every entry of the batch [2, 3]."""
    dtype = torch.float64
    op = compiled(READS, "scaled", dtype)
    g = torch.Generator().manual_seed(8)
    f = torch.randn(2, 1, 5, 6, generator=g, dtype=dtype)
    s = torch.randn(3, 5, 6, generator=g, dtype=dtype)
    out, grads, cot = run(op, {"f": f, "s": s})

    def ref(f, s):
        taps = torch.exp(-sum(t ** 2 for t in offsets(3, 3, dtype=dtype)))
        blurred = F.conv2d(f.reshape(-1, 1, 5, 6), taps[None, None], padding=1)
        return s * blurred.reshape(2, 1, 5, 6)
    want, wgrads = reference_grads(ref, {"f": f, "s": s}, cot)
    assert out.shape == (2, 3, 5, 6)
    torch.testing.assert_close(out, want, **TOL[dtype])
    torch.testing.assert_close(grads["input:f"], wgrads["f"], **TOL[dtype])
    torch.testing.assert_close(grads["input:s"], wgrads["s"], **TOL[dtype])
    assert_matches_plan(op, {"f": f, "s": s}, out, grads, cot, **TOL[dtype])
