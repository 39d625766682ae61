"""Symbolic layer: checked IR -> Plan (strategy, hoisted per-point work, gradients).

No torch, no TVM here: sympy builds and differentiates expressions made from the IR
(never from program text).
"""

from __future__ import annotations

import time

from ..errors import AnalysisError
from ..frontend import ir
from .build import build_plan
from .plan import Plan


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
    plan.seconds = time.perf_counter() - t0
    return plan


__all__ = ["analyse", "build_plan", "Plan"]
