"""Dense: any K(x, y), a tiled, fused pair reduction (the generated TVM kernels)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..plan import Plan
from .entry import Match, Rule, Strategy, not_taken

if TYPE_CHECKING:
    from ..recognize import Analysis


def match_dense(A: Analysis) -> Match:
    """any K(x,y)  ->  a tiled, fused pairwise reduction"""
    return Match("no special structure was recognised" if A.items else
                 "the output has no integral")


def runs_as(plan: Plan, form) -> list[str]:
    return ["    runs as: generated TVM kernels (LLVM on the CPU, CUDA source for GPUs) for "
            "the pair sums; per-point steps in torch"]


STRATEGY = Strategy(
    name="dense", rules=(Rule("general", "dense", "any K(x,y)", match_dense),),
    algorithm="tiled, fused pair reduction: each tile of x sweeps the points of y, the kernel "
              "is evaluated in registers and reduced at once",
    complexity="O(n·m·p) time for p operations per pair, O((n+m)·C) extra memory",
    find=not_taken, runs_as=runs_as, choice=lambda form, budget: "always the tiled kernels")
