"""Version 1 of the language — lattices, stencils, product fields and outputs, integrals over
several variables — against torch written independently (never against itdsl itself).

Every operator is checked in float64, forward and gradients (of a random linear functional
of the output), and `gradcheck` runs on small sizes. Each test is parametrised over the
targets in `TARGETS`; a target joins the list once it runs version 1 programs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from util import gradcheck_op, grads

import itdsl
from itdsl.errors import InputError

TARGETS = ["reference"]
D64 = torch.float64


@pytest.fixture(params=TARGETS)
def target(request) -> str:
    return request.param


def build(source: str, name: str, target: str) -> torch.nn.Module:
    return itdsl.compile_source(source, target=target)[name].double()


def rand(*shape, scale=1.0):
    return (torch.randn(*shape, dtype=D64) * scale).requires_grad_(True)


def assert_matches(ours, formula, leaves, tol=1e-10):
    """`ours()` equals `formula()`, and so do their gradients with respect to `leaves`."""
    out, want = ours(), formula()
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    for a, b in zip(grads(ours, leaves), grads(formula, leaves)):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def set_param(p: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        p.copy_(value)


def trapezoid(n: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    h = (hi - lo) / (n - 1)
    w = torch.full((n,), h, dtype=D64)
    w[0] = w[-1] = h / 2
    return w


# ---- the cubic-convolution spline, written out (a = −0.75, taps clamped to the edge) --------


def keys(d: float) -> float:
    a, d = -0.75, abs(d)
    if d <= 1:
        return ((a + 2) * d - (a + 3)) * d * d + 1
    if d < 2:
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return 0.0


def basis(us, n: int) -> torch.Tensor:
    """B[i, k]: the weight of node k (at k/(n − 1)) of a spline of n nodes at us[i]."""
    B = np.zeros((len(us), n))
    for i, u in enumerate(us):
        t = min(max(float(u), 0.0), 1.0) * (n - 1)
        base = min(math.floor(t), n - 1)
        for off in (-1, 0, 1, 2):
            B[i, min(max(base + off, 0), n - 1)] += keys(t - (base + off))
    return torch.tensor(B, dtype=D64)


def test_spline_basis_by_hand():
    # at a node the spline is its coefficient; halfway between nodes 1 and 2 of 4, the four
    # taps weigh W(1.5), W(0.5), W(0.5), W(1.5): (1 − (a + 3)/4 + (a + 2)/8 = 0.59375 and
    # −a/8 (27 − 90 + 96 − 32) = −0.09375 at a = −0.75)
    B = basis([0.0, 1 / 3, 0.5, 1.0], 4)
    torch.testing.assert_close(B[[0, 1, 3]], torch.eye(4, dtype=D64)[[0, 1, 3]])
    far, near = keys(1.5), keys(0.5)
    assert (near, far) == (0.59375, -0.09375)
    torch.testing.assert_close(B[2], torch.tensor([far, near, near, far], dtype=D64))
    torch.testing.assert_close(B.sum(1), torch.ones(4, dtype=D64))


# ---- blur2d: a depthwise 2-D convolution ----------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

BLUR2D = (EXAMPLES / "blur2d.it").read_text()  # the example, as written


def blur_formula(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    i = torch.arange(5, dtype=D64) - 2
    sq = i[:, None] ** 2 + i[None, :] ** 2
    weight = torch.exp(-sq / (2 * w[:, None, None] ** 2)).unsqueeze(1)  # [8, 1, 5, 5]
    # f(p + t) is a correlation, as F.conv2d: weight[c, 0, t0 + 2, t1 + 2]
    return F.conv2d(x.permute(0, 3, 1, 2), weight, padding=2, groups=8).permute(0, 2, 3, 1)


def test_blur2d_is_a_depthwise_conv2d(target):
    op = build(BLUR2D, "blur2d", target)
    x = rand(2, 9, 7, 8)
    assert op(f=x).shape == (2, 9, 7, 8)
    assert_matches(lambda: op(f=x), lambda: blur_formula(x, op.w), [x, op.w])
    set_param(op.w, torch.rand(8, dtype=D64) + 0.4)
    assert_matches(lambda: op(f=x), lambda: blur_formula(x, op.w), [x, op.w])


def test_blur2d_unbatched_and_smaller_than_its_stencil(target):
    op = build(BLUR2D, "blur2d", target)
    x = rand(3, 2, 8)  # every read near the edge: most taps fall outside
    assert_matches(lambda: op(f=x), lambda: blur_formula(x[None], op.w)[0], [x, op.w])


def test_blur2d_gradcheck(target):
    op = build(BLUR2D, "blur2d", target)
    set_param(op.w, torch.rand(8, dtype=D64) + 0.5)
    assert gradcheck_op(op, dict(f=rand(1, 4, 3, 8)))


# ---- integral_conv3x3: the convolution layer of an Integral Neural Network ------------------

INN_CONV = (EXAMPLES / "integral_conv3x3.it").read_text()  # the example, as written


def inn_weight(W: torch.Tensor, n_u: int, n_v: int) -> torch.Tensor:
    """weight[u, v, t0 + 1, t1 + 1] = q_v · W(u_u, v_v, (t0, t1)), u_u, v_v the grid points,
    q the trapezoid weights on V."""
    Bu = basis(np.linspace(0, 1, n_u), W.shape[-2])
    Bv = basis(np.linspace(0, 1, n_v), W.shape[-1])
    return torch.einsum("ui,abij,vj->uvab", Bu, W, Bv) * trapezoid(n_v)[None, :, None, None]


def inn_formula(op, x: torch.Tensor, n_u: int) -> torch.Tensor:
    bias = basis(np.linspace(0, 1, n_u), op.c.shape[0]) @ op.c
    return F.conv2d(x, inn_weight(op.W, n_u, x.shape[-3]), bias, padding=1)


def test_integral_conv3x3_equals_conv2d(target):
    op = build(INN_CONV, "integral_conv3x3", target)
    x = rand(2, 5, 6, 7)
    assert op(f=x, U=4).shape == (2, 4, 6, 7)
    assert_matches(lambda: op(f=x, U=4), lambda: inn_formula(op, x, 4), [x, op.W, op.c])


def test_integral_conv3x3_random_params(target):
    op = build(INN_CONV, "integral_conv3x3", target)
    set_param(op.W, torch.randn(3, 3, 16, 16, dtype=D64))
    set_param(op.c, torch.randn(16, dtype=D64))
    x = rand(3, 7, 5, 4)
    assert_matches(lambda: op(f=x, U=6), lambda: inn_formula(op, x, 6), [x, op.W, op.c])
    x1 = rand(7, 5, 4)  # no batch
    assert_matches(lambda: op(f=x1, U=3), lambda: inn_formula(op, x1[None], 3)[0],
                   [x1, op.W, op.c])


def test_integral_conv3x3_gradcheck(target):
    op = build(INN_CONV, "integral_conv3x3", target)
    set_param(op.W, torch.randn(3, 3, 16, 16, dtype=D64))
    assert gradcheck_op(op, dict(f=rand(1, 3, 3, 2), U=2), fast_mode=True)  # 2304 coefficients
    assert gradcheck_op(op, dict(f=rand(2, 3, 2, 3), U=3), params=False)


# ---- strides, flipped kernels, offsets -------------------------------------------------------

STRIDED = """
operator strided {
    domain U = grid(0, 1)
    domain V = grid(0, 1)
    domain P = index(2)
    domain Q = index(2)
    domain T = stencil(3, 3)
    input  f : V * P -> R
    param  W : spline(6, 5, per = T)
    output g(u: U, q: Q) = integral(v: V, t: T) W(u, v, t) * f(v, 2*q + t) with (trapezoid, sum)
}
"""


@pytest.mark.parametrize("H,Wd", [(7, 8), (6, 5)])
def test_stride_two_is_conv2d_stride_two(target, H, Wd):
    op = build(STRIDED, "strided", target)
    set_param(op.W, torch.randn(3, 3, 6, 5, dtype=D64))
    x = rand(2, 4, H, Wd)
    Q = ((H - 1) // 2 + 1, (Wd - 1) // 2 + 1)  # F.conv2d's output size at stride 2, padding 1

    def formula():  # f(v, 2q + t), t in {−1, 0, 1}: stride 2, padding 1
        return F.conv2d(x, inn_weight(op.W, 3, 4), stride=2, padding=1)

    assert_matches(lambda: op(f=x, U=3, Q=Q), formula, [x, op.W])


def test_stride_two_reads_zeros_past_the_edge(target):
    op = build(STRIDED, "strided", target)
    x = rand(1, 3, 7, 6)
    # one more row of outputs than conv2d gives: it reads rows 8 and 9, outside the image

    def formula():
        padded = F.pad(x, (0, 0, 0, 2))
        return F.conv2d(padded, inn_weight(op.W, 2, 3), stride=2, padding=1)

    assert_matches(lambda: op(f=x, U=2, Q=(5, 3)), formula, [x, op.W])


FLIPPED = """
operator flipped {
    domain P = index(2)
    domain T = stencil(3, 5)
    input  f : P -> R^2
    output g(p: P) = integral(t: T) (1 + t[0] + 2 * t[1] + t[0] * t[1]^2) * f(p - t)
}
"""


def test_minus_stencil_is_a_true_convolution(target):
    op = build(FLIPPED, "flipped", target)
    x = rand(2, 6, 9, 2)

    def formula():  # Σ_t K(t) f(p − t) = Σ_s K(−s) f(p + s): the kernel flipped
        s0 = torch.arange(3, dtype=D64)[:, None] - 1
        s1 = torch.arange(5, dtype=D64)[None, :] - 2
        t0, t1 = -s0, -s1
        k = 1 + t0 + 2 * t1 + t0 * t1**2  # [3, 5], at s
        weight = k.expand(2, 1, 3, 5)
        return F.conv2d(x.permute(0, 3, 1, 2), weight, padding=(1, 2), groups=2).permute(
            0, 2, 3, 1)

    assert_matches(lambda: op(f=x), formula, [x])


OFFSET = """
operator offset {
    domain V = index
    domain P = index(2)
    domain T = stencil(3, 3)
    input  f : V * P -> R
    input  k : T * V -> R
    output g(p: P) = integral(v: V, t: T) k(t, v) * f(v, p + t - 1)
}
"""


def test_offset_read_and_a_field_on_a_stencil(target):
    op = build(OFFSET, "offset", target)
    x, k = rand(2, 4, 6, 5), rand(3, 3, 4)

    def formula():  # f(v, p + t − 1): the image shifted by one, then correlated
        weight = k.permute(2, 0, 1).unsqueeze(0)  # [1, v, t0 + 1, t1 + 1]
        return F.conv2d(F.pad(x, (2, 0, 2, 0)), weight)[:, 0]

    assert_matches(lambda: op(f=x, k=k), formula, [x, k])


LINE_AND_VOLUME = """
operator line {
    domain I = index
    domain T = stencil(5)
    input  f : I -> R^3
    output g(i: I) = integral(t: T) (t + 3) * f(i + t)
}

operator volume {
    domain P = index(3)
    domain T = stencil(3, 1, 3)
    input  f : P -> R
    input  k : T -> R
    output g(p: P) = integral(t: T) k(t) * f(p - t)
}
"""


def test_one_and_three_axes(target):
    line = build(LINE_AND_VOLUME, "line", target)
    x = rand(2, 9, 3)
    w = (torch.arange(5, dtype=D64) + 1).expand(3, 1, 5)  # t + 3 at t = −2 … 2
    assert_matches(lambda: line(f=x),
                   lambda: F.conv1d(x.transpose(1, 2), w, padding=2, groups=3).transpose(1, 2),
                   [x])
    volume = build(LINE_AND_VOLUME, "volume", target)
    y, k = rand(2, 4, 3, 5), rand(3, 1, 3)
    assert_matches(lambda: volume(f=y, k=k),
                   lambda: F.conv3d(y[:, None], k.flip(0, 1, 2)[None, None], padding=(1, 0, 1))
                   [:, 0], [y, k])


# ---- a global kernel of p − q on lattices ------------------------------------------------------

GLOBAL = """
operator global2d {
    domain P = index(2)
    domain Q = index(2)
    input  f : Q -> R
    output g(p: P) = integral(q: Q) exp(-sqnorm(p - q) / 8) * f(q)
}
"""


def lattice(H: int, W: int) -> torch.Tensor:
    """The points of {0..H−1} × {0..W−1}, row-major: [H·W, 2]."""
    i, j = torch.meshgrid(torch.arange(H, dtype=D64), torch.arange(W, dtype=D64), indexing="ij")
    return torch.stack([i.reshape(-1), j.reshape(-1)], -1)


def test_global_kernel_of_p_minus_q(target):
    op = build(GLOBAL, "global2d", target)
    x = rand(3, 4, 7)

    def formula():
        K = torch.exp(-torch.cdist(lattice(5, 6), lattice(4, 7)) ** 2 / 8)
        return (x.reshape(3, -1) @ K.T).reshape(3, 5, 6)

    assert_matches(lambda: op(f=x, P=(5, 6)), formula, [x])


def test_global_kernel_by_fft(target):
    op = build(GLOBAL, "global2d", target)
    H, W = 6, 5
    x = rand(2, H, W)

    def formula():  # a linear convolution: FFT on a grid large enough not to wrap
        d0 = torch.arange(-(H - 1), H, dtype=D64)[:, None]
        d1 = torch.arange(-(W - 1), W, dtype=D64)[None, :]
        k = torch.exp(-(d0**2 + d1**2) / 8)  # [2H − 1, 2W − 1], centred
        s = (3 * H, 3 * W)
        full = torch.fft.irfft2(torch.fft.rfft2(x, s) * torch.fft.rfft2(k, s), s)
        return full[:, H - 1:2 * H - 1, W - 1:2 * W - 1]

    assert_matches(lambda: op(f=x, P=(H, W)), formula, [x])


# ---- quadratures on a 2-D grid ------------------------------------------------------------------

GRID2D = """
operator gauss2d {
    domain X = grid(-1, 1)
    domain S = grid((0, 1), (0, 1))
    input  a : X -> R
    output g(x: X) = a(x) * integral(s: S) exp(-(s[0] - x)^2) * cos(3 * s[1]) with gauss(12)
}

operator trap2d {
    domain X = grid(-1, 1)
    domain S = grid((0, 1), (-1, 2))
    input  h : S -> R^2
    output g(x: X) = integral(s: S) exp(-(s[0] - x)^2) * cos(3 * s[1]) * h(s) with trapezoid
}
"""


def test_gauss_legendre_on_the_square(target):
    op = build(GRID2D, "gauss2d", target)
    a = rand(7)

    def exact():  # ∫0^1 exp(−(s − x)²) ds · ∫0^1 cos(3s) ds
        erfs = [math.erf(1 - x) - math.erf(-x) for x in np.linspace(-1, 1, 7)]
        return a * torch.tensor(erfs, dtype=D64) * math.sqrt(math.pi) / 2 * math.sin(3) / 3

    assert_matches(lambda: op(a=a), exact, [a], tol=1e-13)


def test_trapezoid_on_a_product_grid(target):
    op = build(GRID2D, "trap2d", target)
    h = rand(2, 5, 9, 2)

    def formula():
        s0, s1 = torch.linspace(0, 1, 5, dtype=D64), torch.linspace(-1, 2, 9, dtype=D64)
        w = torch.outer(trapezoid(5), trapezoid(9, -1, 2))  # the tensor-product rule
        x = torch.linspace(-1, 1, 4, dtype=D64)
        k = torch.exp(-(s0[None, :, None] - x[:, None, None]) ** 2) * torch.cos(3 * s1)
        return torch.einsum("xij,ij,bijc->bxc", k, w, h)

    assert_matches(lambda: op(X=4, h=h), formula, [h])


# ---- several variables on points, products of domains in outputs and fields ------------------

POINTS = """
operator double_points {
    domain X = points(2)
    domain Y = points(2)
    domain Z = points(3)
    input  f : Y -> R^3
    input  h : Z -> R
    input  w : Z -> R
    output g(x: X) = integral(y: Y, z: Z) exp(-sqnorm(x - y)) * cos(dot(x, y) + sum(z)) * f(y) * h(z) with (mean, weights(w))
}
"""


def test_double_integral_on_points(target):
    op = build(POINTS, "double_points", target)
    x, y, z = rand(5, 2), rand(4, 2), rand(6, 3)
    f, h, w = rand(2, 4, 3), rand(6), rand(6)

    def formula():
        total = 0
        for j in range(4):
            for k in range(6):
                kern = torch.exp(-((x - y[j]) ** 2).sum(-1)) * torch.cos(x @ y[j] + z[k].sum())
                total = total + (kern[:, None] * f[:, j, None, :]) * h[k] * w[k] / 4
        return total

    assert_matches(lambda: op(X=x, Y=y, Z=z, f=f, h=h, w=w), formula, [x, y, z, f, h, w])


PRODUCTS = """
operator grid_by_points {
    domain U = grid(0, 1)
    domain X = points(2)
    domain Y = points(2)
    input  f : Y -> R^4
    output g(u: U, x: X) = integral(y: Y) exp(-u * sqnorm(x - y)) * f(y)
}

operator plane {
    domain S = grid((0, 1), (0, 2))
    output g(s: S) = s[0] + 10 * s[1]
}

operator swapped {
    domain V = index
    domain P = index(2)
    input  f : V * P -> R
    input  a : P * V -> R^2
    output g(p: P) = integral(v: V) f(v, p) * a(p, v)
}

operator transposed {
    domain V = index
    domain P = index(2)
    input  f : V * P -> R
    output g(p: P, v: V) = f(v, p)
}

operator identity {
    domain V = index
    domain P = index(2)
    input  f : V * P -> R
    output g(v: V, p: P) = f(v, p)
}

operator partial {
    domain V = index
    domain P = index(2)
    input  f : V * P -> R
    output g(v: V) = integral(p: P) (1 + p[0] - p[1]) * f(v, p)
}
"""


def test_output_on_a_grid_times_points(target):
    op = build(PRODUCTS, "grid_by_points", target)
    x, y, f = rand(3, 2), rand(5, 2), rand(2, 5, 4)

    def formula():
        u = torch.linspace(0, 1, 6, dtype=D64)
        k = torch.exp(-u[:, None, None] * torch.cdist(x, y)[None] ** 2)  # [u, x, y]
        return torch.einsum("uxy,byc->buxc", k, f) / 5

    assert op(U=6, X=x, Y=y, f=f).shape == (2, 6, 3, 4)
    assert_matches(lambda: op(U=6, X=x, Y=y, f=f), formula, [x, y, f])
    xs = rand(2, 3, 2)  # batched coordinates: batch dims lead, then U, then X
    g = op(U=6, X=xs, Y=y, f=f[0])
    assert g.shape == (2, 6, 3, 4)
    for b in range(2):
        torch.testing.assert_close(g[b], op(U=6, X=xs[b], Y=y, f=f[0]))


def test_output_on_a_2d_grid_is_row_major(target):
    op = build(PRODUCTS, "plane", target)
    s0, s1 = torch.linspace(0, 1, 3), torch.linspace(0, 2, 4)  # no tensor: the default dtype
    torch.testing.assert_close(op(S=(3, 4)), s0[:, None] + 10 * s1[None, :])


def test_product_fields_read_in_another_order(target):
    f, a = rand(2, 3, 4, 5), rand(2, 4, 5, 3, 2)
    op = build(PRODUCTS, "swapped", target)
    assert_matches(lambda: op(f=f, a=a),
                   lambda: torch.einsum("bvhw,bhwvc->bhwc", f, a), [f, a])
    op = build(PRODUCTS, "identity", target)  # the output's own points: read directly
    assert_matches(lambda: op(f=f), lambda: f * 1, [f])
    op = build(PRODUCTS, "transposed", target)
    assert_matches(lambda: op(f=f), lambda: f.permute(0, 2, 3, 1), [f])
    op = build(PRODUCTS, "partial", target)
    i, j = torch.meshgrid(torch.arange(4, dtype=D64), torch.arange(5, dtype=D64), indexing="ij")
    assert_matches(lambda: op(f=f),
                   lambda: torch.einsum("hw,bvhw->bv", 1 + i - j, f), [f])


MONTECARLO = """
operator sampled {
    domain P = index(2)
    domain Q = index(2)
    input  f : Q -> R^2
    output g(p: P) = integral(q: Q) exp(-sqnorm(p - q) / 4) * f(q) with montecarlo(40)
}
"""


def test_montecarlo_draws_from_the_flattened_lattice(target):
    op = build(MONTECARLO, "sampled", target)
    x = rand(3, 4, 2)

    def formula():  # 40 flat indices of Q drawn uniformly, each weighing m/S (measure 1)
        idx = torch.randint(12, (40,), generator=torch.Generator().manual_seed(3))
        w = torch.bincount(idx, minlength=12).to(D64) * 12 / 40
        K = torch.exp(-torch.cdist(lattice(2, 5), lattice(3, 4)) ** 2 / 4)
        return (K * w) @ x.reshape(12, 2)

    def ours():
        return op(f=x, P=(2, 5), generator=torch.Generator().manual_seed(3)).reshape(10, 2)

    assert_matches(ours, formula, [x])


# ---- errors at call time ----------------------------------------------------------------------


def test_wrong_shape_of_a_product_field_names_the_expected_shape(target):
    op = build(INN_CONV, "integral_conv3x3", target)
    with pytest.raises(InputError, match=r"\[\.\.\., n_V, P0, P1\]") as e:
        op(f=torch.randn(5, 6, dtype=D64), U=3)
    assert "V * P -> R" in str(e.value) and "[5, 6]" in str(e.value)


def test_a_size_tuple_of_the_wrong_length(target):
    op = build(GLOBAL, "global2d", target)
    with pytest.raises(InputError, match=r"`P`.*2 axes.*tuple of 2 ints.*tuple of 1"):
        op(f=torch.randn(4, 4, dtype=D64), P=(3,))
    with pytest.raises(InputError, match=r"`P`.*tuple of 2 ints.*got int"):
        op(f=torch.randn(4, 4, dtype=D64), P=3)


def test_a_size_for_a_stencil(target):
    op = build(BLUR2D, "blur2d", target)
    with pytest.raises(InputError, match=r"`T` is a stencil.*passes nothing") as e:
        op(f=torch.randn(4, 4, 8, dtype=D64), T=(5, 5))
    assert "drop `T=`" in str(e.value.hint)


def test_sizes_of_a_product_field_that_disagree(target):
    op = build(PRODUCTS, "swapped", target)
    with pytest.raises(InputError, match="points of `P`"):
        op(f=torch.randn(3, 4, 5, dtype=D64), a=torch.randn(4, 6, 3, 2, dtype=D64))
