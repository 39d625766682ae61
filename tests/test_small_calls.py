"""Small calls: with few pairs a compiled operator evaluates its Plan materialised in torch
(autograd differentiates it) instead of calling the kernels; the numbers and gradients are
the same as the kernels' and an independent torch computation's."""

import pytest
import torch

import itdsl
from itdsl.errors import InputError
from itdsl.settings import small_pairs
from itdsl.symbolic.costmodel import PairWork, crossover, pair_work

GAUSS = """
operator gauss {
    domain X = points(2)
    domain Y = points(2)
    input  b : Y -> R^3
    param  s : R = 0.7
    output u(x: X) = integral(y: Y) exp(-sqnorm(x - y) / (2 * s^2)) * b(y)
}
"""


@pytest.fixture
def small():
    itdsl.set_small_pairs(None)  # the default, not the suite's 0 ($ITDSL_SMALL_PAIRS)
    import os
    saved = os.environ.pop("ITDSL_SMALL_PAIRS")
    yield
    os.environ["ITDSL_SMALL_PAIRS"] = saved
    itdsl.set_small_pairs(None)


def _torch_gauss(x, y, b, s):
    k = torch.exp(-torch.cdist(x, y).square() / (2 * s * s))
    return k @ b / y.shape[-2]  # (the mean: the default rule on points)


def test_small_call_runs_materialised_and_agrees(small):
    assert small_pairs() is None  # the cost model decides
    torch.manual_seed(0)
    op = itdsl.compile_source(GAUSS, target="cpu")["gauss"].double()
    x = torch.randn(30, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(40, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, 3, dtype=torch.float64, requires_grad=True)
    s = op.s  # the param
    got = op(X=x, Y=y, b=b)
    assert op.last_run == "materialised"
    want = _torch_gauss(x, y, b, s)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    assert torch.autograd.gradcheck(lambda x, y, b: op(X=x, Y=y, b=b), (x, y, b))
    grads = torch.autograd.grad(got, (x, y, b, s), g)
    wants = torch.autograd.grad(want, (x, y, b, s), g)
    for a, w in zip(grads, wants, strict=True):
        torch.testing.assert_close(a, w)
    # the same call on the kernels
    itdsl.set_small_pairs(0)
    kern = op(X=x, Y=y, b=b)
    assert op.last_run == "kernels"
    torch.testing.assert_close(kern, got)


def test_threshold_counts_batch_and_both_sides(small):
    op = itdsl.compile_source(GAUSS, target="cpu")["gauss"]
    itdsl.set_small_pairs(2 * 8 * 8)
    x, y, b = torch.randn(2, 8, 2), torch.randn(2, 8, 2), torch.randn(2, 8, 3)
    op(X=x, Y=y, b=b)
    assert op.last_run == "materialised"
    op(X=x, Y=torch.randn(2, 9, 2), b=torch.randn(2, 9, 3))
    assert op.last_run == "kernels"


def test_nan_and_inf_as_torch_gives_them(small):
    op = itdsl.compile_source(GAUSS, target="cpu")["gauss"]
    x, y, b = torch.randn(5, 2), torch.randn(6, 2), torch.randn(6, 3)
    b[2, 1] = float("nan")
    b[3, 0] = float("inf")
    got = op(X=x, Y=y, b=b)
    assert op.last_run == "materialised"
    torch.testing.assert_close(got, _torch_gauss(x, y, b, op.s.detach()), equal_nan=True)


MASKED = """
operator near {
    domain X = points(2)
    domain Y = points(2)
    input  b : Y -> R^3
    param  s : R = 0.7
    output u(x: X) = integral(y: Y) [sqnorm(x - y) < 1] * exp(-sqnorm(x - y) / s) * b(y)
}
"""


def test_gradients_of_masked_terms_with_a_nan_or_inf_factor_are_zero(small):
    """A point that no x is near has b(y) = (inf, NaN, 1): every term that reads it is masked
    out, so it reaches no gradient (not s's, whose derivative multiplies b at each pair), as
    torch gives it for the factors masked before their product (the reference's semantics of
    a bracket), on the materialised small call as on the kernels."""
    op = itdsl.compile_source(MASKED, target="cpu")["near"].to(torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 2, generator=g, dtype=torch.float64)
    y = torch.rand(6, 2, generator=g, dtype=torch.float64)
    y[5] = 10.0  # far from every x
    b = torch.randn(6, 3, generator=g, dtype=torch.float64)
    b[5, 0], b[5, 1] = float("inf"), float("nan")
    dout = torch.randn(5, 3, generator=g, dtype=torch.float64)

    def grads(fn, s):
        bi = b.clone().requires_grad_()
        out = fn(bi)
        return (out.detach(), *torch.autograd.grad(out, (bi, s), dout))

    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def torch_near(bi):
        d2 = torch.cdist(x, y).square()[..., None]  # [x, y, 1]
        keep, zero = d2 < 1, torch.zeros((), dtype=bi.dtype)
        k = torch.where(keep, torch.exp(-d2 / s), zero)
        return (k * torch.where(keep, bi[None], zero)).sum(1) / y.shape[0]

    want = grads(torch_near, s)
    assert all(torch.isfinite(w).all() for w in want)
    for pairs in (None, 0):  # the cost model's choice (materialised), the kernels
        itdsl.set_small_pairs(pairs)
        got = grads(lambda bi: op(X=x, Y=y, b=bi), op.s)
        assert op.last_run == ("materialised" if pairs is None else "kernels")
        for gv, wv in zip(got, want):
            torch.testing.assert_close(gv, wv)


@pytest.mark.parametrize("bad", [-1, 1.5, "many", True])
def test_bad_settings_are_clear_errors(bad, small):
    with pytest.raises(InputError, match="whole number"):
        itdsl.set_small_pairs(bad)


def test_explain_states_the_crossover(small):
    prog = itdsl.compile_source(GAUSS, target="cpu")
    work = pair_work(prog["gauss"].plan)
    text = prog.explain("gauss")
    for train in (False, True):
        c = crossover(work, train, 4, itdsl.settings.memory_budget())
        line = next(ln for ln in text.splitlines()
                    if ln.strip().startswith("training calls" if train else "forward calls"))
        assert f"≤ {c.pairs:,} pairs" in line
    assert "torch.compile: always the kernels" in text
    itdsl.set_small_pairs(1234)
    assert "at most 1,234 pairs" in prog.explain("gauss")
    itdsl.set_small_pairs(0)
    assert "small calls: off" in prog.explain("gauss")


def test_pair_work_counts_the_pair_nodes(small):
    """exp(-sqnorm(x - y) / (2 s²)) · b(y), b ∈ R^3: the pair-level values are x − y (2),
    its square (2), their sum, the quotient, exp and the product with b (3), or fewer where
    the Plan shares them; no linear layers."""
    work = pair_work(itdsl.compile_source(GAUSS, target="cpu")["gauss"].plan)
    assert work.gemm == 0
    assert 5 <= work.values <= 12
    assert work.ops_forward >= work.values - 3 and work.ops_backward > work.ops_forward
    mlp = """operator m {
        domain P = points(1)
        input  v : P -> R^4
        param  phi : mlp(2 -> 16 -> 16 -> 4, act = gelu)
        output g(x: P) = integral(y: P) phi(x, y) * v(y)
    }"""
    w = pair_work(itdsl.compile_source(mlp, target="cpu")["m"].plan)
    assert w.gemm >= 2 * 16 * 16  # the hidden layer, at least, is a GEMM per pair
    assert w.values >= 16 + 16 + 4


def test_crossover_rules():
    light = PairWork(ops_forward=30, ops_backward=170, values=20, gemm=0)
    heavy = PairWork(ops_forward=4000, ops_backward=36000, values=300, gemm=4000)
    budget = 256 << 20
    for w in (light, heavy):
        f, t = crossover(w, False, 4, budget), crossover(w, True, 4, budget)
        assert 0 < f.pairs and 0 < t.pairs
        # the pair tensors never exceed the budget
        assert f.pairs * w.values * 4 <= budget and t.pairs * w.values * 4 <= budget
    # more values formed per pair make the materialised pass dearer: an earlier crossover;
    # more arithmetic per pair makes the kernels dearer: a later one
    more_values = PairWork(ops_forward=30, ops_backward=170, values=60, gemm=0)
    more_ops = PairWork(ops_forward=300, ops_backward=1700, values=20, gemm=0)
    for train in (False, True):
        base = crossover(light, train, 4, budget).pairs
        assert crossover(more_values, train, 4, budget).pairs < base
        assert crossover(more_ops, train, 4, budget).pairs > base
    # a small budget caps it, and says so
    c = crossover(heavy, True, 4, 1 << 20)
    assert c.by == "memory" and c.pairs == (1 << 20) // (300 * 4)
    # float64 halves the cap
    assert crossover(heavy, True, 8, 1 << 20).pairs == c.pairs // 2


def test_training_and_forward_calls_have_their_own_crossover(small):
    """Gaussian sums: the kernels' backward costs more fixed time than their forward, so a
    training call stays materialised to more pairs than a forward call."""
    op = itdsl.compile_source(GAUSS, target="cpu")["gauss"]
    work = pair_work(op.plan)
    budget = itdsl.settings.memory_budget()
    fwd, train = (crossover(work, t, 4, budget).pairs for t in (False, True))
    assert fwd < train
    n = int(((fwd + train) / 2) ** 0.5)  # n² pairs between the two crossovers
    x, y, b = torch.randn(n, 2), torch.randn(n, 2), torch.randn(n, 3)
    with torch.no_grad():
        want = op(X=x, Y=y, b=b)
    assert op.last_run == "kernels"
    bg = b.clone().requires_grad_(True)
    got = op(X=x, Y=y, b=bg)
    assert op.last_run == "materialised"
    torch.testing.assert_close(got.detach(), want)
    got.sum().backward()
    torch.testing.assert_close(bg.grad, torch.exp(-torch.cdist(x, y).square() / (
        2 * op.s.detach() ** 2)).sum(0)[:, None].expand(n, 3) / n)
    # a grad-free call of the same tensors under no_grad: the forward rule
    with torch.no_grad():
        op(X=x, Y=y, b=bg)
    assert op.last_run == "kernels"
    # a smaller budget sends the training call to the kernels too
    itdsl.set_memory_budget(n * n * work.values * 4 - 1)
    try:
        op(X=x, Y=y, b=bg)
        assert op.last_run == "kernels"
    finally:
        itdsl.set_memory_budget(None)


GELU_BODY = """operator ge {
    domain X = points(1)
    domain Y = points(1)
    input  a : X -> R
    input  b : Y -> R^2
    output u(x: X) = integral(y: Y) gelu(a(x) + sqnorm(x - y)) * b(y) with sum
}"""

GELU_MLP = """operator m {
    domain X = points(1)
    domain Y = points(1)
    input  v : Y -> R^2
    param  phi : mlp(2 -> 8 -> 2, act = gelu)
    output u(x: X) = integral(y: Y) phi(x, y) * v(y)
}"""


def test_gelu_in_torch_traces_under_torch_compile(small):
    """gelu's torch form (a Function with torch's fused backward in eager) is the formula
    as written while torch.compile traces: fullgraph works for the reference target and
    for strategies that run in torch (ITNet's low-rank mixer), with and without grad, and
    the Plan evaluator's cached node order is not traced (no lru_cache warning)."""
    import warnings

    from itdsl.nn.mix import mix_source
    g = torch.Generator().manual_seed(0)
    cases = [
        (itdsl.compile_source(GELU_BODY, target="reference")["ge"],
         dict(X=torch.randn(6, 1, generator=g), Y=torch.randn(5, 1, generator=g),
              a=torch.randn(6, generator=g), b=torch.randn(5, 2, generator=g)), "a"),
        (itdsl.compile_source(mix_source("lowrank", 1, 2, 3, 8, rank=4, layers=1),
                              target="cpu")["mix"],
         dict(P=torch.rand(6, 1, generator=g), a=torch.randn(6, 2, generator=g),
              v=torch.randn(6, 3, generator=g), w=torch.rand(6, generator=g)), "v"),
    ]
    for op, kw, leaf in cases:
        torch._dynamo.reset()
        f = torch.compile(lambda op=op, **k: op(**k), fullgraph=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*lru_cache")  # Dynamo's warning
            with torch.no_grad():
                torch.testing.assert_close(f(**kw), op(**kw))
            x = kw[leaf].clone().requires_grad_(True)
            out = f(**{**kw, leaf: x})
        (gx,) = torch.autograd.grad(out.square().sum(), x)
        x2 = kw[leaf].clone().requires_grad_(True)
        (want,) = torch.autograd.grad(op(**{**kw, leaf: x2}).square().sum(), x2)
        torch.testing.assert_close(gx, want)


def test_small_calls_of_gelu_mlps_take_torch_func_transforms(small):
    """A small call runs in torch, and torch.func's jacrev and grad go through it (gelu's
    Function has setup_context and a vmap rule), agreeing with the reference."""
    g = torch.Generator().manual_seed(1)
    X, Y, v = (torch.randn(4, 1, generator=g), torch.randn(5, 1, generator=g),
               torch.randn(5, 2, generator=g))
    op = itdsl.compile_source(GELU_MLP, target="cpu")["m"]
    ref = itdsl.compile_source(GELU_MLP, target="reference")["m"]
    ref.load_state_dict(op.state_dict())
    J = torch.func.jacrev(lambda X: op(X=X, Y=Y, v=v))(X)
    assert op.last_run == "materialised"
    torch.testing.assert_close(J, torch.func.jacrev(lambda X: ref(X=X, Y=Y, v=v))(X))
    params = dict(op.named_parameters())

    def loss(module):
        return lambda p: torch.func.functional_call(module, p, (), dict(X=X, Y=Y, v=v)).sum()
    got, want = torch.func.grad(loss(op))(params), torch.func.grad(loss(ref))(params)
    for k in got:
        torch.testing.assert_close(got[k], want[k])
