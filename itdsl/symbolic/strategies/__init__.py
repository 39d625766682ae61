"""The strategy registry: one entry per strategy, in the order their rules are tried.

Each strategy is one file here (its recognition rules, its typed form on a Plan, its
per-call choice and explain text) and one file in `itdsl/runtime/strategies/` (its runner).
Every stage reads this registry: the recogniser (`RULES`), the analysis (which stores the
form in the Plan), `explain`, the API's list of strategies and the runtime.
"""

from __future__ import annotations

from . import attention, convolution, dense, lattice_conv, lowrank, matmul, recurrence
from .entry import Call, Match, Miss, Rule, Strategy

REGISTRY: tuple[Strategy, ...] = (
    attention.STRATEGY,
    recurrence.STRATEGY,
    convolution.STRATEGY,
    lowrank.STRATEGY,
    matmul.STRATEGY,
    lattice_conv.STRATEGY,  # (its rules read the Plans of version-1 programs: `ON_PLAN`)
    dense.STRATEGY,  # last: its rule matches everything
)
BY_NAME: dict[str, Strategy] = {s.name: s for s in REGISTRY}
NAMES: tuple[str, ...] = tuple(BY_NAME)
RULES: tuple[Rule, ...] = tuple(r for s in REGISTRY for r in s.rules)
# the strategies whose rules read the built Plan of a version-1 program (several variables,
# lattices, reads at computed points: `recognize.structured`), with `lattice_conv.OnPlan`;
# the others read the IR of a program of one variable per side, with `recognize.Analysis`
ON_PLAN: tuple[Strategy, ...] = (lattice_conv.STRATEGY,)
PLAN_RULES: tuple[Rule, ...] = tuple(r for s in ON_PLAN for r in s.rules)
IR_RULES: tuple[Rule, ...] = tuple(r for r in RULES if r not in PLAN_RULES)


def get(name: str) -> Strategy:
    return BY_NAME[name]


__all__ = ["BY_NAME", "Call", "IR_RULES", "Match", "Miss", "NAMES", "ON_PLAN", "PLAN_RULES",
           "REGISTRY", "RULES", "Rule", "Strategy", "get"]
