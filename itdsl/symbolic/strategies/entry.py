"""What one strategy is: its recognition rules, its typed form on a Plan, its per-call choice
and its explain text (no torch, no sympy here: Plans loaded from the cache read these).

A rule's matcher runs only at analysis (it imports sympy then); the form is found once, on
the built Plan, and stored in it (`Plan.form`); the runtime's runner of the same name
(`itdsl/runtime/strategies/`) computes it. `choose` is the one rule, over a call's sizes,
dtype and device, that says whether that runner or the tiled kernels run the call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

LIBRARY = "    runs as (torch, no generated kernel; torch autograd gives the gradients):"


@dataclass(frozen=True)
class Match:
    reason: str
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Miss:
    why: str


@dataclass(frozen=True)
class Rule:
    """A recogniser: `match(analysis)` returns a `Match`, or a `Miss` saying why not."""

    name: str
    strategy: str
    form: str  # the mathematical form it recognises
    match: Callable[[Any], Match | Miss]


@dataclass(frozen=True)
class Call:
    """What a per-call choice looks at: the points of each side (`x` and the integrals'), the
    batch entries, the bytes of one value, the tensors' device type ("cpu", "cuda"), which
    arguments have batch entries, and the memory budget in bytes (read when a rule asks)."""

    sizes: dict[str, int]
    batch: int
    itemsize: int
    device: str
    batched: frozenset[str] = frozenset()  # the arguments (domains' coordinates, inputs)
    #                                        that carry batch entries

    @property
    def budget(self) -> int:
        from ...settings import memory_budget
        return memory_budget()


@dataclass(frozen=True)
class Strategy:
    """One strategy: everything every stage knows about it, in one place."""

    name: str
    rules: tuple[Rule, ...]
    algorithm: str  # what computes it, for explain
    complexity: str
    find: Callable[[Any], Any]  # Plan -> its typed form, or a Miss saying why it is not one
    runs_as: Callable[[Any, Any], list[str]]  # (Plan, form) -> explain's "runs as" lines
    # (form, Call) -> None where the strategy's runner computes the call, else why the tiled
    # kernels run it instead
    choose: Callable[[Any, Call], str | None] = lambda form, call: None
    # `choose` in words, for explain (given the form and the memory budget in bytes)
    choice: Callable[[Any, int], str] = lambda form, budget: "always its own algorithm"


def short(e, limit: int = 160) -> str:
    """`e` printed, cut to `limit` characters."""
    text = str(e)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def not_taken(plan) -> None:
    """The form finder of a strategy with no algorithm of its own (dense)."""
    return None
