"""Matmul (an Integral Neural Network layer): each integral of the output is
`Σ_j A[i, j]·V[j]`, with A[i, j] everything that does not read the call's inputs (the
kernel, the quadrature weight: coordinates and params only) and V[j] the factors that do.

The runtime samples A once into an n×m matrix (kept per param version and sizes) and runs
a GEMM, while the matrix fits the memory budget; beyond it the tiled kernels run the call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...frontend.ast import DomainKind
from .. import pexpr as P
from ..pexpr import Node
from ..plan import X_SIDE, Plan, StepKind
from .entry import LIBRARY, Match, Miss, Rule, Strategy

if TYPE_CHECKING:
    from ..recognize import Analysis, Item
from .entry import Call
from .forms import reads_inputs

# ---- recognition (on the IR) -----------------------------------------------------------------


def _matmul_item(A: Analysis, item: Item) -> Match | Miss:
    for dom in (item.xdom, item.ydom):
        if dom.kind is not DomainKind.GRID:
            return Miss(f"{dom.name} is {dom.kind.value}, not a grid")
    miss = A.no_fields(item)
    if miss is not None:
        return miss
    return Match(f"K reads no sampled field, and {item.xdom.name} × {item.ydom.name} are grids: "
                 "sample K once")


def match_matmul(A: Analysis) -> Match | Miss:
    """K(u,v) = k(u, v; params), u and v on grids  ->  K sampled once, then a GEMM"""
    ms, miss = A.per_item(_matmul_item)
    return miss or Match(A.joined(ms), {})


RULES = (Rule("coordinates-only", "matmul", "K(u,v) = k(u,v; params), u and v on grids",
              match_matmul),)


# ---- the form (on the Plan) ------------------------------------------------------------------


@dataclass(frozen=True)
class MatmulTerm:
    step: str  # the pair-sum step it replaces
    over: str  # the side it sums over
    kernel: Node  # A[i, j]: depends on x and y, reads no field
    values: Node  # V[j]: depends on y (or nothing)
    pair_values: int = 1  # values per pair (i, j) that exist while A is sampled


def pair_values(kernel: Node, over: str) -> int:
    """The values per pair sampling `kernel` holds at once: every node of both sides (the
    evaluator keeps them until the matrix is done), and a channel product per dot or sum."""
    total = 0
    for n in P.toposort([kernel]):
        if {X_SIDE, over} <= n.deps:
            total += math.prod(n.shape) if n.shape else 1
            if n.op in (P.Op.DOT, P.Op.SUM):
                total += math.prod(n.args[0].shape) if n.args[0].shape else 1
    return max(total, 1)


def find(plan: Plan) -> tuple[MatmulTerm, ...] | Miss:
    """The integrals of `plan` as (A, V) pairs, or why it is not of that form."""
    terms = []
    for st in plan.forward.steps:
        if st.kind is StepKind.MAX:
            return Miss("the Plan has a max step (a softmax shift)")
        if st.kind is not StepKind.SUM:
            continue
        kernel, values = P.ONE, P.ONE
        for f in P.factors(st.expr):  # what reads the inputs is V; the rest is sampled
            if X_SIDE in f.deps or not reads_inputs(f, plan):
                kernel = P.mul(kernel, f)
            else:
                values = P.mul(values, f)
        fields = [n for n in P.toposort([kernel]) if n.op == "field"]
        if fields:
            return Miss(f"the kernel of {st.name} reads a field")
        if kernel.shape:
            return Miss(f"the kernel of {st.name} is vector-valued")
        terms.append(MatmulTerm(st.name, st.over, kernel, values, pair_values(kernel, st.over)))
    return tuple(terms) or Miss("the output has no pair sum")


def matrix_bytes(form, call: Call) -> int:
    """The bytes sampling the matrices takes: n×m times the values per pair, per integral."""
    n = call.sizes[X_SIDE]
    return sum(n * call.sizes[t.over] * t.pair_values for t in form) * call.itemsize


def choose(form, call: Call) -> str | None:
    need = matrix_bytes(form, call)
    if need > call.budget:
        return (f"the sampled matrix needs {need / 2**20:.0f} MiB, over the memory budget of "
                f"{call.budget / 2**20:.0f} MiB")
    return None


def choice(form, budget: int) -> str:
    k = sum(t.pair_values for t in form)
    return (f"per call: the sampled matrix while sampling it, {k} value(s) per pair, fits the "
            f"memory budget ({budget / 2**20:g} MiB: n·m <= {budget // (8 * k):,} in float64, "
            f"{budget // (4 * k):,} in float32; itdsl.set_memory_budget, "
            "$ITDSL_MEMORY_BUDGET), else the tiled kernels")


def runs_as(plan: Plan, form) -> list[str]:
    return [LIBRARY, "      the matrix sampled from the per-point tensors below (kept while params "
                     "and sizes stay), then torch.matmul (a library GEMM)"]


STRATEGY = Strategy(
    name="matmul", rules=RULES,
    algorithm="the kernel sampled once into an n×m matrix per param version and sizes, then a "
              "GEMM (an Integral Neural Network layer)",
    complexity="O(n·m·C) time, O(n·m) for the matrix",
    find=find, runs_as=runs_as, choose=choose, choice=choice)
