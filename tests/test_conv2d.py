"""lattice_conv: convolutions on index(D) lattices run as library calls (F.conv1d/2d/3d,
torch.fft) and equal torch written here independently, forward and gradients: depthwise
(blur2d), full (the INN layer integral_conv3x3, its weights sampled from the splines by a
cubic-convolution kernel written here), strided, dilated, offset and flipped reads, 1-D and
3-D lattices, kernels of p − q by FFT or over a bracket's support. The sampled weights are
kept in inference and resampled when a param changes; a kernel that is not a function of
p − q is not taken.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from util import gradcheck_op, keys_spline

import itdsl
import itdsl.runtime.strategies.lattice_conv as LC
import itdsl.runtime.strategies.tuning as T
from itdsl.runtime.binding import bind
from itdsl.runtime.plan_eval import evaluate_plan
from itdsl.symbolic.strategies.lattice_conv import LagConv, StencilConv

D = torch.float64


# the two programs of the language's version 1 (examples/blur2d.it, examples/integral_conv3x3.it)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

BLUR2D = (EXAMPLES / "blur2d.it").read_text()  # the example, as written
INTEGRAL_CONV3X3 = (EXAMPLES / "integral_conv3x3.it").read_text()  # the example, as written


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _op(src: str, name: str | None = None):
    """A fresh float64 module of the operator in `src` (random params: not all 1)."""
    name = name or re.search(r"operator (\w+)", src).group(1)
    op = itdsl.compile_source(src, target="cpu")[name].double()
    g = _gen(7)
    with torch.no_grad():
        for p in op.parameters():
            p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=D))
    return op


def _check(op, kw: dict, want_fn, rtol=1e-10, atol=1e-11, run=None):
    """op(**kw) (or `run(**kw)`: op compiled) equals want_fn(inputs, params) forward, and its
    gradients (random cotangent) with respect to every tensor input and param."""
    tensors = {k: v.clone().requires_grad_(True) for k, v in kw.items()
               if isinstance(v, torch.Tensor)}
    call = {**kw, **tensors}
    params = dict(op.named_parameters())
    out = (op if run is None else run)(**call)
    assert op.strategy == "lattice_conv" and op.last_run == "lattice_conv"
    want = want_fn(call, params)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=rtol, atol=atol)
    cot = torch.randn(out.shape, generator=_gen(3), dtype=D)
    leaves = [*tensors.values(), *params.values()]
    got = torch.autograd.grad(out, leaves, cot, allow_unused=True)
    exp = torch.autograd.grad(want, leaves, cot, allow_unused=True)
    for a, b in zip(got, exp):
        if b is None:
            assert a is None or not a.abs().any()
            continue
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def by_definition(f: torch.Tensor, K: torch.Tensor, stride, sign, dil, offset, taps0, n_out):
    """The definition, by gathering: out[b, p, c] = Σ_t K[t, c] · f[b, c·p + s·δ·t + d, c],
    0 where the point is outside the lattice. `f` [B, *L, C], `K` [*taps, C]."""
    Dm = len(n_out)
    L = f.shape[1:1 + Dm]
    ks = K.shape[:Dm]
    ps = torch.stack(torch.meshgrid(*[torch.arange(n) for n in n_out], indexing="ij"), -1)
    out = 0
    for k in torch.cartesian_prod(*[torch.arange(k) for k in ks]).reshape(-1, Dm):
        t = k + torch.tensor(taps0)
        idx = (torch.tensor(stride) * ps + torch.tensor(sign) * torch.tensor(dil) * t
               + torch.tensor(offset))
        inside = ((idx >= 0) & (idx < torch.tensor(L))).all(-1)
        idx = torch.where(inside[..., None], idx, torch.zeros_like(idx))
        vals = f[(slice(None), *idx.unbind(-1))]  # [B, *n_out, C]
        out = out + torch.where(inside[None, ..., None], vals, 0) * K[tuple(k)]
    return out


# ---- blur2d: a depthwise 2-D convolution ----------------------------------------------------------


def test_blur2d_is_a_depthwise_conv2d():
    op = _op(BLUR2D)
    assert isinstance(op.plan.form[0], StencilConv) and op.plan.form[0].mode == "depthwise"
    f = torch.randn(3, 11, 13, 8, generator=_gen(), dtype=D)

    def want(kw, params):
        t = torch.arange(-2, 3, dtype=D)
        sq = t[:, None] ** 2 + t[None, :] ** 2
        w = torch.exp(-sq / (2 * params["w"][:, None, None] ** 2))  # [8, 5, 5]
        x = kw["f"].permute(0, 3, 1, 2)
        return F.conv2d(x, w[:, None], padding=2, groups=8).permute(0, 2, 3, 1)

    _check(op, {"f": f}, want)
    text = itdsl.compile_source(BLUR2D, target="cpu").explain("blur2d")
    assert "strategy: lattice_conv" in text and "F.conv2d(groups=8)" in text


def test_batch_dims_broadcast_and_may_be_absent():
    op = _op(BLUR2D)
    params = dict(op.named_parameters())
    f = torch.randn(2, 3, 6, 7, 8, generator=_gen(), dtype=D)
    out = op(f=f)
    assert out.shape == (2, 3, 6, 7, 8)
    ref, _ = evaluate_plan(op.plan, params, bind(op.ir, {"f": f}))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op(f=f[1, 2]), out[1, 2], rtol=1e-12, atol=1e-13)


# ---- the INN layer: a full convolution with weights sampled from splines --------------------------


def inn_weights(W: torch.Tensor, c: torch.Tensor, nu: int, nv: int):
    """weight[u, v, t0 + 1, t1 + 1] = q_v · W_t(u_u, v_v), bias[u] = c(u_u)."""
    u = torch.linspace(0, 1, nu, dtype=D)
    v = torch.linspace(0, 1, nv, dtype=D)
    q = torch.full((nv,), 1 / (nv - 1), dtype=D)
    q[0] = q[-1] = 0.5 / (nv - 1)
    # W [3, 3, 16, 16]: W_t(u, v) = Σ_ij basis_i(u) W_t[i, j] basis_j(v)
    Wv = keys_spline(W, v)  # [3, 3, 16, nv]
    Wuv = keys_spline(Wv.transpose(-1, -2), u)  # [3, 3, nv, nu]
    weight = Wuv.permute(3, 2, 0, 1) * q[None, :, None, None]
    return weight, keys_spline(c, u)


@pytest.mark.parametrize("nu,nv,hw", [(5, 7, (9, 11)), (16, 3, (4, 6))])
def test_integral_conv3x3_is_conv2d_with_the_sampled_weights(nu, nv, hw):
    op = _op(INTEGRAL_CONV3X3)
    assert op.plan.form[0].mode == "full"
    x = torch.randn(2, nv, *hw, generator=_gen(), dtype=D)

    def want(kw, params):
        weight, bias = inn_weights(params["W"], params["c"], nu, nv)
        return F.conv2d(kw["f"], weight, bias, padding=1)

    _check(op, {"f": x, "U": nu}, want)


def test_weights_are_sampled_once_per_param_version_in_inference(monkeypatch):
    op = _op(INTEGRAL_CONV3X3)
    calls = [0]
    sample = LC.sample_stencil

    def counted(*a, **k):
        calls[0] += 1
        return sample(*a, **k)

    monkeypatch.setattr(LC, "sample_stencil", counted)
    x = torch.randn(2, 6, 8, 8, generator=_gen(), dtype=D)

    def want():
        weight, bias = inn_weights(op.W.detach(), op.c.detach(), 5, 6)
        return F.conv2d(x, weight, bias, padding=1)

    with torch.no_grad():
        a = op(f=x, U=5)
        b = op(f=x, U=5)
        assert calls[0] == 1
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        op(f=x[:, :, :5], U=5)  # another lattice size: the same weights
        assert calls[0] == 1
        op(f=x, U=4)  # another channel size: sampled again
        assert calls[0] == 2
        op(f=x, U=5)
        assert calls[0] == 3
        op.W += 0.25  # an in-place change bumps the version
        out = op(f=x, U=5)
        assert calls[0] == 4
        torch.testing.assert_close(out, want(), rtol=1e-10, atol=1e-11)
    op.W.data += 0.25  # `.data` keeps the version counter: the values are compared
    with torch.no_grad():
        out = op(f=x, U=5)
        assert calls[0] == 5
        torch.testing.assert_close(out, want(), rtol=1e-10, atol=1e-11)
        op(f=x, U=5)
        assert calls[0] == 5
    # while autograd records, every call samples (the gradients reach the params)
    op(f=x, U=5).sum().backward()
    op(f=x, U=5)
    assert calls[0] == 7 and op.W.grad is not None and op.W.grad.abs().sum() > 0


# ---- strides, offsets, flips, dilation; 1-D and 3-D lattices ------------------------------------

STRIDED = """operator strided {
    domain P = index(2)
    domain Q = index(2)
    domain T = stencil(3, 3)
    input f : P -> R^4
    param w : R^4 = 1.0
    output g(q: Q) = integral(t: T) exp(-sqnorm(t) * w) * f(2*q + t - 1)
}"""


def _gauss_taps(w: torch.Tensor, ks, weights=None) -> torch.Tensor:
    """exp(-|t|² w) at the offsets of a stencil of sizes `ks`: [*ks, C]."""
    axes = [torch.arange(k, dtype=D) - (k - 1) // 2 for k in ks]
    t = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    return torch.exp(-(t**2).sum(-1)[..., None] * w)


@pytest.mark.parametrize("q", [(5, 6), (3, 3), (8, 9)])
def test_a_strided_read_is_conv2d_with_stride_2(q):
    op = _op(STRIDED)
    f = torch.randn(2, 10, 12, 4, generator=_gen(), dtype=D)

    def want(kw, params):
        w = _gauss_taps(params["w"], (3, 3)).permute(2, 0, 1)[:, None]  # [4, 1, 3, 3]
        x = F.pad(kw["f"].permute(0, 3, 1, 2), (2, 2 * q[1], 2, 2 * q[0]))
        out = F.conv2d(x, w, stride=2, groups=4)[..., :q[0], :q[1]]  # read 2q + t − 1
        return out.permute(0, 2, 3, 1)

    _check(op, {"f": f, "Q": q}, want)
    assert op.plan.form[0].stride == (2, 2) and op.plan.form[0].offset == (-1, -1)


FLIP = """operator flip {
    domain P = index(2)
    domain T = stencil(3, 5)
    input f : P -> R
    param a : R = 0.3
    output g(p: P) = integral(t: T) exp(a * t[0] - t[1]^2 / 4) * f(p - t)
}"""


def test_a_read_at_p_minus_t_is_a_flipped_kernel():
    op = _op(FLIP)
    f = torch.randn(3, 9, 10, generator=_gen(), dtype=D)

    def want(kw, params):
        t0 = torch.arange(-1, 2, dtype=D)[:, None]
        t1 = torch.arange(-2, 3, dtype=D)[None, :]
        K = torch.exp(params["a"] * t0 - t1**2 / 4)
        # Σ_t K(t) f(p − t) is a true convolution: F.conv2d correlates with the flipped K
        return F.conv2d(kw["f"][:, None], K.flip(0, 1)[None, None], padding=(1, 2))[:, 0]

    _check(op, {"f": f}, want)
    assert op.plan.form[0].flip == (True, True)


OFFSET = """operator offset {
    domain P = index(2)
    domain T = stencil(3, 3)
    input f : P -> R^2
    param k : R^2 = 1.0
    output g(p: P) = integral(t: T) (k / (1 + sqnorm(t))) * f(p + t - 1)
}"""


def test_an_offset_read_pads_on_one_side_and_crops_on_the_other():
    op = _op(OFFSET)
    f = torch.randn(2, 7, 8, 2, generator=_gen(), dtype=D)

    def want(kw, params):
        t = torch.arange(-1, 2, dtype=D)
        K = (1 / (1 + t[:, None] ** 2 + t[None, :] ** 2))[None] * params["k"][:, None, None]
        x = F.pad(kw["f"].permute(0, 3, 1, 2), (2, 0, 2, 0))  # f(p + t − 1): 2 zeros before
        return F.conv2d(x, K[:, None], groups=2).permute(0, 2, 3, 1)

    _check(op, {"f": f}, want)


DILATED = """operator dilated {
    domain P = index(2)
    domain T = stencil(3, 3)
    input f : P -> R^3
    param w : R^3 = 1.0
    output g(p: P) = integral(t: T) exp(-sqnorm(t) * w) * f(p + 2*t)
}"""


def test_a_read_at_p_plus_2t_is_dilated():
    op = _op(DILATED)
    f = torch.randn(2, 9, 8, 3, generator=_gen(), dtype=D)

    def want(kw, params):
        w = _gauss_taps(params["w"], (3, 3)).permute(2, 0, 1)[:, None]
        x = kw["f"].permute(0, 3, 1, 2)
        return F.conv2d(x, w, padding=2, dilation=2, groups=3).permute(0, 2, 3, 1)

    _check(op, {"f": f}, want)


CONV1D = """operator c1 {
    domain P = index
    domain T = stencil(5)
    input f : P -> R^3
    param a : R^3 = 0.3
    output g(p: P) = integral(t: T) exp(-a * t^2) * f(p + t)
}"""

CONV3D = """operator c3 {
    domain P = index(3)
    domain T = stencil(3, 3, 5)
    input f : P -> R^2
    param a : R^2 = 0.3
    output g(p: P) = integral(t: T) exp(-a * sqnorm(t)) * f(p + t)
}"""


def test_index_and_index3_lattices_are_conv1d_and_conv3d():
    op = _op(CONV1D)
    f = torch.randn(4, 17, 3, generator=_gen(), dtype=D)

    def want1(kw, params):
        K = _gauss_taps(params["a"], (5,)).t()[:, None]  # [3, 1, 5]
        return F.conv1d(kw["f"].transpose(1, 2), K, padding=2, groups=3).transpose(1, 2)

    _check(op, {"f": f}, want1)
    op = _op(CONV3D)
    f = torch.randn(2, 5, 6, 7, 2, generator=_gen(), dtype=D)

    def want3(kw, params):
        K = _gauss_taps(params["a"], (3, 3, 5)).permute(3, 0, 1, 2)[:, None]
        return F.conv3d(kw["f"].permute(0, 4, 1, 2, 3), K, padding=(1, 1, 2),
                        groups=2).permute(0, 2, 3, 4, 1)

    _check(op, {"f": f}, want3)


# ---- the channel layouts, against the definition -----------------------------------------------------

LAYOUTS = {
    # a channel domain after the lattice, the output's channel domain after its lattice
    "channels_last": """operator cl {
        domain U = grid(0, 1)
        domain V = index
        domain P = index(2)
        domain T = stencil(3, 3)
        input f : P * V -> R
        param s : R = 0.7
        output g(p: P, u: U) = integral(v: V, t: T) cos(s * u * (v + 1)) * exp(-sqnorm(t)) * f(p + t, v)
    }""",
    # one group per u: the field's channel domain read at the output's u
    "grouped": """operator gr {
        domain U = index
        domain P = index(2)
        domain T = stencil(3, 3)
        input f : U * P -> R^2
        param s : R = 0.7
        output g(u: U, p: P) = integral(t: T) exp(-s * (u + 1) * sqnorm(t)) * f(u, p - t + 1)
    }""",
    # K of R^C times a scalar field: C output channels from one input channel
    "vector_kernel": """operator vk {
        domain P = index(2)
        domain T = stencil(3, 3)
        input f : P -> R
        param s : R^3 = 0.7
        output g(p: P) = integral(t: T) exp(-s * sqnorm(t)) * f(2*p + t)
    }""",
    # channels mixed with R^C channels too, the taps before V; times a factor of p after
    "mixed_vector": """operator mv {
        domain U = grid(0, 1)
        domain V = grid(-1, 1)
        domain P = index(2)
        domain T = stencil(1, 3)
        input f : V * P -> R^2
        param W : spline(6, 5, per = T)
        output g(u: U, p: P) = integral(t: T, v: V) W(u, (v + 1) / 2, t) * f(v, p + t) * (1 + p[1]) with (sum, simpson)
    }""",
    # the taps on an index lattice of the call's size, a bias and a residual
    "index_taps": """operator it {
        domain P = index(2)
        domain S = index(2)
        input f : P -> R
        input k : P -> R
        param b : R = 0.1
        output g(p: P) = b + k(p) + integral(s: S) exp(-(s[0] - s[1])^2) * f(p - s + 1)
    }""",
}


def _layout_inputs(name: str, batch: tuple, gen) -> dict:
    if name == "channels_last":
        return {"f": torch.randn(*batch, 6, 7, 4, generator=gen, dtype=D), "U": 5}
    if name == "grouped":
        return {"f": torch.randn(*batch, 4, 6, 7, 2, generator=gen, dtype=D)}
    if name == "vector_kernel":
        return {"f": torch.randn(*batch, 9, 8, generator=gen, dtype=D)}
    if name == "mixed_vector":
        return {"f": torch.randn(*batch, 5, 6, 7, 2, generator=gen, dtype=D), "U": 4}
    return {"f": torch.randn(*batch, 7, 6, generator=gen, dtype=D),
            "k": torch.randn(*batch, 7, 6, generator=gen, dtype=D), "S": (3, 2)}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_channel_layouts_equal_the_plan_evaluator(name):
    """Unbatched against the Plan evaluator (whose reads at hoisted indices do not take batch
    dims yet), batched against the unbatched calls."""
    op = _op(LAYOUTS[name])
    assert op.strategy == "lattice_conv", op.plan.verdict

    def want(call, params):
        return evaluate_plan(op.plan, params, bind(op.ir, call))[0]

    _check(op, _layout_inputs(name, (), _gen()), want)
    kw = _layout_inputs(name, (3,), _gen(1))
    out = op(**kw)
    for b in range(3):
        one = {k: v[b] if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        torch.testing.assert_close(out[b], op(**one), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("read,stride,sign,dil,offset", [
    ("3*q - 2*t + 2", 3, -1, 2, 2),  # strided, dilated, flipped, offset
    ("q + t + 9", 1, 1, 1, 9),  # partly outside the lattice
    ("2*q - t - 40", 2, -1, 1, -40),  # all outside: zeros
])
def test_the_definition_by_gathering_agrees(read, stride, sign, dil, offset):
    src = f"""operator sfo {{
        domain P = index(2)
        domain Q = index(2)
        domain T = stencil(5, 3)
        input f : P -> R^2
        param w : R^2 = 1.0
        output g(q: Q) = integral(t: T) exp(-sqnorm(t) * w) * f({read})
    }}"""
    op = _op(src)
    f = torch.randn(2, 13, 11, 2, generator=_gen(), dtype=D)

    def want(kw, params):
        K = _gauss_taps(params["w"], (5, 3))
        return by_definition(kw["f"], K, (stride,) * 2, (sign,) * 2, (dil,) * 2, (offset,) * 2,
                             (-2, -1), (6, 5))

    _check(op, {"f": f, "Q": (6, 5)}, want)


# ---- kernels of p − q: FFT or direct over the bracket's support ------------------------------------

GLOBAL = """operator glob {
    domain P = index(2)
    domain Q = index(2)
    input f : Q -> R^2
    param s : R = 4.0
    output g(p: P) = integral(q: Q) exp(-sqnorm(p - q) / s) * f(q)
}"""

COMPACT = """operator compact {
    domain P = index(2)
    input f : P -> R
    param s : R = 4.0
    output g(p: P) = integral(q: P) [abs(p[0] - q[0]) <= 2 and abs(p[1] - q[1]) <= 1] * exp(-sqnorm(p - q) / s) * cos(p[0] - q[0] + 0.5) * f(q)
}"""


def _pairwise(f: torch.Tensor, K, n_p) -> torch.Tensor:
    """Σ_q K(p − q) f[q] by the n_p × n_q pair tensor: f [B, *n_q, C?]."""
    nq = f.shape[1:1 + len(n_p)]
    p = torch.cartesian_prod(*[torch.arange(n, dtype=D) for n in n_p]).reshape(-1, len(n_p))
    q = torch.cartesian_prod(*[torch.arange(n, dtype=D) for n in nq]).reshape(-1, len(n_p))
    k = K(p[:, None, :] - q[None, :, :])  # [n, m]
    flat = f.reshape(f.shape[0], q.shape[0], -1)
    out = torch.einsum("nm,bmc->bnc", k, flat)
    return out.reshape(f.shape[0], *n_p, *f.shape[1 + len(n_p):])


@pytest.mark.parametrize("n_p,n_q", [((9, 8), (9, 8)), ((6, 11), (10, 7))])
def test_a_global_kernel_of_p_minus_q_runs_by_fft(n_p, n_q):
    op = _op(GLOBAL)
    assert isinstance(op.plan.form[0], LagConv)
    f = torch.randn(2, *n_q, 2, generator=_gen(), dtype=D)

    def want(kw, params):
        return _pairwise(kw["f"], lambda d: torch.exp(-(d**2).sum(-1) / params["s"]), n_p)

    _check(op, {"f": f, "P": n_p}, want)
    assert "FFT" in itdsl.compile_source(GLOBAL, target="cpu").explain("glob")


@pytest.mark.parametrize("taps", [1024, 4])
def test_a_bracketed_kernel_of_p_minus_q_runs_over_its_support(monkeypatch, taps):
    """Direct over the 5×3 support; with fewer taps allowed, by FFT: the same."""
    monkeypatch.setattr(T, "LATTICE_DIRECT_TAPS", taps)
    op = _op(COMPACT)
    f = torch.randn(3, 12, 9, generator=_gen(), dtype=D)
    kinds = []
    lag = LC.lag_kernel
    monkeypatch.setattr(LC, "lag_kernel", lambda *a: kinds.append(lag(*a)[0]) or lag(*a))

    def K(d, s):
        inside = (d[..., 0].abs() <= 2) & (d[..., 1].abs() <= 1)
        return torch.where(inside, torch.exp(-(d**2).sum(-1) / s) * torch.cos(d[..., 0] + 0.5), 0)

    def want(kw, params):
        return _pairwise(kw["f"][..., None], lambda d: K(d, params["s"]), (12, 9))[..., 0]

    _check(op, {"f": f}, want)
    assert kinds == ["direct" if taps > 15 else "fft"]


def test_lag_convolutions_equal_the_dense_kernels():
    """The same Plan on the generated kernels (they take kernels of p − q; not yet reads at
    computed points), small and large lattices."""
    op = _op(GLOBAL)
    dense = itdsl.compile_source(GLOBAL, target="cpu", strategy="dense")["glob"].double()
    dense.load_state_dict(op.state_dict())
    for n_q, n_p in (((4, 5), (3, 4)), ((17, 12), (15, 19))):
        f = torch.randn(2, *n_q, 2, generator=_gen(), dtype=D)
        out = op(f=f, P=n_p)
        assert op.last_run == "lattice_conv"
        torch.testing.assert_close(out, dense(f=f, P=n_p), rtol=1e-10, atol=1e-12)
        assert dense.last_run == "kernels"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_its_fft_in_float32(dtype):
    op = _op(GLOBAL)
    f = torch.randn(2, 9, 10, 2, generator=_gen(), dtype=D)
    want = op(f=f, P=(8, 11))
    out = op.to(dtype)(f=f.to(dtype), P=(8, 11))
    assert out.dtype == dtype and op.last_run == "lattice_conv"
    torch.testing.assert_close(out.double(), want.detach(), rtol=2e-2, atol=5e-2)


# ---- what is not a convolution -------------------------------------------------------------------------

NOT_TRANSLATION_INVARIANT = {
    "product": """operator nt {
        domain P = index(2)
        input f : P -> R
        param s : R = 4.0
        output g(p: P) = integral(q: P) exp(-sqnorm(p - q) / s) * (1 + p[0] * q[1]) * f(q)
    }""",
    "sum": """operator nt {
        domain P = index(2)
        input f : P -> R
        output g(p: P) = integral(q: P) exp(-(p[0] + q[0])^2) * f(q)
    }""",
    "axes_swapped": """operator nt {
        domain P = index(2)
        input f : P -> R
        output g(p: P) = integral(q: P) exp(-(p[0] - q[1])^2) * f(q)
    }""",
    "kernel_of_p": """operator nt {
        domain P = index(2)
        domain T = stencil(3, 3)
        input f : P -> R
        output g(p: P) = integral(t: T) exp(-sqnorm(t) * p[0]) * f(p + t)
    }""",
    "field_in_kernel": """operator nt {
        domain P = index(2)
        domain T = stencil(3, 3)
        input f : P -> R
        input a : T -> R
        output g(p: P) = integral(t: T) a(t) * f(p + t)
    }""",
}


@pytest.mark.parametrize("name", list(NOT_TRANSLATION_INVARIANT))
def test_a_kernel_that_is_not_a_convolution_runs_dense(name):
    src = NOT_TRANSLATION_INVARIANT[name]
    prog = itdsl.compile_source(src, target="cpu")
    assert prog["nt"].strategy == "dense"
    text = prog.explain("nt")
    assert "strategy: dense" in text and "not lattice-lag:" in text and "not stencil:" in text
    why = {"product": "not a function of p − q", "sum": "not a function of p − q",
           "axes_swapped": "not a function of p − q", "kernel_of_p": "depends on the output point",
           "field_in_kernel": "K reads the input `a`"}[name]
    assert why in text


# ---- gradcheck on small sizes ----------------------------------------------------------------------------


@pytest.mark.parametrize("src,kw", [
    (INTEGRAL_CONV3X3.replace("spline(16, 16,", "spline(4, 5,").replace("spline(16)", "spline(6)"),
     {"f": (1, 3, 4, 5), "U": 2}),
    (STRIDED, {"f": (1, 5, 6, 4), "Q": (3, 3)}),
    (FLIP, {"f": (2, 4, 6)}),
    (GLOBAL, {"f": (1, 7, 9, 2), "P": (8, 9)}),  # (over the tiny size of the kernels)
    (COMPACT, {"f": (1, 9, 8)}),
])
def test_gradcheck(src, kw):
    op = _op(src)
    gen = _gen()
    kw = {k: torch.randn(*v, generator=gen, dtype=D) if k == "f" else v for k, v in kw.items()}
    assert gradcheck_op(op, kw)
    assert op.last_run == "lattice_conv"


def test_everything_runs_in_float32_too():
    op = itdsl.compile_source(INTEGRAL_CONV3X3, target="cpu")["integral_conv3x3"]
    x = torch.randn(2, 8, 10, 10, generator=_gen())
    out = op(f=x, U=6)
    W, c = op.W.detach().double(), op.c.detach().double()
    weight, bias = inn_weights(W, c, 6, 8)
    want = F.conv2d(x.double(), weight, bias, padding=1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    assert math.isfinite(out.sum().item())


# ---- torch.compile ----------------------------------------------------------------------------


def _blur_want(kw, params):
    t = torch.arange(-2, 3, dtype=D)
    sq = t[:, None] ** 2 + t[None, :] ** 2
    w = torch.exp(-sq / (2 * params["w"][:, None, None] ** 2))
    return F.conv2d(kw["f"].permute(0, 3, 1, 2), w[:, None], padding=2,
                    groups=w.shape[0]).permute(0, 2, 3, 1)


def _strided_want(kw, params):
    w = _gauss_taps(params["w"], (3, 3)).permute(2, 0, 1)[:, None]
    x = F.pad(kw["f"].permute(0, 3, 1, 2), (2, 2 * 3, 2, 2 * 4))
    return F.conv2d(x, w, stride=2, groups=4)[..., :4, :3].permute(0, 2, 3, 1)


def _global_want(kw, params):
    return _pairwise(kw["f"], lambda d: torch.exp(-(d**2).sum(-1) / params["s"]), (5, 6))


@pytest.mark.parametrize("case", ["strided", "global"])
def test_torch_compile_fullgraph(case):
    """A (strided) stencil convolution and an FFT one under torch.compile(fullgraph=True):
    forward and gradients as the library computes them; in inference, a change of the params
    is seen (the compiled graph samples the weights on every call: nothing is kept)."""
    src, want, kw = {"blur": (BLUR2D, _blur_want, {"f": torch.randn(2, 7, 6, 8, generator=_gen(),
                                                                   dtype=D)}),
                     "strided": (STRIDED, _strided_want,
                                 {"f": torch.randn(2, 9, 7, 4, generator=_gen(), dtype=D),
                                  "Q": (4, 3)}),
                     "global": (GLOBAL, _global_want,
                                {"f": torch.randn(2, 4, 7, 2, generator=_gen(), dtype=D),
                                 "P": (5, 6)})}[case]
    op = _op(src)
    compiled = torch.compile(op, fullgraph=True)
    _check(op, kw, want, run=compiled)
    with torch.no_grad():
        compiled(**kw)
        for p in op.parameters():
            p.mul_(1.25)
        torch.testing.assert_close(compiled(**kw), want(kw, dict(op.named_parameters())),
                                   rtol=1e-10, atol=1e-11)


# ---- channel axes at the call's nodes (an INN with a trainable grid) ----------------------------

NODES = """operator nodes {
    domain U = points(1)
    domain V = points(1)
    domain P = index(2)
    domain T = stencil(3, 3)
    input  f : V * P -> R
    input  q : V -> R
    param  W : spline(8, 6, per = T)
    param  c : spline(8)
    output g(u: U, p: P) = c(u[0]) + integral(v: V, t: T) W(u[0], v[0], t) * f(v, p + t) with (weights(q), sum)
}"""


def _nodes_want(kw, params):
    """F.conv2d with weight[u, v, t] = q_v · W_t(U_u, V_v), bias c(U_u), the splines
    evaluated at the given nodes by the test's own cubic convolution."""
    u, v = kw["U"][:, 0], kw["V"][:, 0]
    Wv = keys_spline(params["W"], v)  # [3, 3, 8, n_v]
    Wuv = keys_spline(Wv.transpose(-1, -2), u)  # [3, 3, n_v, n_u]
    weight = Wuv.permute(3, 2, 0, 1) * kw["q"][None, :, None, None]
    return F.conv2d(kw["f"], weight, keys_spline(params["c"], u), padding=1)


def test_channel_axes_at_given_nodes_and_weights():
    """U and V as points domains (the nodes a call gives, e.g. a trained grid) and V's
    quadrature weights from an input: the library convolution, gradients reaching the
    nodes and the weights."""
    op = _op(NODES)
    g = _gen(4)
    kw = {"f": torch.randn(2, 5, 6, 7, generator=g, dtype=D),
          "U": torch.rand(4, 1, generator=g, dtype=D).sort(0).values,
          "V": torch.rand(5, 1, generator=g, dtype=D).sort(0).values,
          "q": 0.1 + torch.rand(5, generator=g, dtype=D)}
    _check(op, kw, _nodes_want)
    with torch.no_grad():  # new nodes in inference: sampled again, nothing kept
        op(**kw)
        kw2 = {**kw, "U": kw["U"] * 0.5, "q": kw["q"].flip(0)}
        torch.testing.assert_close(op(**kw2), _nodes_want(kw2, dict(op.named_parameters())),
                                   rtol=1e-10, atol=1e-11)
        assert op.last_run == "lattice_conv"


def test_nodes_with_batch_entries_run_the_kernels():
    """A kernel per batch entry is not one library call: the tiled kernels run it, and
    explain's rule says so."""
    op = _op(NODES)
    g = _gen(5)
    f = torch.randn(2, 5, 4, 4, generator=g, dtype=D)
    U = torch.rand(2, 3, 1, generator=g, dtype=D)
    V = torch.rand(5, 1, generator=g, dtype=D)
    q = torch.rand(5, generator=g, dtype=D)
    with torch.no_grad():
        out = op(f=f, U=U, V=V, q=q)
        assert op.last_run == "kernels"
        params = dict(op.named_parameters())
        for b in range(2):
            torch.testing.assert_close(
                out[b], _nodes_want({"f": f[b:b + 1], "U": U[b], "V": V, "q": q}, params)[0],
                rtol=1e-10, atol=1e-11)


# ---- NaN and inf where a library call would spread them -------------------------------------------

MASKED_TAPS = """operator masked {
    domain P = index(2)
    domain T = stencil(3, 3)
    input  f : P -> R
    output g(p: P) = integral(t: T) [t[0] == 0] * f(p + t)
}"""

DIAMOND = """operator diamond {
    domain P = index(2)
    domain Q = index(2)
    input  f : P -> R
    output g(q: Q) = integral(p: P) [abs(p[0] - q[0]) + abs(p[1] - q[1]) <= 1] * f(p)
}"""


def _shifted_sum(f: torch.Tensor, offsets) -> torch.Tensor:
    """Σ over `offsets` (d0, d1) of f(p + d), zero outside: f [H, W] -> [H, W]."""
    H, W = f.shape
    padded = F.pad(f, (2, 2, 2, 2))
    return sum(padded[2 + a:2 + a + H, 2 + b:2 + b + W] for a, b in offsets)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_a_masked_tap_does_not_spread_inf_or_nan(bad):
    """A bracket masks the whole product, a NaN or inf of f too (docs/language.md): the
    masked taps of a stencil, the masked offsets of a lag kernel, and an FFT (which would
    spread one inf everywhere) give torch's own sums of the live terms."""
    f = torch.randn(5, 5, generator=_gen(), dtype=D)
    f[2, 2] = bad
    cases = [(MASKED_TAPS, {}, _shifted_sum(f, [(0, -1), (0, 0), (0, 1)])),
             (DIAMOND, {"Q": (5, 5)},
              _shifted_sum(f, [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)])),
             (GLOBAL, {"P": (5, 5)}, None)]
    for src, kw, want in cases:
        op = _op(src)
        x = f[None, ..., None].expand(1, 5, 5, 2) if src is GLOBAL else f
        out = op(f=x, **kw)
        assert op.last_run == "lattice_conv"
        if want is None:  # the pairwise definition, by einsum (0 · inf = NaN where K underflows)
            s = dict(op.named_parameters())["s"]
            want = _pairwise(x, lambda d: torch.exp(-(d**2).sum(-1) / s), (5, 5))
        torch.testing.assert_close(out, want.detach(), equal_nan=True)


def test_an_infinite_kernel_value_is_not_spread():
    """K(p − q) = 1/|p − q|² is inf at p = q: every output is ±inf as the pairwise sum gives
    (an FFT of the kernel would make them all NaN)."""
    op = _op(GLOBAL.replace("exp(-sqnorm(p - q) / s) * f(q)", "f(q) * (s / sqnorm(p - q))"))
    f = torch.randn(1, 4, 5, 2, generator=_gen(), dtype=D)
    out = op(f=f, P=(4, 5))
    s = dict(op.named_parameters())["s"]
    want = _pairwise(f, lambda d: s / (d**2).sum(-1), (4, 5))
    assert torch.isinf(want).all()
    torch.testing.assert_close(out, want.detach(), equal_nan=True)


@pytest.mark.parametrize("offset", ["+ 1000000", "- 1000000", "+ 4", "- 9"])
def test_a_read_beyond_the_lattice_is_zero(offset):
    """Every read outside the field: zeros (and zero gradients), without a padding the size
    of the offset."""
    op = _op(BLUR2D.replace("f(p + t)", f"f(p + t {offset})"))
    f = torch.randn(2, 5, 6, 8, generator=_gen(), dtype=D, requires_grad=True)
    out = op(f=f)
    assert op.last_run == "lattice_conv"
    if offset in ("+ 4",):  # one row of taps still reaches the field: a partial sum
        assert out.abs().sum() > 0
    else:
        assert out.abs().sum() == 0
        (g,) = torch.autograd.grad(out.sum(), f)
        assert g.abs().sum() == 0
