"""Fused backward kernels (CPU): the sums of a program over the same two sides, per x and per
y, in one sweep over the pairs (`itdsl.lowering.spec.pair_groups`), equal the reference.

The sizes make every part of the rows sweep several tiles, pad the last one, and leave
columns of the last tile empty, with batch dims (`lowering.spec.row_parts`).
"""

from __future__ import annotations

import pytest
import torch
from util import EXAMPLES

import itdsl
from itdsl.lowering import spec as lspec
from itdsl.lowering.spec import pair_groups, shift_names, spec_of
from itdsl.nn.mix import mix_source

D = torch.float64
GAUSS = (EXAMPLES / "gauss.it").read_text()
MIX = mix_source("mlp", 2, 3, 4, 5)


def _backward_groups(src: str, name: str, target: str):
    plan = itdsl.compile_source(src).plan(name)
    return [spec_of(g, target) for g in pair_groups(plan.backward, shift_names(plan), target)]


def test_sums_per_x_and_per_y_share_one_cpu_kernel():
    (gauss,) = _backward_groups(GAUSS, "gauss_smooth", "cpu")
    assert gauss.fused and {st.side for st in gauss.steps} == {"x", "y0"}
    # the rows are the side with the most channels (db: 16), the columns' sums are few
    assert gauss.row_side == "y0" and [o.kind for o in gauss.outputs].count("col") == 2
    (mix,) = _backward_groups(MIX, "mix", "cpu")
    kinds = [o.kind for o in mix.outputs]
    assert mix.row_side == "x" and "matrix" in kinds and "col" in kinds
    # the summand of dh(x) and dh(y) (one node) is computed once per pair, in a stage
    dh = [st.expr for st in mix.steps if st.name.startswith("dh")]
    assert len(dh) == 2 and dh[0] is dh[1] and dh[0] in mix.staged
    # CUDA keeps one orientation per kernel and a matrix alone
    for spec in _backward_groups(MIX, "mix", "cuda"):
        assert not spec.fused and len({st.side for st in spec.steps}) == 1


def _compare(src, name, inputs, needs=None):
    op = itdsl.compile_source(src, target="cpu", strategy="dense")[name].double()
    ref = itdsl.compile_source(src, target="reference")[name].double()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in op.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.load_state_dict(op.state_dict())
    needs = set(inputs) if needs is None else needs
    results = []
    for mod in (op, ref):
        xs = {k: v.clone().requires_grad_(k in needs) for k, v in inputs.items()}
        out = mod(**xs)
        leaves = [xs[k] for k in sorted(needs)] + list(mod.parameters())
        dout = torch.randn(out.shape, dtype=D, generator=torch.Generator().manual_seed(1))
        results.append([out, *torch.autograd.grad(out, leaves, dout)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(want.detach().abs().max()))
    return op


@pytest.mark.parametrize("n,m,batch", [(150, 77, (2,)), (1, 1, ()), (5, 133, ())])
def test_fused_gauss_equals_reference(n, m, batch):
    g = torch.Generator().manual_seed(0)
    inputs = {"X": torch.rand(*batch, n, 3, generator=g, dtype=D),
              "Y": torch.rand(m, 3, generator=g, dtype=D),
              "b": torch.randn(*batch, m, 16, generator=g, dtype=D)}
    _compare(GAUSS, "gauss_smooth", inputs)


@pytest.mark.parametrize("parts", [1, 3, 16])
def test_fused_mixer_equals_reference_for_any_number_of_parts(parts, monkeypatch):
    monkeypatch.setattr(lspec, "PARTS", parts)
    g = torch.Generator().manual_seed(0)
    n = 70
    inputs = {"P": torch.rand(2, n, 2, generator=g, dtype=D),
              "a": torch.randn(2, n, 3, generator=g, dtype=D),
              "v": torch.randn(2, n, 4, generator=g, dtype=D),
              "w": torch.rand(n, generator=g, dtype=D)}
    _compare(MIX, "mix", inputs)


def test_gradients_asked_for_alone_run_kernels_of_their_steps():
    g = torch.Generator().manual_seed(0)
    inputs = {"X": torch.rand(40, 3, generator=g, dtype=D),
              "Y": torch.rand(30, 3, generator=g, dtype=D),
              "b": torch.randn(30, 16, generator=g, dtype=D)}
    op = _compare(GAUSS, "gauss_smooth", inputs, needs={"b"})
    # the params needed their kernels too; asked for alone, db has a kernel of its own
    op.s.requires_grad_(False)
    out = op(**{k: v.requires_grad_(k == "b") for k, v in inputs.items()})
    out.sum().backward()
    ks = op.opdef("cpu").kernels[D]
    alone = [[[st.name for st in spec.steps] for spec, _ in specs]
             for (phase, _), specs in ks._subsets.items() if phase == "backward"]
    assert [["db_2"]] in alone
