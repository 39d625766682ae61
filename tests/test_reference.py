"""The reference semantics equal hand-written PyTorch formulas, forward and gradients.

Every operator of the seven example files is compared with an independent
formula written directly in torch (never with itdsl's own code), its gradients
with the formula's autograd gradients, and `gradcheck` in float64 checks the
gradients against finite differences.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from util import EXAMPLES, gradcheck_op, grads

import itdsl
from itdsl.nn.mix import mix_source

torch.manual_seed(0)
D64 = torch.float64


def load(name: str, op: str):
    return itdsl.compile_file(EXAMPLES / name, target="reference")[op]


def rand(*shape, dtype=D64, scale=1.0):
    return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_(True)


def assert_same_grads(fn_ours, fn_ref, leaves, tol=1e-10):
    for a, b in zip(grads(fn_ours, leaves), grads(fn_ref, leaves)):
        if b is None:
            assert a is None or a.abs().max() == 0
            continue
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---- gauss.it ------------------------------------------------------------------------------


def gauss_formula(x, y, b, s):
    return torch.exp(-torch.cdist(x, y) ** 2 / (2 * s**2)) @ b


def test_gauss_equals_cdist_formula():
    op = load("gauss.it", "gauss_smooth").double()
    x, y, b = rand(30, 3), rand(20, 3), rand(20, 16)
    u = op(X=x, Y=y, b=b)
    torch.testing.assert_close(u, gauss_formula(x, y, b, op.s), rtol=1e-12, atol=1e-12)
    assert_same_grads(lambda: op(X=x, Y=y, b=b), lambda: gauss_formula(x, y, b, op.s),
                      [x, y, b, op.s])


def test_gauss_gradcheck():
    op = load("gauss.it", "gauss_smooth").double()
    assert gradcheck_op(op, dict(X=rand(5, 3), Y=rand(4, 3), b=rand(4, 16)))


def test_gauss_batch_dims_broadcast():
    op = load("gauss.it", "gauss_smooth").double()
    x, y, b = rand(2, 7, 3), rand(6, 3), rand(3, 1, 6, 16)
    u = op(X=x, Y=y, b=b)
    assert u.shape == (3, 2, 7, 16)
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(u[i, j], gauss_formula(x[j], y, b[i, 0], op.s))


def test_gauss_float32_and_noncontiguous():
    op = load("gauss.it", "gauss_smooth")
    x = torch.randn(3, 40).T  # non-contiguous
    y, b = torch.randn(30, 3), torch.randn(16, 30).T
    u = op(X=x, Y=y, b=b)
    assert u.dtype == torch.float32
    torch.testing.assert_close(u, gauss_formula(x, y, b, op.s), rtol=1e-4, atol=1e-4)


# ---- attention.it ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,causal", [("attention", False), ("causal_attention", True)])
def test_attention_equals_sdpa(name, causal):
    op = load("attention.it", name).double()
    q, k, v = rand(2, 3, 9, 64), rand(2, 3, 9, 64), rand(2, 3, 9, 64)
    o = op(q=q, k=k, v=v)
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    torch.testing.assert_close(o, sdpa(), rtol=1e-12, atol=1e-12)
    assert_same_grads(lambda: op(q=q, k=k, v=v), sdpa, [q, k, v])


def test_attention_different_lengths_and_gradcheck():
    op = load("attention.it", "attention").double()
    q, k, v = rand(5, 64), rand(7, 64), rand(7, 64)
    torch.testing.assert_close(op(q=q, k=k, v=v), F.scaled_dot_product_attention(q, k, v))
    assert gradcheck_op(op, dict(q=q, k=k, v=v))


def test_causal_attention_gradcheck():
    op = load("attention.it", "causal_attention").double()
    assert gradcheck_op(op, dict(q=rand(6, 64), k=rand(6, 64), v=rand(6, 64)))


def test_attention_large_logits_do_not_overflow():
    for name, causal in [("attention", False), ("causal_attention", True)]:
        op = load("attention.it", name)
        q, k, v = (torch.randn(2, 16, 64) * 12 for _ in range(3))  # logits in the hundreds
        o = op(q=q, k=k, v=v)
        assert torch.isfinite(o).all()
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
        torch.testing.assert_close(o.double(), ref, rtol=1e-3, atol=1e-3)


# ---- bump_conv.it --------------------------------------------------------------------------------


def trapezoid_weights(n, lo=0.0, hi=1.0):
    h = (hi - lo) / (n - 1)
    w = torch.full((n,), h, dtype=D64)
    w[0] = w[-1] = h / 2
    return w


def bump_formula(f, w):
    n = f.shape[-2]
    t = torch.linspace(0, 1, n, dtype=D64)
    d = t[:, None] - t[None, :]  # [t, s]
    K = torch.exp(-d[..., None] ** 2 / (2 * w**2)) * (d.abs() <= 0.2)[..., None]  # [t, s, c]
    return torch.einsum("tsc,s,...sc->...tc", K, trapezoid_weights(n), f)


def test_bump_conv_equals_formula():
    op = load("bump_conv.it", "bump_conv").double()
    with torch.no_grad():
        op.w.copy_(torch.linspace(0.03, 0.1, 8))
    f = rand(2, 50, 8)  # 0.2 * 49 is not an integer: no pair sits exactly on the bracket's edge
    torch.testing.assert_close(op(f=f), bump_formula(f, op.w), rtol=1e-12, atol=1e-12)
    assert_same_grads(lambda: op(f=f), lambda: bump_formula(f, op.w), [f, op.w])


def test_bump_conv_gradcheck():
    op = load("bump_conv.it", "bump_conv").double()
    assert gradcheck_op(op, dict(f=rand(12, 8)))


# ---- ema.it ------------------------------------------------------------------------------------------


def ema_formula(f, a):
    T = f.shape[-2]
    t = torch.arange(T, dtype=D64)
    d = t[:, None] - t[None, :]
    K = torch.exp(-F.softplus(a) * d[..., None]) * (d >= 0)[..., None]
    return torch.einsum("tsc,...sc->...tc", K, f)


def ema_recurrence(f, a):
    """The same operator as the recurrence h_t = exp(-softplus(a)) h_{t-1} + f_t."""
    decay = torch.exp(-F.softplus(a))
    h = torch.zeros_like(f[..., 0, :])
    outs = []
    for t in range(f.shape[-2]):
        h = decay * h + f[..., t, :]
        outs.append(h)
    return torch.stack(outs, dim=-2)


def test_ema_equals_formula_and_recurrence():
    op = load("ema.it", "ema").double()
    with torch.no_grad():
        op.a.copy_(torch.linspace(-1, 2, 16))
    f = rand(3, 25, 16)
    torch.testing.assert_close(op(f=f), ema_formula(f, op.a), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op(f=f), ema_recurrence(f, op.a), rtol=1e-10, atol=1e-10)
    assert_same_grads(lambda: op(f=f), lambda: ema_recurrence(f, op.a), [f, op.a], tol=1e-9)


def test_ema_gradcheck():
    op = load("ema.it", "ema").double()
    assert gradcheck_op(op, dict(f=rand(2, 10, 16)))


# ---- inn_linear.it: splines ---------------------------------------------------------------------


def keys(d, a=-0.75):
    d = abs(d)
    if d <= 1:
        return (a + 2) * d**3 - (a + 3) * d**2 + 1
    if d < 2:
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
    return 0.0


def interp1(coef: np.ndarray, u: float) -> float:
    """Cubic-convolution interpolation of nodes k/(n-1), taps clamped at the edges."""
    n = len(coef)
    t = min(max(u, 0.0), 1.0) * (n - 1)
    i = min(int(math.floor(t)), n - 1)
    return sum(keys(t - k) * coef[min(max(k, 0), n - 1)] for k in range(i - 1, i + 3))


def interp2(coef: np.ndarray, u: float, v: float) -> float:
    rows = np.array([interp1(coef[r], v) for r in range(coef.shape[0])])
    return interp1(rows, u)


def test_spline_matches_independent_interpolation():
    op = load("inn_linear.it", "integral_linear").double()
    W, c = op.W.detach().numpy(), op.c.detach().numpy()
    f = torch.randn(13, dtype=D64)
    U = 9
    g = op(f=f, U=U).detach().numpy()
    u = np.linspace(0, 1, U)
    v = np.linspace(0, 1, 13)
    w = trapezoid_weights(13).numpy()
    expected = [interp1(c, ui) + sum(w[j] * interp2(W, ui, v[j]) * f[j].item() for j in range(13))
                for ui in u]
    np.testing.assert_allclose(g, expected, rtol=1e-12, atol=1e-12)


def test_spline_interpolates_its_nodes():
    op = load("inn_linear.it", "integral_linear").double()
    # with U = 16 the output points are exactly the nodes of the 16-node spline `c`
    g = op(f=torch.zeros(5, dtype=D64), U=16)
    torch.testing.assert_close(g, op.c.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("U,V", [(24, 31), (7, 5), (2, 2)])
def test_integral_linear_resamples_and_gradchecks(U, V):
    op = load("inn_linear.it", "integral_linear").double()
    f = rand(2, V)
    assert op(f=f, U=U).shape == (2, U)
    assert gradcheck_op(op, dict(f=f, U=U))


# ---- itnet_mixer.it ----------------------------------------------------------------------------------


def itnet_formula(phi, x, f, weights):
    n = x.shape[-2]
    xi = x[:, None, :].expand(n, n, 2)
    yj = x[None, :, :].expand(n, n, 2)
    fi = f[..., :, None, :].expand(*f.shape[:-2], n, n, 32)
    fj = f[..., None, :, :].expand(*f.shape[:-2], n, n, 32)
    lead = fi.shape[:-1]
    pair = torch.cat([xi.expand(*lead, 2), yj.expand(*lead, 2), fi, fj], dim=-1)
    K = phi(pair)  # [..., i, j, 32]
    return f + torch.einsum("...ijc,j,...jc->...ic", K, weights, f)


def test_itnet_mix_equals_materialised_mlp():
    op = load("itnet_mixer.it", "itnet_mix").double()
    x, f = torch.rand(10, 2, dtype=D64), rand(2, 10, 32)
    mean = torch.full((10,), 1 / 10, dtype=D64)
    torch.testing.assert_close(op(P=x, f=f), itnet_formula(op.phi, x, f, mean), rtol=1e-12,
                               atol=1e-12)
    leaves = [f, *op.phi.parameters()]
    assert_same_grads(lambda: op(P=x, f=f), lambda: itnet_formula(op.phi, x, f, mean), leaves)


def test_itnet_mix_gradcheck():
    # the inputs of the example; every parameter of a smaller MLP kernel of the same form
    # (the example's 6,432 parameters took 16 s of numerical differences)
    op = load("itnet_mixer.it", "itnet_mix").double()
    assert gradcheck_op(op, dict(P=torch.rand(4, 2, dtype=D64), f=rand(4, 32)), params=False)
    small = itdsl.compile_source(mix_source("mlp", 2, 3, 4, 5), target="reference")["mix"]
    assert gradcheck_op(small.double(), dict(P=torch.rand(5, 2, dtype=D64), a=rand(5, 3),
                                             v=rand(5, 4), w=torch.rand(5, dtype=D64)))


def test_mlp_param_is_a_sequential():
    op = load("itnet_mixer.it", "itnet_mix")
    assert isinstance(op.phi, torch.nn.Sequential)
    assert [type(m).__name__ for m in op.phi] == ["Linear", "GELU", "Linear"]
    assert op.phi[0].in_features == 68 and op.phi[2].out_features == 32


def test_itnet_mix_sampled_is_seeded_and_unbiased():
    op = load("itnet_mixer.it", "itnet_mix_sampled").double()
    n, S = 40, 128
    x, f = torch.rand(n, 2, dtype=D64), torch.randn(n, 32, dtype=D64)
    # one seeded call = the formula with the same S draws, each weighted 1/(S p_j) = n/S
    # relative to the domain's measure 1/n (the `mean` of points): 1/S each
    idx = torch.randint(n, (S,), generator=torch.Generator().manual_seed(7))
    counts = torch.bincount(idx, minlength=n).to(D64)
    g = op(P=x, f=f, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(g, itnet_formula(op.phi, x, f, counts / S), rtol=1e-12,
                               atol=1e-12)
    # different seeds differ; the average over many draws approaches the `mean` operator
    g2 = op(P=x, f=f, generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(g, g2)
    exact = itnet_formula(op.phi, x, f, torch.full((n,), 1 / n, dtype=D64))
    gen = torch.Generator().manual_seed(0)
    avg = torch.stack([op(P=x, f=f, generator=gen) for _ in range(200)]).mean(0)
    err, spread = (avg - exact).abs().mean(), (exact - f).abs().mean()
    assert err < 0.05 * spread


# ---- linear_attention.it ----------------------------------------------------------------------------


def linear_attention_formula(q, k, v, causal):
    A = F.softplus(q) @ F.softplus(k).transpose(-1, -2)
    if causal:
        A = A * torch.tril(torch.ones(A.shape[-2:], dtype=A.dtype))
    return (A @ v) / A.sum(-1, keepdim=True)


@pytest.mark.parametrize("name,causal", [("linear_attention", False),
                                         ("causal_linear_attention", True)])
def test_linear_attention_equals_formula(name, causal):
    op = load("linear_attention.it", name).double()
    q, k, v = rand(2, 11, 32), rand(2, 11, 32), rand(2, 11, 32)
    fn = lambda: linear_attention_formula(q, k, v, causal)  # noqa: E731
    torch.testing.assert_close(op(q=q, k=k, v=v), fn(), rtol=1e-12, atol=1e-12)
    assert_same_grads(lambda: op(q=q, k=k, v=v), fn, [q, k, v])
    assert gradcheck_op(op, dict(q=rand(5, 32), k=rand(5, 32), v=rand(5, 32)))


# ---- quadratures ----------------------------------------------------------------------------------------


QUAD_SRC = """
operator q {{
    domain I = index
    domain T = grid({lo}, {hi})
    input  f : T -> R
    output g(i: I) = integral(t: T) {body} * f(t) with {rule}
}}
"""


def quad(rule, body, n, lo=0, hi=1):
    src = QUAD_SRC.format(rule=rule, body=body, lo=lo, hi=hi)
    op = itdsl.compile_source(src, target="reference")["q"]
    return op(f=torch.ones(n, dtype=D64), I=1).item()


def test_trapezoid_riemann_simpson_on_known_integrals():
    t = np.linspace(0, math.pi, 21)
    y = np.sin(t)
    assert quad("trapezoid", "sin(t)", 21, 0, "pi") == pytest.approx(np.trapezoid(y, t), 1e-13)
    h = t[1] - t[0]
    assert quad("riemann", "sin(t)", 21, 0, "pi") == pytest.approx(h * y[:-1].sum(), 1e-13)
    simpson = h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())
    assert quad("simpson", "sin(t)", 21, 0, "pi") == pytest.approx(simpson, 1e-13)
    assert quad("simpson", "sin(t)", 21, 0, "pi") == pytest.approx(2.0, abs=1e-5)
    # Simpson with an even number of points (odd intervals: 3/8 rule at the end) is exact
    # for cubics, like the odd case
    for n in (4, 6, 9, 10):
        assert quad("simpson", "(t^3 - 2*t)", n, -1, 2) == pytest.approx(0.75, abs=1e-12)


def test_gauss_legendre_is_exact_for_polynomials():
    src = """
    operator q {
        domain I = index
        domain T = grid(0, 2)
        output g(i: I) = integral(t: T) (t^5 - t) with gauss(3)
    }"""
    g = itdsl.compile_source(src, target="reference")["q"](I=2)
    assert g.shape == (2,)
    assert g[0].item() == pytest.approx(2**6 / 6 - 2, rel=1e-6)


def test_weights_quadrature():
    src = """
    operator q {
        domain X = points(1)
        domain Y = points(1)
        input  w : Y -> R
        input  b : Y -> R^2
        output g(x: X) = integral(y: Y) exp(-sqnorm(x - y)) * b(y) with weights(w)
    }"""
    op = itdsl.compile_source(src, target="reference")["q"]
    x, y, w, b = rand(4, 1), rand(6, 1), rand(6), rand(6, 2)
    fn = lambda: (torch.exp(-torch.cdist(x, y) ** 2) * w) @ b  # noqa: E731
    torch.testing.assert_close(op(X=x, Y=y, w=w, b=b), fn())
    assert gradcheck_op(op, dict(X=x, Y=y, w=w, b=b))


def test_montecarlo_importance_is_self_normalised_in_a_ratio():
    src = """
    operator q {
        domain I = index
        input  v : I -> R^3
        input  s : I -> R
        output g(i: I) = integral(j: I) exp(s(j)) * v(j) with montecarlo(4000, importance = exp(s(j)))
                       / integral(j: I) exp(s(j)) with montecarlo(4000, importance = exp(s(j)))
    }"""
    op = itdsl.compile_source(src, target="reference")["q"]
    v, s = torch.randn(30, 3, dtype=D64), torch.randn(30, dtype=D64)
    g = op(v=v, s=s, generator=torch.Generator().manual_seed(0))
    exact = torch.softmax(s, 0) @ v
    assert (g[0] - exact).abs().max() < 0.1
    # importance proportional to the kernel: each sampled term of the ratio is v(j) itself
    idx = torch.multinomial(torch.softmax(s, 0)[None], 4000, replacement=True,
                            generator=torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(g[0], v[idx].mean(0))


# ---- domains, sizes, batch dims ------------------------------------------------------------------


def test_grid_coordinates_and_output_only_domain():
    src = """
    operator q {
        domain U = grid(-1, 3)
        domain V = index
        input  f : V -> R
        output g(u: U) = u + integral(v: V) f(v)
    }"""
    op = itdsl.compile_source(src, target="reference")["q"]
    f = torch.randn(5)
    g = op(U=9, f=f)
    torch.testing.assert_close(g, torch.linspace(-1, 3, 9) + f.sum())


def test_params_are_named_parameters_and_state_dict_round_trips():
    op = load("gauss.it", "gauss_smooth")
    assert isinstance(op.s, torch.nn.Parameter) and op.s.item() == 0.5
    assert set(dict(op.named_parameters())) == {"s"}
    op2 = load("gauss.it", "gauss_smooth")
    with torch.no_grad():
        op.s.fill_(1.25)
    op2.load_state_dict(op.state_dict())
    assert op2.s.item() == 1.25
    ema = load("ema.it", "ema")
    assert ema.a.shape == (16,) and torch.all(ema.a == 0.5)
