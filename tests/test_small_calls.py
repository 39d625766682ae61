"""Small calls: with few pairs a compiled operator evaluates its Plan materialised in torch
(autograd differentiates it) instead of calling the kernels; the numbers and gradients are
the same as the kernels' and an independent torch computation's."""

import pytest
import torch

import itdsl
from itdsl.errors import InputError
from itdsl.settings import DEFAULT_SMALL_PAIRS, small_pairs

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
    assert small_pairs() == DEFAULT_SMALL_PAIRS
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


@pytest.mark.parametrize("bad", [-1, 1.5, "many", True])
def test_bad_settings_are_clear_errors(bad, small):
    with pytest.raises(InputError, match="whole number"):
        itdsl.set_small_pairs(bad)


def test_explain_states_the_crossover(small):
    text = itdsl.compile_source(GAUSS, target="cpu").explain("gauss")
    assert f"at most {DEFAULT_SMALL_PAIRS:,} pairs" in text
