"""Quadrature rules (itdsl/domains) on every path: the midpoint rule against independent
numpy computations (reference, Plan evaluator, target="cpu"), forward and gradients; and
the Monte Carlo draws, which the reference and the Plan evaluator take from one function
(runtime/sampling.py) and so must agree on exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_plan import check_plan_against_reference
from test_regressions import _PADDED_ATTENTION

import itdsl
from itdsl.domains import KINDS, RULES, rules_on
from itdsl.frontend import ir, load_source, parse
from itdsl.frontend.ast import DomainKind
from itdsl.frontend.printer import format_ir_operator, print_program
from itdsl.runtime import sampling
from itdsl.runtime.binding import bind
from itdsl.runtime.plan_eval import evaluate_plan
from itdsl.runtime.reference import ReferenceOperator
from itdsl.runtime.sampling import side_points
from itdsl.symbolic.build import build_plan

D = torch.float64

MIDPOINT = """operator m {
    domain X = points(1)
    domain T = grid(-1, 2)
    input  f : X -> R^2
    param  a : R = 0.7
    output g(x: X) = f(x) * integral(t: T) sin(pi * t) * exp(-a * (t - x[0])^2) with midpoint(7)
}"""


def midpoint_numpy(x: np.ndarray, f: np.ndarray, a: float, n: int = 7,
                   lo: float = -1.0, hi: float = 2.0) -> np.ndarray:
    """MIDPOINT's output, computed here: cell centres of [lo, hi], weight (hi − lo)/n."""
    h = (hi - lo) / n
    c = lo + (np.arange(n) + 0.5) * h
    integral = (h * np.sin(np.pi * c) * np.exp(-a * (c[None, :] - x[:, :1]) ** 2)).sum(-1)
    return f * integral[:, None]


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(X=torch.rand(5, 1, dtype=D, generator=g) * 3 - 1,
                f=torch.randn(5, 2, dtype=D, generator=g))


# ---- the entry ---------------------------------------------------------------------------------


def test_midpoint_nodes_and_weights_are_the_cell_centres():
    d = ir.Domain(name="T", kind=DomainKind.GRID, lo=-1.0, hi=2.0)
    for n in (1, 2, 7, 1024):
        nodes, w = RULES["midpoint"].nodes(d, n)
        h = 3.0 / n
        np.testing.assert_allclose(nodes, [-1.0 + (i + 0.5) * h for i in range(n)],
                                   rtol=0, atol=1e-15)
        np.testing.assert_allclose(w, np.full(n, h), rtol=0, atol=0)
    assert RULES["midpoint"].own_nodes and not RULES["midpoint"].on_domain_points
    assert [r.name for r in rules_on("points")] == ["sum", "mean", "weights", "montecarlo"]
    assert "midpoint" in [r.name for r in rules_on("grid")]
    assert RULES["midpoint"].usage == "`midpoint(n)`"


def test_every_kind_defaults_to_a_rule_that_applies_to_it():
    for k in KINDS.values():
        assert RULES[k.default].applies_to(k.name)
    assert [r.value for r in ir.QuadRule] == list(RULES)
    assert [k.value for k in DomainKind] == list(KINDS)


def test_a_midpoint_side_has_its_nodes_whatever_the_call_size():
    op = load_source(MIDPOINT).operators[0]
    for size in ({}, {"T": 3}, {"T": 50}):
        bound = bind(op, {**inputs(), **size})
        pts = side_points(op.domain("T"), op.output.body.args[1].quad, bound)
        assert pts.n == 7
        torch.testing.assert_close(pts.coords[:, 0], torch.tensor(
            [-1 + (i + 0.5) * 3 / 7 for i in range(7)], dtype=D), rtol=0, atol=1e-15)
        torch.testing.assert_close(pts.weights, torch.full((7,), 3 / 7, dtype=D))


def test_midpoint_prints_and_round_trips():
    prog = parse(MIDPOINT)
    assert parse(print_program(prog)) == prog
    assert "with midpoint(7))" in format_ir_operator(load_source(MIDPOINT).operators[0])


# ---- forward: a known integral, and the numpy sum ------------------------------------------


@pytest.mark.parametrize("n", [1, 4, 16, 64])
def test_midpoint_integrates_sin_to_second_order(n):
    """∫₀¹ sin(πt) dt = 2/π; the midpoint sum exceeds the integral by −(b − a)h²/24 · f''(ξ),
    here between 0 and π²/(24 n²)."""
    src = f"""operator q {{
        domain I = index
        domain T = grid(0, 1)
        input  c : I -> R
        output g(i: I) = c(i) * integral(t: T) sin(pi * t) with midpoint({n})
    }}"""
    got = itdsl.compile_source(src)["q"](c=torch.ones(1, dtype=D))[0].item()
    h = 1 / n
    assert got == pytest.approx(sum(h * math.sin(math.pi * (i + 0.5) * h) for i in range(n)),
                                rel=1e-14)
    assert 0 <= got - 2 / math.pi <= math.pi ** 2 / (24 * n * n)


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_midpoint_forward_equals_numpy(target):
    op = itdsl.compile_source(MIDPOINT, target=target)["m"].double()
    kw = inputs()
    want = midpoint_numpy(kw["X"].numpy(), kw["f"].numpy(), op.a.item())
    got = op(**kw, T=4)  # the size of T is not used: the nodes are the rule's
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-12, atol=1e-14)


def test_midpoint_reference_needs_no_size_of_its_domain():
    op = itdsl.compile_source(MIDPOINT, target="reference")["m"].double()
    kw = inputs()
    torch.testing.assert_close(op(**kw), op(**kw, T=2), rtol=0, atol=0)


def test_midpoint_compiled_needs_no_size_of_its_domain():
    op = itdsl.compile_source(MIDPOINT, target="cpu")["m"].double()
    kw = inputs()
    want = midpoint_numpy(kw["X"].numpy(), kw["f"].numpy(), op.a.item())
    np.testing.assert_allclose(op(**kw).detach().numpy(), want, rtol=1e-12)


# ---- gradients --------------------------------------------------------------------------------


def test_midpoint_plan_equals_reference_forward_and_gradients():
    op = load_source(MIDPOINT).operators[0]
    assert check_plan_against_reference(op, inputs()) == 3  # X, f and a


def test_midpoint_plan_evaluator_equals_numpy():
    op = load_source(MIDPOINT).operators[0]
    module = ReferenceOperator(op).double()
    kw = inputs()
    out, _ = evaluate_plan(build_plan(op), module, bind(op, kw, D), chunk=2)
    want = midpoint_numpy(kw["X"].numpy(), kw["f"].numpy(), module.a.item())
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_midpoint_gradcheck(target):
    module = itdsl.compile_source(MIDPOINT, target=target)["m"].double()
    kw = inputs(1)

    def call(X, f, a):
        return torch.func.functional_call(module, {"a": a}, (), {"X": X, "f": f, "T": 3})

    args = (kw["X"].requires_grad_(), kw["f"].requires_grad_(),
            torch.tensor([0.9], dtype=D, requires_grad=True))
    assert torch.autograd.gradcheck(call, args, eps=1e-6, atol=1e-8)


def test_midpoint_compiled_gradients_equal_the_reference():
    ref = itdsl.compile_source(MIDPOINT, target="reference")["m"].double()
    cpu = itdsl.compile_source(MIDPOINT, target="cpu")["m"].double()
    grads = []
    for op in (ref, cpu):
        kw = {k: v.clone().requires_grad_() for k, v in inputs(2).items()}
        out = op(**kw, T=5)
        leaves = [kw["X"], kw["f"], op.a]
        grads.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    for g, want in zip(*reversed(grads)):
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)


def test_midpoint_on_the_output_grid_samples_the_kernel_at_its_nodes():
    """x on the grid T, y on midpoint nodes of T: no convolution (the nodes are not T's
    points), the matmul strategy samples K between x's points and the nodes."""
    src = """operator k {
        domain T = grid(0, 1)
        input  v : T -> R
        output o(t: T) = v(t) * integral(s: T) exp(-(t - s)^2) * sin(3 * s) with midpoint(5)
    }"""
    v = torch.randn(9, dtype=D, generator=torch.Generator().manual_seed(3))
    t, c = np.linspace(0, 1, 9), (np.arange(5) + 0.5) / 5
    want = v.numpy() * (0.2 * np.exp(-(t[:, None] - c) ** 2) * np.sin(3 * c)).sum(-1)
    for target in ("reference", "cpu"):
        op = itdsl.compile_source(src, target=target)["k"].double()
        assert op.strategy != "convolution"
        np.testing.assert_allclose(op(v=v).detach().numpy(), want, rtol=1e-12)


def test_causal_bracket_over_midpoint_nodes_is_not_a_position_mask():
    text = """operator k {
        domain T = grid(0, 1)
        input q : T -> R
        kernel a(t: T, s: T) = exp(q(t) * s) * [s <= t]
        output o(t: T) = integral(s: T) a(t, s) * cos(3 * s) with midpoint(5) / integral(s: T) a(t, s) with midpoint(5)
    }"""
    lib = itdsl.compile_source(text, target="cpu")["k"].double()
    ref = itdsl.compile_source(text, target="reference")["k"].double()
    q = torch.randn(9, dtype=D, generator=torch.Generator().manual_seed(14))
    out, want = lib(q=q), ref(q=q)
    assert torch.isnan(want[0]) and torch.isnan(out[0])  # no node below t = 0
    torch.testing.assert_close(out[1:], want[1:], rtol=1e-9, atol=1e-10)


# ---- Monte Carlo: one draw for every path ------------------------------------------------------

DRAWS = {
    # g(i) = Σ_j w_j [j == i] = w_i: the output is the weights drawn
    "index-uniform": ("""operator w {
        domain I = index
        input  c : I -> R
        output g(i: I) = c(i) * integral(j: I) [j == i] with montecarlo(40)
    }""", lambda g: dict(c=torch.ones(11, dtype=D))),
    "points-uniform": ("""operator w {
        domain X = points(1)
        output g(x: X) = integral(y: X) [y[0] == x[0]] with montecarlo(40)
    }""", lambda g: dict(X=torch.randn(11, 1, dtype=D, generator=g))),
    "index-importance": ("""operator w {
        domain I = index
        input  s : I -> R
        output g(i: I) = integral(j: I) [j == i] with montecarlo(40, importance = exp(s(j)))
    }""", lambda g: dict(s=torch.randn(3, 11, dtype=D, generator=g))),
    "points-importance": ("""operator w {
        domain X = points(1)
        output g(x: X) = integral(y: X) [y[0] == x[0]] with montecarlo(40, importance = y[0]^2 + 0.1)
    }""", lambda g: dict(X=torch.randn(11, 1, dtype=D, generator=g))),
}


@pytest.mark.parametrize("name", sorted(DRAWS))
def test_reference_and_plan_evaluator_draw_the_same_weights(name):
    src, make = DRAWS[name]
    op = load_source(src).operators[0]
    kw = make(torch.Generator().manual_seed(5))
    module = ReferenceOperator(op).double()
    g_ref, g_plan = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ref = module(**kw, generator=g_ref)
    plan, _ = evaluate_plan(build_plan(op), module, bind(op, kw, D), g_plan)
    assert torch.equal(ref, plan)
    assert torch.equal(g_ref.get_state(), g_plan.get_state())  # consumed alike
    cpu = itdsl.compile_source(src, target="cpu")["w"].double()
    assert torch.equal(cpu(**kw, generator=torch.Generator().manual_seed(7)), ref)
    m = 11
    if name.startswith("index-uniform"):
        idx = torch.randint(m, (40,), generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(ref, torch.bincount(idx, minlength=m).to(D) * m / 40,
                                   rtol=1e-15, atol=0)
    if name.startswith("points-uniform"):
        idx = torch.randint(m, (40,), generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(ref, torch.bincount(idx, minlength=m).to(D) / 40,
                                   rtol=1e-15, atol=0)


# ---- Monte Carlo: a point not drawn is not in the sum ---------------------------------------

UNDRAWN = {
    # the kernels run on the points drawn (runtime/sampling.py: compact)
    "own-domain": """operator mc {
        domain X = points(3)
        domain Y = points(3)
        input  b : Y -> R
        output o(x: X) = integral(y: Y) dot(x, y) * b(y) with montecarlo(4)
    }""",
    # x ranges over the sampled domain too: the kernels run on every point, weight 0 where
    # not drawn, and mask those pairs
    "same-domain": """operator mc {
        domain Y = points(3)
        input  b : Y -> R
        output o(x: Y) = integral(y: Y) dot(x, y) * b(y) with montecarlo(4)
    }""",
}


@pytest.mark.parametrize("target", ["reference", "plan", "cpu", "dense"])
@pytest.mark.parametrize("name", sorted(UNDRAWN))
def test_a_point_not_drawn_reaches_neither_the_output_nor_the_gradients(name, target):
    """The estimate is the mean over the S draws, as torch indexing the drawn points gives it:
    an inf coordinate and a NaN value at a point not drawn change nothing."""
    if name == "same-domain" and target == "cpu":
        pytest.skip("low rank's GEMMs over every point spread the inf (docs/language.md)")
    src, m, S = UNDRAWN[name], 9, 4
    idx = torch.randint(m, (S,), generator=torch.Generator().manual_seed(11))
    dead = next(j for j in range(m) if j not in idx.tolist())
    gen = torch.Generator().manual_seed(2)
    X0 = torch.randn(5, 3, dtype=D, generator=gen)
    Y0, b0 = torch.randn(m, 3, dtype=D, generator=gen), torch.randn(m, dtype=D, generator=gen)
    Y0[dead, 1], b0[dead] = math.inf, math.nan
    own = name == "own-domain"
    leaves = [t.clone().requires_grad_(True) for t in ((X0, Y0, b0) if own else (Y0, b0))]
    kw = dict(zip("XYb" if own else "Yb", leaves))
    X, Y, b = (kw["X"] if own else kw["Y"]), kw["Y"], kw["b"]
    want = (X @ Y[idx].T * b[idx]).sum(-1) / S  # μ = 1/m, p = 1/m: weight count / S
    if target == "plan":
        op = load_source(src).operators[0]
        module = ReferenceOperator(op).double()
        got, _ = evaluate_plan(build_plan(op), module, bind(op, kw, D),
                               torch.Generator().manual_seed(11))
    else:
        kind = "reference" if target == "reference" else "cpu"
        lib = itdsl.compile_source(src, target=kind, **(
            {"strategy": "dense"} if target == "dense" else {}))["mc"].double()
        got = lib(**kw, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    if target == "plan" or not own:  # (the own row of the inf point is NaN: no gradients)
        return
    cot = torch.randn(got.shape, dtype=D, generator=gen)
    g_got = torch.autograd.grad(got, leaves, cot)
    g_want = torch.autograd.grad(want, leaves, cot)
    for k, a, e in zip(kw, g_got, g_want, strict=True):
        if target == "reference" and k != "b":  # dot(x, y)'s backward at the dead point:
            continue  # 0 · inf = NaN, as torch.where's backward gives (docs/language.md)
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=f"gradient of {k}")


def test_rows_that_draw_fewer_points_are_padded_with_a_drawn_one():
    """Each batch row draws its own points; the rows are reduced to k = the most distinct
    points any row drew, a row with fewer padded at weight 0 — with a point it drew, not one
    it did not (whose NaN the low-rank GEMM would spread over the row)."""
    src = """operator mc {
        domain X = points(2)
        domain Y = points(2)
        input  b : Y -> R
        input  s : Y -> R
        output o(x: X) = integral(y: Y) (1 + dot(x, y))^2 * b(y) with montecarlo(4, importance = s(y))
    }"""
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(3, 2, dtype=D, generator=g), torch.randn(10, 2, dtype=D, generator=g)
    b = torch.randn(2, 10, dtype=D, generator=g)
    s = torch.full((2, 10), 1e-3, dtype=D)
    s[0, 7] = 1e6  # row 0 draws point 7 four times (almost surely); row 1 four points
    b[0, 0] = math.nan  # not drawn by row 0
    p = s / s.sum(-1, keepdim=True)
    idx = torch.multinomial(p, 4, replacement=True, generator=torch.Generator().manual_seed(7))
    assert set(idx[0].tolist()) == {7} and 0 not in idx[0].tolist()
    K = (1 + X @ Y.T) ** 2  # [3, 10]
    want = torch.stack([(K[:, idx[r]] * b[r, idx[r]] / (4 * p[r, idx[r]])).sum(-1) / 10
                        for r in range(2)])  # μ = 1/m on points
    for target in ("reference", "cpu"):
        op = itdsl.compile_source(src, target=target)["mc"].double()
        got = op(X=X, Y=Y, b=b, s=s, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=target)


def test_a_montecarlo_ratio_over_its_own_domain_compiles_with_fullgraph():
    """The runner of a ratio runs on every point under torch.compile (the number of points
    drawn is data; its tiles' loops need sizes): the same numbers as eagerly."""
    src = """operator mc {
        domain X = points(2)
        domain Y = points(2)
        input  b : Y -> R^2
        output o(x: X) = integral(y: Y) exp(-sqnorm(x - y)) * b(y) with montecarlo(5) / integral(y: Y) exp(-sqnorm(x - y)) with montecarlo(5)
    }"""
    g = torch.Generator().manual_seed(1)
    kw = dict(X=torch.randn(4, 2, dtype=D, generator=g), Y=torch.randn(9, 2, dtype=D, generator=g),
              b=torch.randn(9, 2, dtype=D, generator=g))
    op = itdsl.compile_source(src, target="cpu")["mc"].double()
    torch.manual_seed(3)
    eager = op(**kw)
    assert op.last_run == "attention"
    torch._dynamo.reset()
    torch.manual_seed(3)
    torch.testing.assert_close(torch.compile(op, fullgraph=True)(**kw), eager)


def test_a_softmax_ratio_leaves_points_of_weight_zero_out_of_its_sums():
    """With `weights(w)` padding (w = 0), a NaN value at a padded point reaches no row: the
    point is not live (docs/language.md), on every path; torch's softmax over the others."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(n, 4, dtype=D, generator=g) for n in (5, 7, 7))
    w = torch.ones(7, dtype=D)
    w[6] = 0
    v[6, 0] = math.nan
    want = torch.softmax(q @ k[:6].T, -1) @ v[:6]
    for target, strategy in (("reference", None), ("cpu", None), ("cpu", "dense")):
        op = itdsl.compile_source(_PADDED_ATTENTION, target=target, **(
            {"strategy": strategy} if strategy else {}))["padded_attention"].double()
        torch.testing.assert_close(op(q=q, k=k, v=v, w=w), want, msg=f"{target} {strategy}")


# ---- Monte Carlo over a domain of its own: the kernels run on the points drawn only ----------

TWO = """operator mc {
    domain X = points(2)
    domain Y = points(2)
    input  a : X -> R^2
    input  b : Y -> R^2
    input  v : Y -> R^3
    input  s : Y -> R
    param  t : R = 0.8
    output g(x: X) = integral(y: Y) exp(-t * sqnorm(x - y) + dot(a(x), b(y))) * v(y) * s(y) with RULE
}"""


@pytest.mark.parametrize("rule", ["montecarlo(6)", "montecarlo(6, importance = s(y) + 0.5)"])
@pytest.mark.parametrize("batched", [False, True])
def test_montecarlo_kernels_run_on_the_drawn_points_only(rule, batched, monkeypatch):
    """Same numbers and gradients as the reference with the same draws, while the kernels see
    at most S of the m = 40 points (a batch's rows draw their own points)."""
    import itdsl.runtime.module as module
    seen = []

    def spy(*args):
        out = sampling.compact(*args)
        seen.append(None if out is None else out[1].shape)
        return out

    monkeypatch.setattr(module, "compact", spy)
    src = TWO.replace("RULE", rule)
    cpu = itdsl.compile_source(src, target="cpu")["mc"].double()
    ref = itdsl.compile_source(src, target="reference")["mc"].double()
    g = torch.Generator().manual_seed(3)
    lead = (3,) if batched else ()
    kw = dict(X=torch.randn(*lead, 7, 2, dtype=D, generator=g),
              Y=torch.randn(40, 2, dtype=D, generator=g),
              a=torch.randn(*lead, 7, 2, dtype=D, generator=g),
              b=torch.randn(40, 2, dtype=D, generator=g),
              v=torch.randn(*lead, 40, 3, dtype=D, generator=g),
              s=torch.rand(*lead, 40, dtype=D, generator=g))
    for t in kw.values():
        t.requires_grad_(True)
    got = cpu(**kw, generator=torch.Generator().manual_seed(9))
    want = ref(**kw, generator=torch.Generator().manual_seed(9))
    assert seen and seen[-1] is not None and seen[-1][-1] <= 6
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(got)
    leaves = [*kw.values(), cpu.t]
    ga = torch.autograd.grad(got, leaves, cot)
    gb = torch.autograd.grad(want, [*kw.values(), ref.t], cot)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
