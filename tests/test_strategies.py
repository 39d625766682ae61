"""Strategies with their own algorithm equal the reference and the dense path.

So far: matmul (the kernel sampled into a matrix, then a GEMM), for Integral Neural
Network layers and the matmul kernels of the recogniser's table.
"""

from __future__ import annotations

import pytest
import torch
from util import EXAMPLES, gradcheck_op, random_inputs

import itdsl
from itdsl.frontend import load_source

D = torch.float64
INN = EXAMPLES / "inn_linear.it"


def pair(target_strategy=None):
    op = itdsl.compile_file(INN, target="cpu", strategy=target_strategy)["integral_linear"]
    ref = itdsl.compile_file(INN, target="reference")["integral_linear"]
    ref.load_state_dict(op.state_dict())
    return op, ref


def test_inn_layer_runs_as_a_matmul_and_equals_the_reference():
    op, ref = pair()
    assert op.strategy == "matmul" and op._runner is not None
    op, ref = op.double(), ref.double()
    for U, V, batch in ((24, 31, (2,)), (7, 5, ()), (64, 16, (3, 2))):
        f = torch.randn(*batch, V, dtype=D, requires_grad=True)
        out, want = op(f=f, U=U), ref(f=f, U=U)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        dout = torch.randn(out.shape, dtype=D)
        g = torch.autograd.grad(out, [f, op.W, op.c], dout)
        w = torch.autograd.grad(want, [f, ref.W, ref.c], dout)
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert gradcheck_op(op, dict(f=torch.randn(2, 6, dtype=D), U=5))


def test_matmul_equals_the_dense_lowering():
    op, _ = pair()
    dense = itdsl.compile_file(INN, target="cpu", strategy="dense")["integral_linear"]
    dense.load_state_dict(op.state_dict())
    assert dense.strategy == "dense" and dense._runner is None
    f = torch.randn(4, 40)
    torch.testing.assert_close(op(f=f, U=33), dense(f=f, U=33), rtol=1e-5, atol=1e-5)


def test_the_sampled_matrix_is_kept_per_param_version_and_size():
    op, ref = pair()
    f = torch.randn(3, 20)
    with torch.no_grad():
        a = op(f=f, U=12)
        assert op(f=f, U=12).equal(a)
        kept = dict(op._runner._kept)
        assert kept  # the matrix and the per-point values of params only
        op.W.add_(0.5)  # a new param version: resampled
        ref.load_state_dict(op.state_dict())
        torch.testing.assert_close(op(f=f, U=12), ref(f=f, U=12), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(op(f=f, U=7), ref(f=f, U=7), rtol=1e-5, atol=1e-6)
    # while gradients are recorded nothing is kept across calls: each call is its own graph
    out = op(f=f, U=12)
    out.sum().backward()
    assert op.W.grad is not None and op.W.grad.abs().sum() > 0


def test_writes_through_data_resample_the_matrix():
    """`.data` writes keep a param's version counter: the kept matrix must still go."""
    op, ref = pair()
    f = torch.randn(3, 20)
    with torch.no_grad():
        op(f=f, U=12)
        op.W.data.mul_(2.0)  # in place, version counter unchanged
        ref.load_state_dict(op.state_dict())
        torch.testing.assert_close(op(f=f, U=12), ref(f=f, U=12), rtol=1e-5, atol=1e-6)
        op.W.data = op.W.data * -0.5  # a new tensor
        ref.load_state_dict(op.state_dict())
        torch.testing.assert_close(op(f=f, U=12), ref(f=f, U=12), rtol=1e-5, atol=1e-6)


def _matmul_table():
    from test_recognize import CASES
    return [(c[0], c[1]) for c in CASES if c[2] == "matmul"]


@pytest.mark.parametrize("name,source", _matmul_table(), ids=[c[0] for c in _matmul_table()])
def test_table_matmul_kernels(name, source):
    text = "operator k {\n" + source + "\n}\n"
    prog = itdsl.compile_source(text, target="cpu")
    ref = itdsl.compile_source(text, target="reference")["k"]
    op = prog["k"].double()
    ref = ref.double()
    ref.load_state_dict(op.state_dict())
    inputs = random_inputs(load_source(text)["k"])
    tensors = {k: v.requires_grad_(True) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    out, want = op(**inputs), ref(**inputs)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    leaves = list(tensors.values()) + list(op.parameters())
    rleaves = list(tensors.values()) + list(ref.parameters())
    dout = torch.randn(out.shape, dtype=D)
    for a, b in zip(torch.autograd.grad(out, leaves, dout, allow_unused=True),
                    torch.autograd.grad(want, rleaves, dout, allow_unused=True)):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
