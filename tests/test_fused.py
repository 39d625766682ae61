"""Fused backward kernels (CPU): the sums of a program over the same two sides, per x and per
y, in one sweep over the pairs (`itdsl.lowering.spec.pair_groups`), equal the reference.

The sizes make every part of the rows sweep several tiles, pad the last one, and leave
columns of the last tile empty, with batch dims (`lowering.spec.row_parts`).
"""

from __future__ import annotations

import math

import pytest
import torch
from util import EXAMPLES

import itdsl
from itdsl.lowering import spec as lspec
from itdsl.lowering.spec import pair_groups, shift_names, spec_of
from itdsl.nn.mix import mix_source
from itdsl.settings import small_pairs_set

D = torch.float64
GAUSS = (EXAMPLES / "gauss.it").read_text()
MIX = mix_source("mlp", 2, 3, 4, 5)
ITNET = (EXAMPLES / "itnet_mixer.it").read_text()


def _specs(src: str, name: str, phase: str = "backward", target: str = "cpu"):
    """The pair kernels of one phase of an operator, as `spec_of` lays them out."""
    plan = itdsl.compile_source(src).plan(name)
    prog = plan.forward if phase == "forward" else plan.backward
    return [spec_of(g, target) for g in pair_groups(prog, shift_names(plan), target)]


def _backward_subsets(op) -> list:
    """The step names of each backward kernel schedule a float64 op ran, per set of
    gradients asked for."""
    ks = op.opdef("cpu").kernels[D]
    return [[[st.name for st in spec.steps] for spec, _ in specs]
            for (phase, _), specs in ks._subsets.items() if phase == "backward"]


def test_sums_per_x_and_per_y_share_one_cpu_kernel():
    (gauss,) = _specs(GAUSS, "gauss_smooth")
    assert gauss.fused and {st.side for st in gauss.steps} == {"x", "y0"}
    # the rows are the side with the most channels (db: 16), the columns' sums are few
    assert gauss.row_side == "y0" and [o.kind for o in gauss.outputs].count("col") == 2
    (mix,) = _specs(MIX, "mix")
    kinds = [o.kind for o in mix.outputs]
    assert mix.row_side == "x" and "matrix" in kinds and "col" in kinds
    # the summand of dh(x) and dh(y) (one node) is computed once per pair, in a stage
    dh = [st.expr for st in mix.steps if st.name.startswith("dh")]
    assert len(dh) == 2 and dh[0] is dh[1] and dh[0] in mix.staged
    # CUDA keeps one orientation per kernel and a matrix alone
    for spec in _specs(MIX, "mix", target="cuda"):
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
    assert [["db_2"]] in _backward_subsets(op)



def test_column_leaves_are_laid_out_for_the_stages_that_read_them():
    # the gelu of the first layer (a stage vectorised over its 64 channels) reads the
    # column side's part h1[y] channel after channel: [b, j, w], not [b, w, j]
    (fwd,) = _specs(ITNET, "itnet_mix", "forward")
    cols = [leaf for leaf in fwd.leaves if leaf.role == "col" and leaf.width == 64]
    assert cols and not any(leaf.soa for leaf in cols)
    # a dot product of 8 channels is a scalar stage, vectorised over the columns: [b, w, j]
    src = """operator far {
        domain P = points(1)
        input a : P -> R^8
        input v : P -> R
        output g(x: P) = integral(y: P) exp(-sqnorm(a(x) - a(y))) * v(y)
    }"""
    (spec,) = _specs(src, "far", "forward")
    assert [leaf.soa for leaf in spec.leaves if leaf.role == "col" and leaf.width == 8] == [True]


def test_a_column_read_across_and_along_the_channels_comes_in_both_layouts():
    # the Gaussian's backward (rows: y) reads dout(x) in dot(b(y), dout(x)), a scalar stage
    # vectorised over the columns, and in db(y) = Σ_x k·dout(x), vectorised over its 16
    # channels: one leaf in each layout on the CPU (read the other way, one of the two
    # would gather every channel); a GPU block stages its columns once
    (cpu,) = _specs(GAUSS, "gauss_smooth")
    assert sorted(leaf.soa for leaf in cpu.leaves if leaf.role == "col" and leaf.width == 16
                  and leaf.node.op == "ref") == [False, True]
    for spec in _specs(GAUSS, "gauss_smooth", target="cuda"):
        refs = [leaf for leaf in spec.leaves if leaf.role == "col" and leaf.node.op == "ref"]
        assert len(refs) == len({leaf.node for leaf in refs})


def test_a_matrix_used_as_w_and_as_its_transpose_comes_in_both_layouts():
    # the backward multiplies by the second layer's W (to recompute the kernel) and by W.T
    # (the gradient through it): each product reads the layout it vectorises over
    (bwd,) = _specs(ITNET, "itnet_mix")
    w2 = [leaf.transposed for leaf in bwd.leaves
          if leaf.role == "param" and leaf.node.name == "phi.2.weight"]
    assert sorted(w2) == [False, True]


def test_gelu_and_its_derivative_share_one_erf_per_pair():
    (bwd,) = _specs(ITNET, "itnet_mix")
    erfs = {n for n in lspec.toposort([st.expr for st in bwd.steps]) if n.op == "erf"}
    assert len(erfs) == 1 and erfs <= set(bwd.staged)


def test_a_deeper_gelu_mlp_computes_each_layer_once_per_pair():
    """Two hidden gelu layers: the backward writes out both gelus (each shares its erf with
    its derivative), the outer over the inner as written out, so the sums that read the
    kernel's value and those that read its derivatives meet on one node per layer. Each
    matrix product (W2·g1, W4·g2, W4ᵀ·c, W2ᵀ·e) is computed once per pair: before, the
    outer gelu's formula read the inner gelu whole, and the kernel computed the layers twice
    (an extra product and two extra erfs per pair)."""
    src = """operator mix {
        domain P = points(2)
        input  a : P -> R^8
        input  v : P -> R^32
        input  w : P -> R
        param  phi : mlp(20 -> 32 -> 32 -> 32, act = gelu)
        output g(x: P) = integral(y: P) phi(x, y, a(x), a(y)) * v(y) with weights(w)
    }"""
    (bwd,) = _specs(src, "mix")
    nodes = lspec.toposort([st.expr for st in bwd.steps])
    assert not [n for n in nodes if n.op == "gelu"]
    assert len([n for n in nodes if n.op == "erf"]) == 2
    assert len([n for n in nodes if n.op == "linear"]) == 4


@pytest.mark.parametrize("strategy", ["dense"])
def test_param_gradients_ignore_padded_columns_whose_values_are_infinite(strategy):
    """A weight gradient sums outer products over the columns; the kernels mask the two
    factors at the padded columns (not each product), so that the sum is one multiply-add
    per element. Here every padded column (its coordinate padded with 0) has 1/(x·y) = inf
    (a pair value, computed in the kernel), and the factors there are inf or NaN: the masked
    factors must still give 0·0, and the gradients must equal the reference's, finite, at
    sizes that leave columns of the last tile padded."""
    src = """operator inv {
        domain P = points(1)
        input  v : P -> R^3
        param  phi : mlp(3 -> 8 -> 3, act = gelu)
        output g(x: P) = integral(y: P) phi(x, y, 1 / (x[0] * y[0])) * v(y)
    }"""
    op = itdsl.compile_source(src, target="cpu", strategy=strategy)["inv"].double()
    ref = itdsl.compile_source(src, target="reference")["inv"].double()
    ref.load_state_dict(op.state_dict())
    g = torch.Generator().manual_seed(4)
    for n in (17, 30):
        P = 0.5 + torch.rand(n, 1, generator=g, dtype=D)
        v = torch.randn(n, 3, generator=g, dtype=D)
        with small_pairs_set(0):
            out = op(P=P, v=v)
            got = torch.autograd.grad(out.square().sum(), list(op.parameters()))
        want = ref(P=P, v=v)
        wants = torch.autograd.grad(want.square().sum(), list(ref.parameters()))
        torch.testing.assert_close(out, want)
        for a, b in zip(got, wants, strict=True):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_sums_ignore_padded_points_whose_kernel_values_are_infinite(dtype):
    """A sum of K(x, y)·b(y) is accumulated by one multiply-add per channel: b is 0 at the
    padded points (the runtime pads with zeros) and only the scalar K is masked, once per
    pair. Here K = 1/(x·y) is inf at every padded row and column (coordinates padded with
    0), and b there is 0: unmasked, inf·0 would make every sum NaN. The output and the
    gradients of b, X and Y (sums per row and per column) must equal the reference's,
    finite, at sizes that leave rows and columns of the last tiles padded; and an inf in
    c(x) (a row's factor, not 0 at the padded columns) must give what torch gives (inf in
    the output: b > 0), not the NaN of inf·0 at a padded column."""
    src = """operator inv {
        domain X = points(1)
        domain Y = points(1)
        input  b : Y -> R^5
        input  c : X -> R^5
        output g(x: X) = integral(y: Y) (1 / (x[0] * y[0])) * b(y) * c(x)
    }"""
    op = itdsl.compile_source(src, target="cpu", strategy="dense")["inv"].to(dtype)
    ref = itdsl.compile_source(src, target="reference")["inv"].double()
    g = torch.Generator().manual_seed(6)
    for n, m in ((17, 30), (5, 130), (70, 3)):
        ins = {"X": 0.5 + torch.rand(n, 1, generator=g, dtype=D),
               "Y": 0.5 + torch.rand(m, 1, generator=g, dtype=D),
               "b": 0.1 + torch.rand(m, 5, generator=g, dtype=D),
               "c": torch.randn(n, 5, generator=g, dtype=D)}
        ins["c"][n // 2, 1] = math.inf
        dout = torch.randn(n, 5, generator=g, dtype=D)
        results = []
        for mod, dt in ((op, dtype), (ref, D)):
            xs = {k: v.to(dt).requires_grad_(True) for k, v in ins.items()}
            with small_pairs_set(0):
                out = mod(**xs)
                grads = torch.autograd.grad(out, list(xs.values()), dout.to(dt))
            results.append([out, *grads])
        assert results[1][0][n // 2, 1] == math.inf
        for got, want in zip(*results):
            assert (torch.isfinite(got) == torch.isfinite(want)).all()
            tol = 1e-12 if dtype == D else 2e-5
            want = want.detach()
            scale = float(want[torch.isfinite(want)].abs().max()) if torch.isfinite(want).any() else 1.0
            torch.testing.assert_close(got.detach().double(), want, rtol=tol, atol=tol * scale,
                                       equal_nan=True)


def test_itnet_mixer_float32_kernels_against_float64_materialised_torch():
    """The float32 kernels (fast erf and exp, blocked matrix products, padded tiles: 2 x 64 + 1
    columns forward, 8 x 16 + 1 backward) against the pair tensor materialised in float64
    torch: the output and every gradient."""
    n = 129
    op = itdsl.compile_source(ITNET, target="cpu", strategy="dense")["itnet_mix"]
    g = torch.Generator().manual_seed(5)
    P, f0 = torch.rand(2, n, 2, generator=g), torch.randn(2, n, 32, generator=g)
    with small_pairs_set(0):  # (the kernels, however few the pairs)
        f = f0.clone().requires_grad_(True)
        out = op(P=P, f=f)
        out.square().mean().backward()
    W0, b0 = op.phi[0].weight.double(), op.phi[0].bias.double()
    W2, b2 = op.phi[2].weight.double(), op.phi[2].bias.double()
    ps = [t.detach().requires_grad_(True) for t in (W0, b0, W2, b2)]
    f64 = f0.double().requires_grad_(True)
    P64 = P.double()
    pairs = torch.cat([P64[:, :, None].expand(-1, n, n, 2), P64[:, None].expand(-1, n, n, 2),
                       f64[:, :, None].expand(-1, n, n, 32),
                       f64[:, None].expand(-1, n, n, 32)], -1)
    K = torch.nn.functional.gelu(pairs @ ps[0].T + ps[1]) @ ps[2].T + ps[3]
    ref = f64 + (K * f64[:, None]).mean(2)
    ref.square().mean().backward()
    got = [out, f.grad] + [p.grad for p in op.phi.parameters()]
    want = [ref, f64.grad] + [p.grad for p in ps]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.detach(), rtol=0,
                                   atol=2e-6 * float(b.detach().abs().max()))


def test_gelu_is_written_out_only_where_it_shares_and_its_argument_is_flat():
    """gelu becomes its formula only where its erf is shared (a derivative reads it) and its
    argument is a load or one operation on loads; the values written out are stages. A gelu
    of a gelu, expanded, nested copies of the inner formula in the outer one and its
    derivative: the float32 backward of this program took 200 s to compile (15 s before)."""
    src = """operator g2 {
        domain P = points(1)
        input a : P -> R^4
        input v : P -> R
        output o(x: P) = integral(y: P) gelu(gelu(dot(a(x), a(y)))) * v(y)
    }"""
    (fwd,) = _specs(src, "g2", "forward")  # no derivative in the forward: gelu stays whole
    fwd_ops = {n.op for n in lspec.toposort([st.expr for st in fwd.steps])}
    assert "gelu" in fwd_ops and "erf" not in fwd_ops
    for bwd in _specs(src, "g2"):
        nodes = lspec.toposort([st.expr for st in bwd.steps])
        gelus = [n for n in nodes if n.op == "gelu"]
        assert gelus and all(g.args[0].op != "dot" for g in gelus)  # the outer one, whole
        # the inner gelu, written out: one erf(√2·d/2), in the stage that computes d/2·(1 + erf)
        inner = {n for n in nodes if n.op == "erf"
                 and not any(m.op in ("erf", "gelu") for m in lspec.toposort(list(n.args)))}
        assert len(inner) == 1
        assert any(s.op == "*" and inner <= set(lspec.toposort([s])) for s in bwd.staged)


def test_a_param_gradient_asked_for_alone_runs_its_matrix_kernel():
    """Only one weight needs a gradient: its per-row matrix sums run in a kernel of their own
    (not fused), blocked in registers as the fused one is, and equal the reference's."""
    op = itdsl.compile_source(ITNET, target="cpu", strategy="dense")["itnet_mix"].double()
    ref = itdsl.compile_source(ITNET, target="reference")["itnet_mix"].double()
    ref.load_state_dict(op.state_dict())
    g = torch.Generator().manual_seed(0)
    P, f = torch.rand(2, 70, 2, generator=g, dtype=D), torch.randn(2, 70, 32, generator=g, dtype=D)
    got = []
    for m in (op, ref):
        for name, p in m.named_parameters():
            p.requires_grad_(name == "phi.2.weight")
        with small_pairs_set(0):
            got.append(torch.autograd.grad(m(P=P, f=f).square().sum(), [m.phi[2].weight])[0])
    torch.testing.assert_close(got[0], got[1], rtol=1e-12, atol=1e-12 * float(got[1].abs().max()))
    assert _backward_subsets(op) == [[["dphi.2.weight_5"]]]
