"""The strategy registry: one entry per strategy, in the order their rules are tried.

Each strategy is one file here (its recognition rules, its typed form on a Plan, its
per-call choice and explain text) and one file in `itdsl/runtime/strategies/` (its runner).
Every stage reads this registry: the recogniser (`RULES`), the analysis (which stores the
form in the Plan), `explain`, the API's list of strategies and the runtime.
"""

from __future__ import annotations

from . import attention, convolution, dense, lowrank, matmul, recurrence
from .entry import Call, Match, Miss, Rule, Strategy

REGISTRY: tuple[Strategy, ...] = (
    attention.STRATEGY,
    recurrence.STRATEGY,
    convolution.STRATEGY,
    lowrank.STRATEGY,
    matmul.STRATEGY,
    dense.STRATEGY,  # last: its rule matches everything
)
BY_NAME: dict[str, Strategy] = {s.name: s for s in REGISTRY}
NAMES: tuple[str, ...] = tuple(BY_NAME)
RULES: tuple[Rule, ...] = tuple(r for s in REGISTRY for r in s.rules)


def get(name: str) -> Strategy:
    return BY_NAME[name]


__all__ = ["BY_NAME", "Call", "Match", "Miss", "NAMES", "REGISTRY", "RULES", "Rule", "Strategy",
           "get"]
