"""The runners of the strategies whose algorithm is not the tiled pair kernels: one file per
strategy, next to its symbolic side (`itdsl/symbolic/strategies/<name>.py`: the rule, the
typed form stored in the Plan, the per-call choice). `runner_for(plan)` builds the runner of
a Plan's strategy from its stored form (None for dense: the kernels run it).
"""

from __future__ import annotations

from ...symbolic.plan import Plan
from . import attention, convolution, lattice_conv, lowrank, matmul, recurrence
from .common import Declined, Runner

RUNNERS = {
    "attention": attention.runner,
    "recurrence": recurrence.runner,
    "convolution": convolution.runner,
    "lattice_conv": lattice_conv.runner,
    "lowrank": lowrank.runner,
    "matmul": matmul.runner,
}


def runner_for(plan: Plan) -> Runner | None:
    """The runner of `plan`'s strategy, or None where the tiled kernels run it (dense)."""
    return None if plan.form is None else RUNNERS[plan.strategy](plan)


__all__ = ["RUNNERS", "Declined", "Runner", "runner_for"]
