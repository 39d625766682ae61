"""Quadrature rules (itdsl/domains) on every path; and the Monte Carlo draws, which the
reference and the Plan evaluator take from one function (runtime/sampling.py) and so must
agree on exactly."""

from __future__ import annotations

import pytest
import torch

import itdsl
from itdsl.domains import KINDS, RULES
from itdsl.frontend import ir, load_source
from itdsl.frontend.ast import DomainKind
from itdsl.runtime.binding import bind
from itdsl.runtime.plan_eval import evaluate_plan
from itdsl.runtime.reference import ReferenceOperator
from itdsl.symbolic.build import build_plan

D = torch.float64


def test_every_kind_defaults_to_a_rule_that_applies_to_it():
    for k in KINDS.values():
        assert RULES[k.default].applies_to(k.name)
    assert [r.value for r in ir.QuadRule] == list(RULES)
    assert [k.value for k in DomainKind] == list(KINDS)



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
