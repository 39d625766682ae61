"""Symbolic layer: checked IR -> Plan (strategy, hoisted per-point work, gradients).

No torch, no TVM here: sympy builds and differentiates expressions made from the IR
(never from program text). sympy is imported only when an operator is analysed, so a
Plan loaded from the cache needs none of it.
"""

from __future__ import annotations

import time

from ..errors import AnalysisError
from ..frontend import ir
from .plan import Plan, Verdict


def build_plan(op: ir.Operator, strategy: str | None = None, verdict=None) -> Plan:
    from .build import build_plan as build
    return build(op, strategy, verdict)


def analyse(op: ir.Operator, strategy: str | None = None) -> Plan:
    """Recognise the strategy of `op` and build its Plan. `strategy="dense"` forces the
    general path; any other forced strategy must be the one recognised."""
    from .recognize import recognize
    t0 = time.perf_counter()
    verdict = recognize(op)
    if strategy not in (None, "dense", verdict.strategy):
        raise AnalysisError(f"strategy `{strategy}` does not apply to operator `{op.name}`: the "
                            f"analysis found `{verdict.strategy}` ({verdict.reason})", op.span,
                            "leave `strategy` unset, or force \"dense\"")
    plan = build_plan(op, strategy or verdict.strategy, verdict)
    find_form(plan)
    plan.seconds = time.perf_counter() - t0
    return plan


def find_form(plan: Plan) -> None:
    """Store the strategy's typed form in `plan`, found once here. A strategy whose algorithm
    does not take the Plan's form (a kernel its structural separation does not split) runs on
    the dense kernels, and the Plan says so: never a silent fallback at run time."""
    from .strategies import Miss, get
    entry = get(plan.strategy)
    found = entry.find(plan)
    plan.form = None if isinstance(found, Miss) else found
    if plan.form is None and entry.name != "dense":
        why = f" ({found.why})" if isinstance(found, Miss) else ""
        plan.notes.append(f"the analysis found `{entry.name}`, but its algorithm does not take "
                          f"this form of the kernel{why}: the dense kernels run it")
        plan.strategy = "dense"


__all__ = ["analyse", "build_plan", "Plan", "Verdict"]
