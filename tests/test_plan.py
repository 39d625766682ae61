"""Plans equal the reference semantics, forward and every gradient, in float64.

The Plan evaluator (itdsl/runtime/plan_eval.py) runs the forward and backward
programs the symbolic layer derived (pair reductions in chunks of x, no N x M
tensor); the reference (itdsl/runtime/reference.py) computes the definition with
N x M pair tensors, and torch.autograd differentiates it. They share no code
beyond the call binding, the spline interpolation, the elementwise functions' torch
forms and the quadrature points, weights and draws (runtime/sampling.py).
"""

from __future__ import annotations

import time

import pytest
import torch
from util import EXAMPLES

from itdsl.frontend import load_file, load_source
from itdsl.runtime.binding import bind
from itdsl.runtime.plan_eval import evaluate_backward, evaluate_plan
from itdsl.runtime.reference import ReferenceOperator
from itdsl.symbolic import analyse
from itdsl.symbolic.build import build_plan

D = torch.float64
REL = 1e-9


def r(*shape):
    return torch.randn(*shape, dtype=D)


EXAMPLE_CASES = {
    "gauss_smooth": ("gauss.it", lambda: dict(X=r(2, 7, 3) * 0.5, Y=r(5, 3) * 0.5, b=r(5, 16))),
    "attention": ("attention.it", lambda: dict(q=r(2, 6, 64), k=r(2, 5, 64), v=r(2, 5, 64))),
    "causal_attention": ("attention.it", lambda: dict(q=r(2, 6, 64), k=r(1, 6, 64),
                                                      v=r(2, 6, 64))),
    "bump_conv": ("bump_conv.it", lambda: dict(f=r(2, 9, 8))),
    "ema": ("ema.it", lambda: dict(f=r(2, 9, 16))),
    "integral_linear": ("inn_linear.it", lambda: dict(f=r(2, 9), U=7)),
    "itnet_mix": ("itnet_mixer.it", lambda: dict(P=torch.rand(6, 2, dtype=D), f=r(2, 6, 32))),
    "itnet_mix_sampled": ("itnet_mixer.it", lambda: dict(P=torch.rand(6, 2, dtype=D),
                                                         f=r(2, 6, 32))),
    "linear_attention": ("linear_attention.it", lambda: dict(q=r(2, 6, 32), k=r(2, 5, 32),
                                                             v=r(2, 5, 32))),
    "causal_linear_attention": ("linear_attention.it", lambda: dict(q=r(6, 32), k=r(6, 32),
                                                                    v=r(6, 32))),
}


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = max(b.abs().max().item(), 1e-300)
    err = (a - b).abs().max().item() / scale
    assert err <= REL, f"{what}: relative error {err:.2e}"


def check_plan_against_reference(op, inputs: dict, chunk: int = 4, seed: int = 3):
    """Forward and every gradient of the Plan equal the reference and its autograd."""
    torch.manual_seed(0)
    module = ReferenceOperator(op).double()
    with torch.no_grad():  # params away from their (often special) initial values
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tensors = {k: v.clone().requires_grad_(True) for k, v in inputs.items()
               if isinstance(v, torch.Tensor)}
    call = {**inputs, **tensors}
    ref = module(**call, generator=torch.Generator().manual_seed(seed))
    plan = build_plan(op)
    out, ev = evaluate_plan(plan, module, bind(op, call, D), torch.Generator().manual_seed(seed),
                            chunk=chunk)
    close(out, ref, "forward")
    dout = torch.randn(ref.shape, dtype=D, generator=torch.Generator().manual_seed(1))
    params = dict(module.named_parameters())
    leaves = list(tensors.values()) + list(params.values())
    expected = torch.autograd.grad(ref, leaves, dout, allow_unused=True)
    got = evaluate_backward(plan, ev, dout)
    domains = {d.name for d in op.domains}
    keys = [("coords:" if k in domains else "input:") + k for k in tensors] + \
           [f"param:{k}" for k in params]
    checked = 0
    for key, g in zip(keys, expected):
        mine = got.get(key)
        if g is None or g.abs().max() == 0:
            assert mine is None or mine.abs().max() == 0, f"{key}: expected no gradient"
            continue
        assert mine is not None, f"{key}: the Plan has no gradient"
        assert mine.shape == g.shape, f"{key}: shape {mine.shape} != {g.shape}"
        close(mine, g, key)
        checked += 1
    return checked


@pytest.mark.parametrize("name", sorted(EXAMPLE_CASES))
def test_example_plan_equals_reference(name):
    file, make = EXAMPLE_CASES[name]
    op = load_file(EXAMPLES / file)[name]
    torch.manual_seed(0)
    assert check_plan_against_reference(op, make()) >= 1


@pytest.mark.parametrize("name", ["gauss_smooth", "itnet_mix", "causal_attention"])
def test_plan_chunking_does_not_matter(name):
    file, make = EXAMPLE_CASES[name]
    op = load_file(EXAMPLES / file)[name]
    for chunk in (1, 3, 1000):
        torch.manual_seed(0)
        check_plan_against_reference(op, make(), chunk=chunk)


EXTRA = {
    # quadratures, weights, gauss nodes, an importance-sampled ratio, coordinates of grids
    "weights": ("""operator w {
        domain X = points(2)
        domain Y = points(2)
        input  c : Y -> R
        input  b : Y -> R^3
        param  s : R^3 = 0.7
        output g(x: X) = integral(y: Y) exp(-s * sqnorm(x - y)) * b(y) with weights(c)
    }""", lambda: dict(X=r(4, 2), Y=r(5, 2), c=r(5), b=r(5, 3))),
    "simpson_grid": ("""operator s {
        domain T = grid(-1, 2)
        domain U = grid(0, 1)
        input  f : T -> R^2
        param  a : R = 1.5
        output g(u: U) = u * integral(t: T) sin(a * t * u) * f(t) with simpson
    }""", lambda: dict(f=r(8, 2), U=5)),
    "gauss_nodes": ("""operator q {
        domain I = index
        domain T = grid(0, 2)
        input  f : I -> R
        param  a : R = 0.3
        output g(i: I) = f(i) * integral(t: T) exp(-a * (t - f(i))^2) with gauss(6)
    }""", lambda: dict(f=r(2, 4))),
    "importance": ("""operator m {
        domain I = index
        input  v : I -> R^3
        input  s : I -> R
        output g(i: I) = integral(j: I) exp(s(j) * s(i)) * v(j) with montecarlo(64, importance = exp(s(j)))
                       / integral(j: I) exp(s(j) * s(i)) with montecarlo(64, importance = exp(s(j)))
    }""", lambda: dict(v=r(2, 7, 3), s=r(2, 7))),
    "mlp_scalar_out": ("""operator n {
        domain X = points(1)
        input  f : X -> R
        param  phi : mlp(3 -> 8 -> 1, act = tanh)
        output g(x: X) = integral(y: X) phi(x - y, f(x), f(y)) * f(y) with mean
    }""", lambda: dict(X=r(5, 1), f=r(5))),
    "components_minmax": ("""operator c {
        domain X = points(3)
        domain Y = points(3)
        input  b : Y -> R^2
        param  p : R^2 = 0.5
        output g(x: X) = integral(y: Y) max(x[0] - y[1], 0.1 * x[2]) * min(p, b(y)) * sigmoid(norm(x - y)) * b(y)
    }""", lambda: dict(X=r(4, 3), Y=r(6, 3), b=r(6, 2))),
    "softplus_relu_pow": ("""operator p {
        domain I = index
        domain J = index
        input  q : I -> R^4
        input  k : J -> R^4
        param  e : R = 1.5
        output g(i: I) = integral(j: J) softplus(dot(q(i), k(j)))^2 * relu(sum(k(j))) * abs(q(i)[1])^e
    }""", lambda: dict(q=r(5, 4), k=r(6, 4))),
    "silu_and_spline": ("""operator z {
        domain U = grid(0, 1)
        domain V = grid(0, 1)
        input  f : V -> R^2
        param  W : spline(5, 6)
        param  c : spline(4)
        param  phi : mlp(2 -> 3 -> 2, act = silu)
        output g(u: U) = c(u) * phi(u, c(u)) + integral(v: V) W(u, v) * W(v, u) * f(v) with riemann
    }""", lambda: dict(f=r(9, 2), U=6)),
}


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_more_constructs_plan_equals_reference(name):
    src, make = EXTRA[name]
    op = load_source(src).operators[0]
    torch.manual_seed(0)
    assert check_plan_against_reference(op, make()) >= 1


def test_hoisting_lowers_the_pair_work_and_counts_are_reported():
    plan = analyse(load_file(EXAMPLES / "itnet_mixer.it")["itnet_mix"])
    # the MLP's first layer over (x, y, f(x), f(y)) splits into a part per x and a part per y
    texts = [h.text for h in plan.hoisted]
    assert any("phi.0.weight[:, 0:2]·x" in t and "f(x)" in t for t in texts)
    assert any("phi.0.weight[:, 2:4]·y" in t for t in texts)
    assert plan.pair_ops_after["I0"] < plan.pair_ops_before["I0"] / 2
    gauss = analyse(load_file(EXAMPLES / "gauss.it")["gauss_smooth"])
    assert any(h.side == "const" for h in gauss.hoisted)  # 2 s^2 once per call


def test_no_pair_step_outputs_a_pair_tensor():
    """Every step's result lives on one side (or per call): nothing is N x M."""
    for file in EXAMPLES.glob("*.it"):
        for op in load_file(file).operators:
            plan = build_plan(op)
            for st in plan.forward.steps + plan.backward.steps:
                assert st.side in (None, "x") or st.side.startswith("y"), st
                # a scatter reduces over pairs too: into the field's points, not a pair tensor
                assert len(st.expr.deps) <= 1 or st.kind in ("sum", "max", "scatter"), \
                    (op.name, st.name)


def test_analysing_each_example_takes_under_two_seconds():
    for file in sorted(EXAMPLES.glob("*.it")):
        for op in load_file(file).operators:
            t0 = time.perf_counter()
            analyse(op)
            assert time.perf_counter() - t0 < 2.0, op.name


def _table():
    from test_recognize import CASES, _op
    return [(c[0], _op(c[1])) for c in CASES]


@pytest.mark.parametrize("name,op", _table(), ids=[c[0] for c in _table()])
def test_table_kernels_plan_equals_reference(name, op):
    """Every kernel of the recogniser table: the Plan's forward and gradients are exact."""
    from util import random_inputs
    inputs = random_inputs(op)
    for k, v in inputs.items():  # weights of a weights() rule: positive, like a quadrature
        if isinstance(v, torch.Tensor) and k in ("w", "c") and v.dim() == 1:
            inputs[k] = v.abs()
    check_plan_against_reference(op, inputs)
