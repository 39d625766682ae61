"""Compiled operators (TVM, CPU) equal the reference semantics, forward and gradients.

Every example operator is compiled with strategy="dense" and compared with the
reference (N x M pair tensors, torch.autograd): float64 gradcheck on small sizes,
float32 tolerance tests on larger ones with batch dims, non-contiguous inputs.
"""

from __future__ import annotations

import pytest
import torch
from test_plan import EXAMPLE_CASES
from util import EXAMPLES, gradcheck_op

import itdsl

D = torch.float64


def compiled_and_reference(name: str):
    file, make = EXAMPLE_CASES[name]
    prog = itdsl.compile_file(EXAMPLES / file, target="cpu", strategy="dense")
    ref = itdsl.compile_file(EXAMPLES / file, target="reference")
    op, rop = prog[name], ref[name]
    rop.load_state_dict(op.state_dict())
    return op, rop, make


def call(op, inputs, seed=5):
    return op(**inputs, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(EXAMPLE_CASES))
def test_compiled_equals_reference_float64(name):
    op, rop, make = compiled_and_reference(name)
    op, rop = op.double(), rop.double()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in op.parameters():
            p.add_(0.1 * torch.randn_like(p))
    rop.load_state_dict(op.state_dict())
    inputs = make()
    tensors = {k: v.clone().requires_grad_(True) for k, v in inputs.items()
               if isinstance(v, torch.Tensor)}
    out = call(op, {**inputs, **tensors})
    rtensors = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
    rout = call(rop, {**inputs, **rtensors})
    torch.testing.assert_close(out, rout, rtol=1e-10, atol=1e-12)
    dout = torch.randn(out.shape, dtype=D)
    leaves = list(tensors.values()) + list(op.parameters())
    rleaves = list(rtensors.values()) + list(rop.parameters())
    got = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    want = torch.autograd.grad(rout, rleaves, dout, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            continue
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


SMALL = {
    "gauss_smooth": lambda: dict(X=torch.randn(4, 3, dtype=D) * 0.5,
                                 Y=torch.randn(3, 3, dtype=D) * 0.5, b=torch.randn(3, 16, dtype=D)),
    "causal_attention": lambda: dict(q=torch.randn(4, 64, dtype=D), k=torch.randn(4, 64, dtype=D),
                                     v=torch.randn(4, 64, dtype=D)),
    "bump_conv": lambda: dict(f=torch.randn(7, 8, dtype=D)),
    "integral_linear": lambda: dict(f=torch.randn(5, dtype=D), U=4),
    "itnet_mix_sampled": lambda: dict(P=torch.rand(4, 2, dtype=D), f=torch.randn(4, 32, dtype=D)),
    "causal_linear_attention": lambda: dict(q=torch.randn(4, 32, dtype=D),
                                            k=torch.randn(4, 32, dtype=D),
                                            v=torch.randn(4, 32, dtype=D)),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_compiled_gradcheck_float64(name):
    op, _, _ = compiled_and_reference(name)
    op = op.double()

    class Seeded(torch.nn.Module):  # a fresh generator per call: a deterministic function
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            return call(self.inner, kw)

    # with thousands of MLP weights, finite differences over every param take minutes: those
    # gradients are compared with the reference's in test_compiled_equals_reference_float64
    few = sum(p.numel() for p in op.parameters()) <= 256
    assert gradcheck_op(Seeded(op), SMALL[name](), params=few)


@pytest.mark.parametrize("name", ["gauss_smooth", "attention", "itnet_mix", "ema"])
def test_compiled_float32_larger_with_batch_dims(name):
    op, rop, _ = compiled_and_reference(name)
    torch.manual_seed(1)
    sizes = {
        "gauss_smooth": lambda: dict(X=torch.rand(2, 150, 3), Y=torch.rand(130, 3),
                                     b=torch.randn(2, 130, 16)),
        "attention": lambda: dict(q=torch.randn(2, 3, 70, 64), k=torch.randn(2, 3, 90, 64),
                                  v=torch.randn(2, 3, 90, 64)),
        "itnet_mix": lambda: dict(P=torch.rand(67, 2), f=torch.randn(3, 67, 32)),
        "ema": lambda: dict(f=torch.randn(2, 100, 16)),
    }[name]()
    out = op(**sizes)
    ref = rop.double()(**{k: (v.double() if isinstance(v, torch.Tensor) else v)
                          for k, v in sizes.items()})
    assert out.dtype == torch.float32
    scale = ref.abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 1e-4 * max(scale, 1.0)


def test_noncontiguous_inputs():
    op, rop, _ = compiled_and_reference("gauss_smooth")
    x = torch.rand(3, 40).T  # transposed
    y = torch.rand(30, 6)[:, ::2]  # every second column
    b = torch.randn(16, 30).T
    torch.testing.assert_close(op(X=x, Y=y, b=b), rop(X=x, Y=y, b=b), rtol=1e-4, atol=1e-4)


def test_wrong_dtype_of_params_is_a_clear_error():
    op, _, _ = compiled_and_reference("gauss_smooth")
    with pytest.raises(itdsl.InputError, match="param `s` is torch.float32 but the inputs are "
                                               "torch.float64"):
        op(X=torch.rand(4, 3, dtype=D), Y=torch.rand(3, 3, dtype=D), b=torch.rand(3, 16, dtype=D))


def test_torch_compile_fullgraph_with_two_itdsl_ops():
    gauss = itdsl.compile_file(EXAMPLES / "gauss.it", target="cpu")["gauss_smooth"]
    ema = itdsl.compile_file(EXAMPLES / "ema.it", target="cpu")["ema"]

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gauss, self.ema = gauss, ema
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, x, y, b):
            u = self.gauss(X=x, Y=y, b=b)  # [n, 16]
            return self.ema(f=self.lin(u)).sum(-1)

    model = Model()
    x, y, b = torch.rand(20, 3), torch.rand(15, 3), torch.randn(15, 16)
    eager = model(x, y, b)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, y, b)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert model.gauss.s.grad is not None and model.ema.a.grad is not None
    assert model.lin.weight.grad is not None


def test_state_dict_round_trips_and_params_are_named():
    op = itdsl.compile_file(EXAMPLES / "itnet_mixer.it", target="cpu")["itnet_mix"]
    assert isinstance(op.phi, torch.nn.Sequential)
    op2 = itdsl.compile_file(EXAMPLES / "itnet_mixer.it", target="cpu")["itnet_mix"]
    op2.load_state_dict(op.state_dict())
    x, f = torch.rand(9, 2), torch.randn(9, 32)
    torch.testing.assert_close(op(P=x, f=f), op2(P=x, f=f))
    assert op.strategy == "dense"


def test_masked_causal_terms_do_not_overflow():
    """exp(-a (t - s)) * [s <= t]: for s > t the exponential overflows; the bracket masks
    it (it does not multiply inf by 0), in the reference, the Plan and the kernels."""
    prog_c = itdsl.compile_file(EXAMPLES / "ema.it", target="cpu")
    prog_r = itdsl.compile_file(EXAMPLES / "ema.it", target="reference")
    T = 1500  # softplus(0.5) * 1500 ~ 1450: exp overflows float32 and float64 alike
    f = torch.randn(T, 16)
    for dtype in (torch.float32, torch.float64):
        op_c, op_r = prog_c["ema"].to(dtype), prog_r["ema"].to(dtype)
        x = f.to(dtype).detach().clone().requires_grad_(True)
        out = op_c(f=x)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
        assert torch.isfinite(op_c.a.grad).all()
        ref = op_r(f=f.to(dtype).detach())
        assert torch.isfinite(ref).all()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
