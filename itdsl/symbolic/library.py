"""Forms of a Plan that a library call can compute (no torch here: the runtime runs them).

matmul: each integral of the output is `sum_j A[i, j] V[j]`, with `A[i, j]` everything
that does not read the call's inputs (the kernel, the quadrature weight: coordinates and
params only) and `V[j]` the factors that read them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..frontend import ir
from . import pexpr as P
from .pexpr import Node
from .plan import Plan


@dataclass(frozen=True)
class MatmulTerm:
    step: str  # the pair-sum step it replaces
    over: str  # the side it sums over
    kernel: Node  # A[i, j]: depends on x and y, reads no field
    values: Node  # V[j]: depends on y (or nothing)


def matmul_terms(plan: Plan) -> list[MatmulTerm] | None:
    """The integrals of a matmul Plan as (A, V) pairs, or None if it is not of that form."""
    if plan.strategy != "matmul":
        return None
    terms = []
    for st in plan.forward.steps:
        if st.kind == "max":
            return None
        if st.kind != "sum":
            continue
        kernel, values = P.ONE, P.ONE
        for f in P.factors(st.expr):  # what reads the inputs is V; the rest is sampled
            if "x" in f.deps or not reads_inputs(f, plan):
                kernel = P.mul(kernel, f)
            else:
                values = P.mul(values, f)
        fields = [n for n in P.toposort([kernel]) if n.op == "field"]
        if fields or kernel.shape or plan.spaces[st.over].quad.rule is ir.QuadRule.GAUSS:
            return None
        terms.append(MatmulTerm(st.name, st.over, kernel, values))
    return terms or None


def reads_inputs(e: Node, plan: Plan) -> bool:
    """Whether `e` depends on the call's input fields (directly or through earlier steps)."""
    steps = {st.name: st for st in plan.forward.steps}
    todo, seen = [e], set()
    while todo:
        for n in P.toposort([todo.pop()]):
            if n.op in ("field", "cot"):
                return True
            if n.op == "ref" and n.attrs[0] not in seen and n.attrs[0] in steps:
                seen.add(n.attrs[0])
                todo.append(steps[n.attrs[0]].expr)
    return False
