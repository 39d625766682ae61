"""Programs a new user wrote that crashed or gave wrong numbers, each against torch written
independently (forward and every gradient, float64 and float32, compiled kernels and the
automatic strategy).

Found by trying itdsl as a new user would: a backward custom op that returned an alias of
its input, a float32 kernel TVM refused to compile, a one-output mlp in a dense kernel, and
float32 kernels that turned NaN and overflow into finite numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from util import EXAMPLES, gradcheck_op

import itdsl

D = torch.float64
GEN = torch.Generator().manual_seed(7)


def rnd(*shape, dtype=D):
    return torch.randn(*shape, generator=GEN, dtype=dtype)


def pair_mean(K: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ_j K[i, j] v[j] / m (the default `mean` rule on points)."""
    return torch.einsum("ij,j...->i...", K, v) / K.shape[1]


def mlp(op, name: str, x: torch.Tensor) -> torch.Tensor:
    """The op's mlp applied by hand: Linear layers with gelu between."""
    layers = [m for m in getattr(op, name) if isinstance(m, torch.nn.Linear)]
    for k, lin in enumerate(layers):
        x = x @ lin.weight.T + lin.bias
        if k < len(layers) - 1:
            x = F.gelu(x)
    return x


def sqdist(x, y):
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


# name -> (program, inputs(dtype), torch formula(op, **inputs), params the formula reads)
CASES = {
    "field_added_to_integral": (
        """operator a {
            domain X = points(3)
            input  h : X -> R^2
            input  b : X -> R^2
            output u(x: X) = h(x) + integral(y: X) exp(-sqnorm(x - y)) * b(y)
        }""",
        lambda dt: dict(X=rnd(5, 3, dtype=dt), h=rnd(5, 2, dtype=dt), b=rnd(5, 2, dtype=dt)),
        lambda op, X, h, b: h + pair_mean(torch.exp(-sqdist(X, X)), b)),
    "weights_all_inputs_require_grad": (
        """operator a {
            domain X = points(3)
            input  w : X -> R
            input  b : X -> R^2
            output u(x: X) = integral(y: X) exp(-sqnorm(x - y)) * b(y) with weights(w)
        }""",
        lambda dt: dict(X=rnd(5, 3, dtype=dt), w=rnd(5, dtype=dt), b=rnd(5, 2, dtype=dt)),
        lambda op, X, w, b: torch.exp(-sqdist(X, X)) @ (w[:, None] * b)),
    "component_and_max": (
        """operator a {
            domain X = points(3)
            input  b : X -> R
            output u(x: X) = integral(y: X) max(x[0] - y[0], 0) * b(y)
        }""",
        lambda dt: dict(X=rnd(6, 3, dtype=dt), b=rnd(6, dtype=dt)),
        lambda op, X, b: pair_mean(torch.relu(X[:, None, 0] - X[None, :, 0]), b)),
    "sum_inside_integral": (
        """operator a {
            domain X = points(3)
            domain Y = points(3)
            input  b : Y -> R
            output u(x: X) = integral(y: Y) (sum(x * y) + x[0] - y[1]) * b(y) with sum
        }""",
        lambda dt: dict(X=rnd(4, 3, dtype=dt), Y=rnd(5, 3, dtype=dt), b=rnd(5, dtype=dt)),
        lambda op, X, Y, b: (X @ Y.T + X[:, None, 0] - Y[None, :, 1]) @ b),
    "sigmoid_softplus_param": (
        """operator a {
            domain X = points(3)
            input  b : X -> R
            param  s : R = 0.5
            output u(x: X) = integral(y: X) sigmoid(s * dot(x, y)) * softplus(x[0] - y[1]) * b(y)
        }""",
        lambda dt: dict(X=rnd(6, 3, dtype=dt), b=rnd(6, dtype=dt)),
        lambda op, X, b: pair_mean(torch.sigmoid(op.s * X @ X.T)
                                   * F.softplus(X[:, None, 0] - X[None, :, 1]), b)),
    "mlp_with_one_output": (
        """operator a {
            domain X = points(2)
            input  f : X -> R
            param  phi : mlp(4 -> 8 -> 1)
            output u(x: X) = integral(y: X) phi(x, y) * f(y)
        }""",
        lambda dt: dict(X=rnd(5, 2, dtype=dt), f=rnd(5, dtype=dt)),
        lambda op, X, f: pair_mean(mlp(op, "phi", torch.cat(
            [X[:, None, :].expand(5, 5, 2), X[None, :, :].expand(5, 5, 2)], -1))[..., 0], f)),
    "relative_position_mlp": (
        """operator a {
            domain T = index
            input  f : T -> R^3
            param  phi : mlp(1 -> 16 -> 1)
            output u(t: T) = integral(s: T) phi(t - s) * f(s)
        }""",
        lambda dt: dict(f=rnd(7, 3, dtype=dt)),
        lambda op, f: mlp(op, "phi", (torch.arange(7.0, dtype=f.dtype)[:, None]
                                      - torch.arange(7.0, dtype=f.dtype)[None, :])[..., None])[..., 0]
        @ f),
    "itnet_kernel_on_a_sequence": (
        """operator a {
            domain T = index
            input  f : T -> R^4
            param  phi : mlp(10 -> 64 -> 4)
            output u(t: T) = integral(s: T) phi((t - s) / 4, t / 32, f(t), f(s)) * f(s)
        }""",
        lambda dt: dict(f=rnd(6, 4, dtype=dt)),
        lambda op, f: _itnet(op, f)),
    "itnet_kernel_deeper": (
        """operator a {
            domain T = index
            input  f : T -> R^4
            param  phi : mlp(10 -> 16 -> 16 -> 4)
            output u(t: T) = integral(s: T) phi((t - s) / 4, t / 32, f(t), f(s)) * f(s)
        }""",
        lambda dt: dict(f=rnd(6, 4, dtype=dt)),
        lambda op, f: _itnet(op, f)),
    # functions of functions: each would nest let-bound values in one kernel, which TVM's
    # code generator took minutes (softplus of exp: more than 15) to compile in float32
    "nested_functions": (
        """operator a {
            domain X = points(2)
            input  b : X -> R
            output u(x: X) = integral(y: X) softplus(exp(x[0] * y[0])) * tanh(tanh(x[1] - y[1]))
                                           * exp(exp(-sqnorm(x - y))) * b(y)
        }""",
        lambda dt: dict(X=rnd(6, 2, dtype=dt), b=rnd(6, dtype=dt)),
        lambda op, X, b: pair_mean(
            F.softplus(torch.exp(X[:, None, 0] * X[None, :, 0]))
            * torch.tanh(torch.tanh(X[:, None, 1] - X[None, :, 1]))
            * torch.exp(torch.exp(-sqdist(X, X))), b)),
    "norm_of_a_scalar_minus_a_vector": (  # |u − v|² with u a scalar: broadcast, not expanded
        """operator a {
            domain X = points(3)
            input  b : X -> R
            output u(x: X) = integral(y: X) exp(-sqnorm(norm(y) - x) / 4) * b(y)
        }""",
        lambda dt: dict(X=rnd(6, 3, dtype=dt), b=rnd(6, dtype=dt)),
        lambda op, X, b: pair_mean(torch.exp(-((X.norm(dim=-1)[None, :, None] - X[:, None, :])
                                               ** 2).sum(-1) / 4), b)),
}


def _itnet(op, f):
    n = f.shape[0]
    t = torch.arange(float(n), dtype=f.dtype)
    args = torch.cat([((t[:, None] - t[None, :]) / 4)[..., None],
                      (t[:, None] / 32).expand(n, n)[..., None],
                      f[:, None, :].expand(n, n, 4), f[None, :, :].expand(n, n, 4)], -1)
    return (mlp(op, "phi", args) * f[None, :, :]).sum(1)


def _build(name: str, strategy: str | None, dtype):
    text, make, formula = CASES[name]
    op = itdsl.compile_source(text, target="cpu", strategy=strategy)["a"].to(dtype)
    torch.manual_seed(3)
    with torch.no_grad():  # params away from their initial values
        for p in op.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return op, make(dtype), formula


@pytest.mark.parametrize("strategy", [None, "dense"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_gradients_match_torch_float64(name, strategy):
    op, inputs, formula = _build(name, strategy, D)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    got = op(**leaves)
    want = formula(op, **leaves)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    dout = rnd(*got.shape)
    params = list(op.parameters())
    every = list(leaves.values()) + params
    g = torch.autograd.grad(got, every, dout, allow_unused=True)
    w = torch.autograd.grad(want, every, dout, allow_unused=True)
    for a, b in zip(g, w):
        if b is None:
            assert a is None or not a.abs().max(), "a gradient where torch has none"
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["field_added_to_integral", "weights_all_inputs_require_grad",
                                  "sigmoid_softplus_param", "mlp_with_one_output"])
def test_gradcheck_dense_kernels(name):
    op, inputs, _ = _build(name, "dense", D)
    assert gradcheck_op(op, inputs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_kernels_match_torch(name):
    op, inputs, formula = _build(name, "dense", torch.float32)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    got = op(**leaves)
    op64 = op.double()
    want = formula(op64, **{k: v.detach().double().requires_grad_(True) for k, v in
                            leaves.items()})
    scale = want.abs().max().item()
    assert (got.double() - want).abs().max().item() <= 1e-5 * scale
    got.backward(torch.ones_like(got))  # the backward kernels compile and run in float32
    assert all(torch.isfinite(v.grad).all() for v in leaves.values())


# ---- NaN, ±inf and overflow come out of the float32 kernels as torch gives them -------------

SPECIAL = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, 3.0, -30.0, 30.0, 88.5, 88.8, 89.0, 100.0,
                        -87.0, -88.0, -100.0, 1e30, -1e30, math.inf, -math.inf, math.nan])

ELEMENTWISE = {
    "exp(v)": torch.exp, "log(v)": torch.log, "sqrt(v)": torch.sqrt, "abs(v)": torch.abs,
    "sin(v)": torch.sin, "cos(v)": torch.cos, "tanh(v)": torch.tanh,
    "sigmoid(v)": torch.sigmoid, "relu(v)": torch.relu,
    # the exact gelu as written (torch's F.gelu gives NaN at +inf on float32 vectors only)
    "gelu(v)": lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2.0))),
    "softplus(v)": F.softplus, "max(v, 0)": lambda v: torch.maximum(v, torch.zeros_like(v)),
    "min(v, 0)": lambda v: torch.minimum(v, torch.zeros_like(v)),
    "min(0.5, v)": lambda v: torch.minimum(torch.full_like(v, 0.5), v),
    "1 / v": lambda v: 1 / v, "v^2": lambda v: v ** 2, "v^0.5": lambda v: v ** 0.5,
    "[v < 1]": lambda v: (v < 1).to(v.dtype), "exp(-v * v)": lambda v: torch.exp(-v * v),
    "softplus(exp(v))": lambda v: F.softplus(torch.exp(v)),
    "tanh(sigmoid(relu(v)))": lambda v: torch.tanh(torch.sigmoid(torch.relu(v))),
}


def _same_specials(got: torch.Tensor, want: torch.Tensor, what: str, rel: float) -> None:
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN at other places"
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf), f"{what}: inf at other places"
    assert torch.equal(got[inf], want[inf]), f"{what}: inf of another sign"
    fin = torch.isfinite(want)
    err = (got[fin] - want[fin]).abs() / want[fin].abs().clamp_min(1e-30)
    assert err.numel() == 0 or err.max().item() <= rel, f"{what}: error {err.max().item():.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, D])
@pytest.mark.parametrize("body", sorted(ELEMENTWISE))
def test_special_values_as_torch(body, dtype):
    """out(x) = Σ_y F(x·y) over a single y = 1: F of each special value, per pair."""
    text = f"""operator a {{
        domain X = points(1)
        domain Y = points(1)
        input  b : Y -> R
        output u(x: X) = integral(y: Y) ({body.replace('v', '(x[0] * y[0])')}) * b(y) with sum
    }}"""
    op = itdsl.compile_source(text, target="cpu", strategy="dense")["a"]
    v = SPECIAL.to(dtype)
    got = op(X=v[:, None], Y=torch.ones(1, 1, dtype=dtype), b=torch.ones(1, dtype=dtype))
    want = ELEMENTWISE[body](v)
    # exp of arguments near the overflow: the polynomial's few ulps; subnormals may flush to 0
    rel = 2e-6 if dtype == torch.float32 else 1e-12
    flushed = (want.abs() < torch.finfo(dtype).tiny) & (got == 0)
    _same_specials(torch.where(flushed, want, got), want, body, rel)


def test_nan_coordinate_gives_a_nan_row():
    text = """operator gauss {
        domain X = points(3)
        input  b : X -> R^4
        output u(x: X) = integral(y: X) exp(-sqnorm(x - y)) * b(y)
    }"""
    op = itdsl.compile_source(text, target="cpu")["gauss"]
    X = torch.rand(6, 3)
    X[2, 1] = math.nan
    out = op(X=X, b=torch.ones(6, 4))
    want = pair_mean(torch.exp(-sqdist(X, X)), torch.ones(6, 4))
    _same_specials(out, want, "gauss with a NaN point", 1e-5)
    assert torch.isnan(out).all()  # the NaN point is in every row's sum


# ---- empty domains: what the sums give (empty tensors, zeros), or a clear error ----------

EMPTY = """operator e {
    domain X = points(2)
    domain Y = points(2)
    input  h : X -> R^3
    input  b : Y -> R^3
    param  s : R = 0.7
    output u(x: X) = h(x) + integral(y: Y) exp(-s * sqnorm(x - y)) * b(y) with sum
}"""


def _empty_formula(op, X, Y, h, b):
    return h + torch.exp(-op.s * sqdist(X.reshape(-1, 2), Y)).reshape(
        *X.shape[:-1], Y.shape[0]) @ b


@pytest.mark.parametrize("target, strategy", [("reference", None), ("cpu", None),
                                              ("cpu", "dense")])
@pytest.mark.parametrize("n, m, batch", [(0, 4, ()), (3, 0, ()), (3, 4, (0,)), (0, 0, (2,))])
def test_empty_domains_give_what_the_sums_give(target, strategy, n, m, batch):
    op = itdsl.compile_source(EMPTY, target=target, strategy=strategy)["e"].double()
    X, h = rnd(*batch, n, 2).requires_grad_(), rnd(*batch, n, 3).requires_grad_()
    Y, b = rnd(m, 2).requires_grad_(), rnd(m, 3).requires_grad_()
    got = op(X=X, Y=Y, h=h, b=b)
    want = _empty_formula(op, X, Y, h, b)
    assert got.shape == want.shape == (*batch, n, 3)
    torch.testing.assert_close(got, want)
    leaves = [X, Y, h, b, op.s]
    g = torch.autograd.grad(got.sum(), leaves, allow_unused=True)
    w = torch.autograd.grad(want.sum(), leaves, allow_unused=True)
    for a, c, leaf in zip(g, w, leaves):
        a = torch.zeros_like(leaf) if a is None else a
        c = torch.zeros_like(leaf) if c is None else c
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_a_normalised_integral_over_no_points_is_nan(target):
    """0/0, as for a row whose every score is masked."""
    op = itdsl.compile_file(EXAMPLES / "attention.it", target=target)["attention"]
    out = op(q=torch.randn(3, 64), k=torch.randn(0, 64), v=torch.randn(0, 64))
    assert out.shape == (3, 64) and torch.isnan(out).all()


@pytest.mark.parametrize("target", ["reference", "cpu"])
@pytest.mark.parametrize("rule, words", [("mean", "the mean over no points is undefined"),
                                         ("montecarlo(4)", "no point can be sampled")])
def test_mean_and_montecarlo_over_no_points_are_clear_errors(target, rule, words):
    text = EMPTY.replace("with sum", f"with {rule}")
    op = itdsl.compile_source(text, target=target)["e"]
    with pytest.raises(itdsl.InputError, match=words) as err:
        op(X=torch.rand(3, 2), Y=torch.rand(0, 2), h=torch.rand(3, 3), b=torch.rand(0, 3))
    assert err.value.span is not None and err.value.span.line == 7  # the output


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_empty_sequence_through_the_recurrence(target):
    op = itdsl.compile_file(EXAMPLES / "ema.it", target=target)["ema"]
    f = torch.randn(2, 0, 16, requires_grad=True)
    out = op(f=f)
    assert out.shape == (2, 0, 16)
    out.sum().backward()
    assert f.grad.shape == f.shape


# ---- derivatives where calculus leaves a choice: torch's ----------------------------------

@pytest.mark.parametrize("target, strategy", [("reference", None), ("cpu", "dense")])
def test_min_max_and_pow_gradients_follow_torch_at_ties_nan_and_zero(target, strategy):
    text = """operator t {
        domain X = index
        input  f : X -> R
        param  a : R = 0.5
        param  c : R = 1.5
        output o(x: X) = min(f(x), a) + max(f(x), a) + max(x - 1, 0) + f(x)^c + x^c
    }"""
    op = itdsl.compile_source(text, target=target, strategy=strategy)["t"].double()
    f = torch.tensor([0.5, math.nan, 0.0, 2.0], dtype=D, requires_grad=True)
    a, c = op.a, op.c
    xs = torch.arange(4.0, dtype=D)
    want = (torch.minimum(f, a) + torch.maximum(f, a) + torch.maximum(xs - 1, torch.zeros(()))
            + f ** c + xs ** c)
    got = op(f=f)
    _same_specials(got.detach(), want.detach(), "forward", 1e-12)
    g = torch.autograd.grad(got.sum(), [f, a, c])
    w = torch.autograd.grad(want.sum(), [f, a, c])
    for x, y in zip(g, w):
        _same_specials(x, y, "gradient", 1e-12)


# ---- found by a new user's review: NaN and overflow in gradients, second derivatives -------

PATHS = [("reference", None), ("cpu", None), ("cpu", "dense")]


@pytest.mark.parametrize("target, strategy", PATHS)
def test_relu_of_nan_passes_the_gradient_as_torch(target, strategy):
    text = """operator r {
        domain X = points(1)
        domain Y = points(1)
        input  b : Y -> R
        output u(x: X) = integral(y: Y) relu(x[0] - y[0]) * b(y) with sum
    }"""
    op = itdsl.compile_source(text, target=target, strategy=strategy)["r"]
    X = torch.tensor([[math.nan], [2.0], [-1.0]], dtype=D, requires_grad=True)
    Y = torch.tensor([[0.5]], dtype=D, requires_grad=True)
    b = torch.tensor([1.5], dtype=D)
    w = torch.tensor([1.0, 0.5, 2.0], dtype=D)
    got = torch.autograd.grad((op(X=X, Y=Y, b=b) * w).sum(), [X, Y])
    want = torch.autograd.grad(((torch.relu(X[:, None, 0] - Y[None, :, 0]) * b).sum(1) * w)
                               .sum(), [X, Y])
    for x, y in zip(got, want):
        _same_specials(x, y, "gradient", 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, D])
@pytest.mark.parametrize("target, strategy", PATHS)
def test_masked_scores_that_overflow_leave_gradients_finite(target, strategy, dtype):
    """A masked-out (future) pair whose score is far above its row's live ones: torch's
    masked softmax gives finite gradients, so must every path (0 · inf was NaN)."""
    text = """operator ca {
        domain I = index
        domain J = index
        input  q : I -> R
        input  k : J -> R
        input  v : J -> R^2
        kernel a(i: I, j: J) = exp(q(i) * k(j)) * [j <= i]
        output o(i: I) = integral(j: J) a(i, j) * v(j) / integral(j: J) a(i, j)
    }"""
    op = itdsl.compile_source(text, target=target, strategy=strategy)["ca"]
    big = 1000.0 if dtype == D else 100.0
    q = torch.tensor([1.0, 1.0, 0.5], dtype=dtype, requires_grad=True)
    k = torch.tensor([0.0, big, -1.0], dtype=dtype, requires_grad=True)
    v = torch.tensor([[1.0, 0.5], [2.0, -1.0], [0.0, 3.0]], dtype=dtype, requires_grad=True)
    cot = torch.tensor([[1.0, -2.0], [0.5, 1.0], [2.0, 0.25]], dtype=dtype)
    s = (q[:, None] * k[None, :]).masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1),
                                             -math.inf)
    want_out = torch.softmax(s, -1) @ v
    want = torch.autograd.grad((want_out * cot).sum(), [q, k, v])
    got_out = op(q=q, k=k, v=v)
    got = torch.autograd.grad((got_out * cot).sum(), [q, k, v])
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got_out, want_out, rtol=tol, atol=tol)
    for x, y in zip(got, want):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def test_a_row_whose_live_scores_are_all_minus_inf_is_nan_as_torch():
    """Attention with a position term (itdsl's own online softmax): a row whose every live
    score is -inf has no mass, 0/0 as torch's softmax gives, not the mean of v."""
    text = """operator att {
        domain T = index
        input  q : T -> R^2
        input  k : T -> R^2
        input  v : T -> R
        param  m : R = 0.3
        output o(x: T) = integral(y: T) exp(dot(q(x), k(y)) - m * abs(x - y)) * [y <= x] * v(y)
                         / integral(y: T) exp(dot(q(x), k(y)) - m * abs(x - y)) * [y <= x]
    }"""
    q = torch.tensor([[1.0, 0.0], [-math.inf, 0.0], [0.5, 0.5]], dtype=D)
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=D)
    v = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    s = q @ k.T - 0.3 * (torch.arange(3.0)[:, None] - torch.arange(3.0)[None, :]).abs()
    s = s.masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), -math.inf)
    want = torch.softmax(s, -1) @ v
    for strategy in (None, "dense"):
        op = itdsl.compile_source(text, target="cpu", strategy=strategy)["att"].double()
        _same_specials(op(q=q, k=k, v=v), want, f"strategy {strategy}", 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, D])
@pytest.mark.parametrize("target, strategy", PATHS)
def test_a_nan_spline_argument_gives_nan(target, strategy, dtype):
    text = """operator sp {
        domain X = points(1)
        domain Y = points(1)
        input  b : Y -> R
        param  V : spline(6)
        output u(x: X) = integral(y: Y) V(x[0]) * y[0] * b(y) with sum
    }"""
    op = itdsl.compile_source(text, target=target, strategy=strategy)["sp"].to(dtype)
    X = torch.tensor([[math.nan], [0.3]], dtype=dtype)
    Y = torch.tensor([[0.5], [2.0]], dtype=dtype, requires_grad=True)
    u = op(X=X, Y=Y, b=torch.tensor([1.0, -1.0], dtype=dtype))
    assert torch.isnan(u[0]) and torch.isfinite(u[1])
    u.sum().backward()
    assert torch.isnan(Y.grad).all() and torch.isnan(op.V.grad).any()


def test_second_derivatives_of_compiled_operators_are_a_clear_error():
    op = itdsl.compile_source(CASES["field_added_to_integral"][0], target="cpu")["a"].double()
    X = rnd(4, 3).requires_grad_(True)
    out = op(X=X, h=rnd(4, 2), b=rnd(4, 2))
    (g,) = torch.autograd.grad(out.sum(), X, create_graph=True)
    with pytest.raises(itdsl.UnsupportedError, match="second derivatives") as err:
        g.sum().backward()
    assert 'target="reference"' in err.value.hint
    ref = itdsl.compile_source(CASES["field_added_to_integral"][0], target="reference")["a"].double()
    (g,) = torch.autograd.grad(ref(X=X, h=rnd(4, 2), b=rnd(4, 2)).sum(), X, create_graph=True)
    g.sum().backward()  # the reference differentiates twice


def test_sparse_inputs_and_overflowing_grids_are_clear_errors():
    op = itdsl.compile_source(CASES["field_added_to_integral"][0], target="cpu")["a"]
    with pytest.raises(itdsl.InputError, match="sparse"):
        op(X=torch.rand(4, 3).to_sparse(), h=torch.rand(4, 2), b=torch.rand(4, 2))
    with pytest.raises(itdsl.ParseError, match="overflows"):
        itdsl.compile_source("operator a { domain X = grid(-1e308, 1e308) input b : X -> R "
                             "output u(x: X) = integral(y: X) b(y) }")


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_an_index_of_size_zero_by_keyword_is_empty(target):
    text = """operator a {
        domain T = index
        param  c : R = 1
        output o(x: T) = integral(y: T) exp(-c * (x - y)^2) with sum
    }"""
    op = itdsl.compile_source(text, target=target)["a"]
    assert op(T=0).shape == (0,)
    t = torch.arange(3.0)
    torch.testing.assert_close(op(T=3), torch.exp(-(t[:, None] - t[None, :]) ** 2).sum(1))
    with pytest.raises(itdsl.InputError, match="at least 0"):
        op(T=-1)


_PADDED_ATTENTION = """
operator padded_attention {
    domain I = index
    domain J = index
    input  q : I -> R^4
    input  k : J -> R^4
    input  v : J -> R^4
    input  w : J -> R
    kernel a(i: I, j: J) = exp(dot(q(i), k(j)))
    output o(i: I) = integral(j: J) a(i, j) * v(j) with weights(w) / integral(j: J) a(i, j) with weights(w)
}
"""


@pytest.mark.parametrize("target,strategy", [("reference", None), ("cpu", None),
                                             ("cpu", "dense")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_padding_weights_with_huge_scores(target, strategy, dtype):
    """A padding mask given as weights(w) (w = 0 on the padding): the softmax shift's max
    runs over the live points only, so padded keys with scores ~10³ above the rest neither
    underflow the live terms (0/0) nor overflow to 0 · inf (they gave NaN everywhere)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    k[:, 4:] *= 300
    w = torch.ones(2, 6, dtype=torch.float64)
    w[:, 4:] = 0
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    s = leaves[0] @ leaves[1][:, :4].transpose(-1, -2)
    expected = torch.softmax(s, -1) @ leaves[2][:, :4]
    cot = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(expected, leaves, cot)
    m = itdsl.compile_source(_PADDED_ATTENTION, target=target,
                             strategy=strategy)["padded_attention"]
    if target == "cpu":  # the tiled online softmax masks the points of weight 0 too
        assert m.strategy == (strategy or "attention")
    ins = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = m(q=ins[0], k=ins[1], v=ins[2], w=w.to(dtype))
    got = torch.autograd.grad(out, ins, cot.to(dtype))
    tol = 1e-10 if dtype is torch.float64 else 1e-4
    torch.testing.assert_close(out.double(), expected.detach(), rtol=tol, atol=tol)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


_TINY_DENOMINATOR = """
operator tiny {
    domain X = points(1)
    domain Y = points(1)
    input  b : Y -> R
    input  w : Y -> R
    kernel k(x: X, y: Y) = sum(x) * sum(y) + 1
    output o(x: X) = integral(y: Y) softplus(k(x, y)) * b(y) with weights(w)
                   / integral(y: Y) softplus(k(x, y)) with weights(w)
}
"""


def test_a_ratio_with_a_tiny_float32_denominator_has_finite_gradients():
    """d(a/c)/dc is −(a/c)·(1/c), as torch's −(a/c)/c: the textbook −a/c² squares a float32
    denominator of 1e-20 (softplus(−43)) to 0 in the kernels and gave inf gradients where
    torch's are finite."""
    X = torch.tensor([[0.47], [0.6], [-80.0]])
    Y, b, w = torch.tensor([[0.56]]), torch.tensor([1.7]), torch.tensor([0.13])
    op = itdsl.compile_source(_TINY_DENOMINATOR, target="cpu")["tiny"]
    assert op.strategy == "dense"  # (the TVM kernels)
    ins = [t.clone().requires_grad_(True) for t in (X, Y, b, w)]
    out = op(X=ins[0], Y=ins[1], b=ins[2], w=ins[3])
    ref = [t.double().requires_grad_(True) for t in (X, Y, b, w)]
    s = F.softplus(ref[0] @ ref[1].T + 1) * ref[3]
    want = (s @ ref[2]) / s.sum(1)
    cot = torch.tensor([1.0, -2.0, 0.5])
    got = torch.autograd.grad(out, ins, cot)
    wants = torch.autograd.grad(want, ref, cot.double())
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=1e-6)
    for a, e in zip(got, wants, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target, strategy", PATHS)
def test_float32_constants_beyond_its_range_are_inf_as_torch_rounds_them(target, strategy):
    """A constant above the largest float32 is ±inf in a float32 call (torch rounds a Python
    float so), and one just above it, within half an ulp, is the largest float32; TVM refuses
    such literals, so the kernels must round them first."""
    big, near = 1e39, 3.4028235e38  # (near: within half an ulp of the largest float32)
    src = f"""operator big {{
        domain X = points(1)
        input  b : X -> R
        output o(x: X) = integral(y: X) exp(-{big} * (sqnorm(x - y) + 1)) * b(y) + integral(y: X) min(abs(x[0] * y[0]) * {near}, {near}) * 1e-30 * b(y)
    }}"""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(6, 1, generator=g)
    b = torch.randn(6, generator=g)
    x, y = X[:, 0, None], X[None, :, 0]
    c, n = torch.tensor(big, dtype=torch.float32), torch.tensor(near, dtype=torch.float32)
    assert math.isinf(c.item()) and math.isfinite(n.item())
    want = (torch.exp(-c * ((x - y) ** 2 + 1)) * b).mean(-1) + (  # (mean: points' default)
        torch.minimum((x * y).abs() * n, n) * 1e-30 * b).mean(-1)
    kw = {} if strategy is None else {"strategy": strategy}
    op = itdsl.compile_source(src, target=target, **kw)["big"].float()
    assert torch.isfinite(want).all()
    torch.testing.assert_close(op(X=X, b=b), want)
