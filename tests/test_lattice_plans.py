"""Plans of version 1 programs (lattices, stencils, products, several integration variables),
run by the Plan evaluator in float64 against torch written independently: F.conv2d and
explicit sums, forward and gradients. The Plan evaluator is what the compiled kernels and
the strategies are checked against, so it is checked here on its own."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from itdsl.frontend import check, parse
from itdsl.runtime.binding import bind
from itdsl.runtime.plan_eval import evaluate_backward, evaluate_plan
from itdsl.symbolic import analyse
from itdsl.symbolic.plan import StepKind
from itdsl.symbolic.verify import verify_plan

F64 = torch.float64


def _run(src: str, kwargs: dict, params: dict, dout_seed: int = 1):
    """(output, gradients by key, the cotangent) of the program's one operator."""
    op = check(parse(src)).operators[0]
    plan = analyse(op)
    verify_plan(plan)
    out, ev = evaluate_plan(plan, params, bind(op, kwargs, F64))
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(dout_seed), dtype=F64)
    return out, evaluate_backward(plan, ev, dout), dout, plan


def _grads(out: torch.Tensor, leaves: list[torch.Tensor], dout: torch.Tensor):
    return torch.autograd.grad(out, leaves, dout)


def _gauss_taps(w: torch.Tensor, k: int) -> torch.Tensor:
    """[C, 1, k, k]: exp(-(i² + j²) / (2 w_c²)) over the offsets of a k×k stencil."""
    i = torch.arange(k, dtype=F64) - (k - 1) / 2
    d2 = i[:, None] ** 2 + i[None, :] ** 2
    return torch.exp(-d2[None] / (2 * w[:, None, None] ** 2))[:, None]


BLUR = """operator blur {
    domain P = index(2)
    domain T = stencil(5, 5)
    input  f : P -> R^3
    param  w : R^3 = 1.0
    output g(p: P) = integral(t: T) exp(-sqnorm(t) / (2 * w^2)) * f(p + t)
}"""


def test_blur_is_a_depthwise_conv2d():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 6, 3, dtype=F64)
    w = torch.rand(3, dtype=F64) + 0.5
    out, grads, dout, plan = _run(BLUR, {"f": x}, {"w": w})
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.conv2d(xr.permute(0, 3, 1, 2), _gauss_taps(wr, 5), padding=2,
                   groups=3).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    gx, gw = _grads(ref, [xr, wr], dout)
    torch.testing.assert_close(grads["input:f"], gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["param:w"], gw, rtol=1e-12, atol=1e-12)
    # the field's gradient is a scatter to the points it was read at
    assert any(st.kind is StepKind.SCATTER for st in plan.backward.steps)


@pytest.mark.parametrize("at,stride,flip,shift", [
    ("p + t", 1, False, 0), ("p - t", 1, True, 0), ("p + t - 1", 1, False, -1),
    ("2*q + t", 2, False, 0)])
def test_affine_reads_are_conv2d_with_zero_padding(at, stride, flip, shift):
    out_dom = "q: Q" if stride > 1 else "p: P"
    src = f"""operator c {{
        domain P = index(2)
        domain Q = index(2)
        domain T = stencil(3, 3)
        input  f : P -> R
        param  k : R^2 = 0.5
        output g({out_dom}) = integral(t: T) exp(k[0] * t[0] - k[1] * t[1]^2) * f({at})
    }}"""
    torch.manual_seed(1)
    H, W = 7, 6
    x = torch.randn(2, H, W, dtype=F64)
    k = torch.tensor([0.3, 0.4], dtype=F64)
    kwargs = {"f": x}
    if stride > 1:
        kwargs["Q"] = (math.ceil(H / 2), math.ceil(W / 2))
    out, grads, dout, _ = _run(src, kwargs, {"k": k})
    xr, kr = x.clone().requires_grad_(), k.clone().requires_grad_()
    t = torch.arange(3, dtype=F64) - 1
    taps = torch.exp(kr[0] * t[:, None] - kr[1] * t[None, :] ** 2)  # [t0, t1]
    if flip:  # f(p - t): the taps reversed
        taps = taps.flip(0, 1)
    if shift:  # f(p + t - 1): reads one further back, zeros entering at the start
        ref = F.conv2d(F.pad(xr[:, None], (2, 0, 2, 0)), taps[None, None])[:, 0]
    else:
        ref = F.conv2d(xr[:, None], taps[None, None], padding=1, stride=stride)[:, 0]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    gx, gk = _grads(ref, [xr, kr], dout)
    torch.testing.assert_close(grads["input:f"], gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["param:k"], gk, rtol=1e-12, atol=1e-12)


CONV3X3 = """operator integral_conv3x3 {
    domain U = grid(0, 1)
    domain V = grid(0, 1)
    domain P = index(2)
    domain T = stencil(3, 3)
    input  f : V * P -> R
    param  W : spline(6, 5, per = T)
    param  c : spline(4)
    output g(u: U, p: P) = c(u) + integral(v: V, t: T) W(u, v, t) * f(v, p + t) with (trapezoid, sum)
}"""


def _keys(u: torch.Tensor, n: int) -> torch.Tensor:
    """[len(u), n]: the cubic-convolution weights (a = -0.75, clamped taps) of n nodes."""
    a = -0.75
    t = u.clamp(0, 1) * (n - 1)
    base = torch.floor(t).clamp(max=n - 1)
    frac = t - base
    w = torch.zeros(len(u), n, dtype=u.dtype)
    for off, d in zip((-1, 0, 1, 2), (1 + frac, frac, 1 - frac, 2 - frac)):
        x = d.abs()
        kern = torch.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                           ((a * x - 5 * a) * x + 8 * a) * x - 4 * a)
        idx = (base.long() + off).clamp(0, n - 1)
        w = w + F.one_hot(idx, n).to(u.dtype) * kern[:, None]
    return w


def test_integral_conv3x3_is_a_full_conv2d():
    torch.manual_seed(2)
    nU, nV, H, W = 4, 5, 6, 7
    x = torch.randn(2, nV, H, W, dtype=F64)
    Wc = torch.randn(3, 3, 6, 5, dtype=F64)
    cc = torch.randn(4, dtype=F64)
    out, grads, dout, _ = _run(CONV3X3, {"f": x, "U": nU}, {"W": Wc, "c": cc})
    xr, Wr, cr = (t.clone().requires_grad_() for t in (x, Wc, cc))
    uu, vv = torch.linspace(0, 1, nU, dtype=F64), torch.linspace(0, 1, nV, dtype=F64)
    q = torch.full((nV,), 1 / (nV - 1), dtype=F64)
    q[0] = q[-1] = 0.5 / (nV - 1)
    Bu, Bv = _keys(uu, 6), _keys(vv, 5)
    weight = torch.einsum("ua,vb,ijab,v->uvij", Bu, Bv, Wr, q)  # [u, v, t0 + 1, t1 + 1]
    ref = F.conv2d(xr, weight, _keys(uu, 4) @ cr, padding=1)
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)
    gx, gW, gc = _grads(ref, [xr, Wr, cr], dout)
    torch.testing.assert_close(grads["input:f"], gx, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(grads["param:W"], gW, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(grads["param:c"], gc, rtol=1e-11, atol=1e-11)


def test_gauss_legendre_on_a_square():
    src = """operator g2 {
        domain X = grid(0, 1)
        domain S = grid((0, 1), (0, 2))
        output g(x: X) = integral(s: S) exp(-(s[0] - x)^2) * cos(3 * s[1]) with gauss(12)
    }"""
    out, _, _, _ = _run(src, {"X": 5}, {})
    x = np.linspace(0, 1, 5)
    from math import erf, sqrt
    # ∫_0^1 exp(-(s - x)²) ds · ∫_0^2 cos(3 s) ds, in closed form
    first = np.array([sqrt(math.pi) / 2 * (erf(1 - xi) + erf(xi)) for xi in x])
    want = first * math.sin(6) / 3
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-10, atol=1e-12)


def test_double_integral_on_points_and_an_output_on_a_product():
    src = """operator d {
        domain U = grid(0, 1)
        domain X = points(2)
        domain Y = points(2)
        domain Z = points(2)
        input  a : Y -> R
        input  b : Z -> R^2
        input  w : Z -> R
        output g(u: U, x: X) = integral(y: Y, z: Z) exp(-u * sqnorm(x - y) - sqnorm(y - z)) * a(y) * b(z) with (mean, weights(w))
    }"""
    torch.manual_seed(3)
    X, Y, Z = (torch.randn(n, 2, dtype=F64) for n in (4, 5, 6))
    a, b, w = torch.randn(5, dtype=F64), torch.randn(6, 2, dtype=F64), torch.rand(6, dtype=F64)
    out, grads, dout, _ = _run(src, {"U": 3, "X": X, "Y": Y, "Z": Z, "a": a, "b": b, "w": w},
                               {})
    leaves = [t.clone().requires_grad_() for t in (X, Y, Z, a, b, w)]
    Xr, Yr, Zr, ar, br, wr = leaves
    u = torch.linspace(0, 1, 3, dtype=F64)
    dxy = ((Xr[:, None] - Yr[None]) ** 2).sum(-1)  # [x, y]
    dyz = ((Yr[:, None] - Zr[None]) ** 2).sum(-1)  # [y, z]
    k = torch.exp(-u[:, None, None, None] * dxy[None, :, :, None] - dyz[None, None])
    ref = torch.einsum("uxyz,y,zc,z->uxc", k, ar / 5, br, wr)
    assert out.shape == (3, 4, 2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    want = _grads(ref, leaves, dout)
    for key, g in zip(("coords:X", "coords:Y", "coords:Z", "input:a", "input:b", "input:w"),
                      want):
        torch.testing.assert_close(grads[key], g, rtol=1e-11, atol=1e-11, msg=key)


def test_product_field_read_at_variables_of_both_sides():
    src = """operator m {
        domain V = grid(0, 1)
        domain P = index(2)
        input  f : V * P -> R
        output g(p: P) = integral(v: V) v * f(v, p)
    }"""
    torch.manual_seed(4)
    x = torch.randn(3, 4, 5, dtype=F64)
    out, grads, dout, _ = _run(src, {"f": x}, {})
    xr = x.clone().requires_grad_()
    v = torch.linspace(0, 1, 3, dtype=F64)
    q = torch.tensor([0.25, 0.5, 0.25], dtype=F64)
    ref = torch.einsum("v,vhw->hw", v * q, xr)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["input:f"], _grads(ref, [xr], dout)[0])
