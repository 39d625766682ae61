"""Low rank: K(x, y) = Σ_{r<R} φ_r(x)·ψ_r(y) with R finite: two GEMMs, A·(Bᵀ·Y).

Recognised on the IR by a sympy separation and the rank of its coefficient matrix (guarded by
the numeric rank of samples); on the Plan, the kernel of every pair sum separated
structurally into terms a_t(x)·b_t(y) (`forms.separate`). The causal form (under [s <= t])
is the recurrence's (`recurrence.py`), which shares `LowRankSum` and its runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..plan import X_SIDE, Plan
from .entry import LIBRARY, Match, Miss, Rule, Strategy
from .forms import (
    PairSum,
    Term,
    plain_sums,
    rank,
    separate,
)

if TYPE_CHECKING:
    from ..recognize import Analysis, Item


MAX_EVIDENCE_RANK = 48  # sample a matrix to check the symbolic rank up to this rank

# ---- recognition (on the IR) -----------------------------------------------------------------


def _lowrank_item(A: Analysis, item: Item) -> Match | Miss:
    sep = A.separation(item, item.kernel)
    if isinstance(sep, Miss):
        return sep
    rank = sep.details["rank"]
    why = sep.reason
    if rank <= MAX_EVIDENCE_RANK:
        sampled = A.sampled_rank(item, item.kernel, rank + 4)
        if sampled is not None and sampled > rank:
            return Miss(f"{why}, but K sampled at random points has numeric rank {sampled}")
        if sampled is not None:
            why += f"; sampled numeric rank {sampled} <= {rank}"
    return Match(why, {"rank": rank, "normalised": item.unit.normalised})


def match_lowrank(A: Analysis) -> Match | Miss:
    """K(x,y) = Σ_{r<R} φ_r(x)·ψ_r(y), R finite  ->  lowrank (with a ratio: linear attention)"""
    ms, miss = A.per_item(_lowrank_item)
    if miss is not None:
        return miss
    return Match(A.joined(ms), {"rank": sum(m.details["rank"] for m in ms),
                               "normalised": all(m.details["normalised"] for m in ms)})


RULES = (Rule("finite-rank", "lowrank", "K(x,y) = Σ_{r<R} φ_r(x)·ψ_r(y)", match_lowrank),)


# ---- the form (on the Plan) ------------------------------------------------------------------


@dataclass(frozen=True)
class LowRankSum:
    """lowrank (and causal lowrank recurrence): kernel = Σ_t a_t(x)·b_t(y), `causal` "<=" or "<"."""

    sum: PairSum
    terms: tuple[Term, ...]
    causal: str | None



def lowrank_sum(ps: PairSum, causal: str | None) -> LowRankSum | None:
    """`ps` with its kernel separated, or None where the separation finds no terms."""
    terms = separate(ps.kernel, X_SIDE, ps.over) if ps.kernel.shape == () else None
    return None if terms is None else LowRankSum(ps, tuple(terms), causal)


def find(plan: Plan) -> tuple[LowRankSum, ...] | Miss:
    sums = plain_sums(plan)
    if isinstance(sums, Miss):
        return sums
    out = []
    for ps in sums:
        if ps.mask is not None:
            return Miss(f"the sum {ps.step} has a bracket of both points")
        f = lowrank_sum(ps, None)
        if f is None:
            return Miss(f"the kernel of {ps.step} does not separate structurally into "
                        "Σ a(x)·b(y)")
        out.append(f)
    return tuple(out)


def describe(f: LowRankSum) -> str:
    how = ("chunked causal scan: per chunk a masked L×L product, across chunks a running "
           "Σ ψ(y) f(y)ᵀ" if f.causal else "two GEMMs: Σ_y ψ(y) f(y)ᵀ, then φ(x)·that")
    return f"      {f.sum.step}: rank {rank(list(f.terms))}: {how}"


def runs_as(plan: Plan, form) -> list[str]:
    return [LIBRARY, *(describe(f) for f in form)]


STRATEGY = Strategy(
    name="lowrank", rules=RULES,
    algorithm="two passes: Σ_y ψ(y) f(y)ᵀ once, then φ(x)·(that) per x",
    complexity="O((n+m)·r·C) time for rank r",
    find=find, runs_as=runs_as)
