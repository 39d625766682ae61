"""The Plan verifier (itdsl/symbolic/verify.py): it accepts every Plan the compiler builds
(the examples, 200 fuzzer programs) and rejects hand-broken ones, naming the step and the
rule. tests/conftest.py also runs it on every Plan built or loaded during the test session.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from fuzzing.generate import generate

import itdsl.cache.plans
import itdsl.symbolic.build
from itdsl.errors import ItdslError
from itdsl.frontend import load_file, load_source
from itdsl.symbolic import analyse
from itdsl.symbolic import pexpr as P
from itdsl.symbolic.build import build_plan
from itdsl.symbolic.plan import Plan, Program, Step
from itdsl.symbolic.verify import PlanInvariantError, verify_plan

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_FILES = sorted((REPO / "examples").glob("*.it"))
FUZZ_SEEDS = range(200)


def test_the_hook_is_on():
    assert getattr(itdsl.symbolic.build.build_plan, "verifying", False)
    assert getattr(itdsl.cache.plans.load_plan, "verifying", False)


def test_the_verifier_imports_neither_torch_nor_tvm():
    code = ("import sys, itdsl.symbolic.verify; "
            "print(sorted(m for m in ('torch', 'tvm', 'sympy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True, timeout=120)
    assert r.stdout.strip() == "[]", r.stdout


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_examples_verify(path):
    for op in load_file(path).operators:
        verify_plan(analyse(op))
        verify_plan(analyse(op, "dense"))


def test_fuzzer_programs_verify():
    verified = 0
    for seed in FUZZ_SEEDS:
        try:
            ops = load_source(generate(seed).text).operators
        except ItdslError:  # the few generated programs that do not check
            continue
        for op in ops:
            try:
                plan = analyse(op)
            except ItdslError:
                continue
            try:
                verify_plan(plan)
            except PlanInvariantError as e:
                raise AssertionError(f"fuzzer seed {seed}: {e}") from e
            verified += 1
    assert verified >= 150


# ---- hand-broken Plans ------------------------------------------------------------------------

TWO = """operator two {
    domain X = points(2)
    domain Y = points(2)
    domain Z = grid(0, 1)
    input f : Y -> R
    input g : Z -> R^3
    param a : R^3 = 0.5
    output u(x: X) = integral(y: Y) exp(-sqnorm(x - y)) * f(y) with mean
                   + integral(z: Z) dot(g(z), a) * sin(x[0] * z) with trapezoid
}
"""
#   forward: I0[x] = sum over y0 of ...; h0[y1] = dot(g(y1), a); I1[x] = sum over y1 of ...;
#            out[x] = I0[x] + I1[x]


@pytest.fixture
def plan() -> Plan:
    p = build_plan(load_source(TWO).operators[0])
    assert [st.name for st in p.forward.steps] == ["I0", "h0", "I1", "out"]
    return p


def _forward(plan: Plan, steps: list[Step]) -> Plan:
    return dataclasses.replace(plan, forward=Program(steps, dict(plan.forward.outputs)))


def _backward(plan: Plan, steps: list[Step], outputs=None) -> Plan:
    outputs = dict(plan.backward.outputs) if outputs is None else outputs
    return dataclasses.replace(plan, backward=Program(steps, outputs))


def _replace(plan: Plan, name: str, **changes) -> Plan:
    steps = [dataclasses.replace(st, **changes) if st.name == name else st
             for st in plan.forward.steps]
    return _forward(plan, steps)


def _rejects(plan: Plan, *words: str) -> str:
    with pytest.raises(PlanInvariantError) as info:
        verify_plan(plan)
    msg = str(info.value)
    for w in words:
        assert w in msg, msg
    return msg


def test_the_sound_plan_verifies(plan):
    verify_plan(plan)


def test_dangling_ref(plan):
    out = plan.forward.step("out")
    expr = P.add(out.expr, P.ref("nowhere", "x", ()))
    _rejects(_replace(plan, "out", expr=expr), "forward step out", "`nowhere`",
             "earlier step")


def test_ref_to_a_later_step(plan):
    I0 = plan.forward.step("I0")
    expr = P.mul(I0.expr, P.ref("out", "x", ()))
    _rejects(_replace(plan, "I0", expr=expr), "forward step I0", "ref `out`", "earlier step")


def test_ref_with_the_wrong_side_or_shape(plan):
    I1 = plan.forward.step("I1")  # over y1, reading h0 at x rather than at y1
    _rejects(_replace(plan, "I1", expr=P.mul(I1.expr, P.ref("h0", "x", ()))),
             "ref `h0` has its step's side and shape")
    _rejects(_replace(plan, "out", expr=P.ref("I0", "x", (2,))),
             "its step's side and shape")


def test_duplicate_step_name(plan):
    steps = list(plan.forward.steps)
    steps.insert(3, dataclasses.replace(steps[1]))
    _rejects(_forward(plan, steps), "forward step h0", "unique")


def test_backward_step_named_like_a_forward_step(plan):
    st = plan.backward.steps[0]
    steps = [dataclasses.replace(st, name="I0")] + plan.backward.steps[1:]
    _rejects(_backward(plan, steps), "backward step I0", "unique")


def test_pair_step_depending_on_a_third_side(plan):
    I0 = plan.forward.step("I0")  # over y0: reading y1 is a third side
    expr = P.mul(I0.expr, P.weight("y1", "z"))
    _rejects(_replace(plan, "I0", expr=expr), "forward step I0", "y1", "outside the step's sides")


def test_point_step_reading_the_other_side(plan):
    h0 = plan.forward.step("h0")  # per point of y1
    expr = P.mul(h0.expr, P.field("f", "y0", ()))
    _rejects(_replace(plan, "h0", expr=expr), "forward step h0", "outside the step's sides")


def test_unknown_kind(plan):
    """A step kind is a StepKind: an unknown one cannot even be built."""
    with pytest.raises(ValueError, match="scan"):
        _replace(plan, "h0", kind="scan")


def test_sides_inconsistent_with_the_kind(plan):
    _rejects(_replace(plan, "I0", over="x"), "forward step I0", "over another")
    _rejects(_replace(plan, "I1", over=None), "forward step I1", "over another")
    _rejects(_replace(plan, "h0", over="x"), "forward step h0", "point step")
    const = Step("const", "c", "x", P.param("a", (3,)))
    _rejects(_forward(plan, [const, *plan.forward.steps]), "forward step c", "no side")


def test_max_step_without_a_mask(plan):
    I0 = plan.forward.step("I0")
    m = Step("max", "m0", "x", P.dot(P.coord("x", "x", (2,)), P.coord("y0", "y", (2,))),
             over="y0")
    steps = [m, I0, *plan.forward.steps[1:]]
    _rejects(_forward(plan, steps), "forward step m0", "mask")
    with_mask = dataclasses.replace(m, mask=P.ONE)
    sound = _forward(plan, [with_mask, I0, *plan.forward.steps[1:]])
    sound.pair_ops_after["m0"] = 3
    verify_plan(sound)


def test_mask_on_a_sum(plan):
    _rejects(_replace(plan, "I0", mask=P.ONE), "forward step I0", "mask")


def test_unhoisted_one_sided_work(plan):
    I1 = plan.forward.step("I1")  # h0[y1] = dot(g(y1), a), put back into the pair loop
    h0 = plan.forward.step("h0")
    expr = P.substitute([I1.expr], {P.ref("h0", "y1", ()): h0.expr})[0]
    _rejects(_replace(plan, "I1", expr=expr), "forward step I1", "hoisting left")


def test_cotangent_in_the_forward(plan):
    out = plan.forward.step("out")
    expr = P.add(out.expr, P.cot("dout", "x", ()))
    _rejects(_replace(plan, "out", expr=expr), "forward step out", "cotangent")


def test_out_of_the_wrong_shape(plan):
    _rejects(dataclasses.replace(plan, out_shape=(2,)), "forward", "`out`")


def test_gradient_of_the_wrong_shape(plan):
    steps = [dataclasses.replace(st, expr=P.component(st.expr, 0)) if st.name == "grad_a"
             else st for st in plan.backward.steps]
    _rejects(_backward(plan, steps), "backward output param:a", "grad_a")


def test_gradient_output_naming_no_step(plan):
    outputs = {**plan.backward.outputs, "input:f": ["grad_nothing"]}
    _rejects(_backward(plan, plan.backward.steps, outputs), "backward output input:f",
             "existing steps")


def test_gradient_per_point_of_the_wrong_domain(plan):
    outputs = {**plan.backward.outputs, "input:f": ["grad_g_y1"]}
    _rejects(_backward(plan, plan.backward.steps, outputs), "backward output input:f",
             "per point of `Y`")


def test_leaf_that_is_not_the_operators(plan):
    out = plan.forward.step("out")
    _rejects(_replace(plan, "out", expr=P.add(out.expr, P.param("b", ()))), "a param")
    _rejects(_replace(plan, "out", expr=P.add(out.expr, P.field("f", "x", ()))),
             "an input on its side's domain")


def test_two_distinct_equal_nodes(plan):
    out = plan.forward.step("out")
    a, b = out.expr.args
    # what `node()` never lets happen: a second node equal to `a`, under a parent of its own
    twin = _unshared(a.op, a.args, a.attrs, a.shape, a.deps)
    expr = _unshared("+", (P.mul(a, b), _unshared("*", (twin, b), (), (), a.deps | b.deps)),
                     (), (), a.deps | b.deps)
    _rejects(_replace(plan, "out", expr=expr), "forward step out", "hash-consing")


def _unshared(op, args, attrs, shape, deps) -> P.Node:
    n = P.Node.__new__(P.Node)
    n.op, n.args, n.attrs, n.shape, n.deps = op, args, attrs, shape, deps
    n._hash = hash((op, args, attrs, shape))
    return n


def test_node_with_an_inconsistent_shape(plan):
    h0 = plan.forward.step("h0")
    bad = P.node("dot", h0.expr.args, shape=(3,))
    _rejects(_replace(plan, "h0", expr=P.component(bad, 0)), "forward step h0", "shape")
