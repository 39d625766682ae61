"""Convolution: K(t, s) = g(t − s; params) on one grid or index domain.

Recognised on the IR (K(t, t − d) free of t, checked numerically too; the brackets' support
in t − s gives a half width when compact); on the Plan, every pair sum's kernel and mask read
coordinates and params only. The runtime samples the taps g(d) at grid points and runs a
depthwise conv1d (few taps) or an FFT.

Where a bracket's edge falls exactly on a grid point, the dense kernels round each pair's
t − s on its own; the convolution decides once for all pairs (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..plan import Plan
from .entry import LIBRARY, Match, Miss, Rule, Strategy, short
from .forms import (
    PairSum,
    irregular,
    of_coords,
    plain_sums,
)

if TYPE_CHECKING:
    from ..recognize import Analysis, Item


# ---- recognition (on the IR) -----------------------------------------------------------------


def _convolution_item(A: Analysis, item: Item) -> Match | Miss:
    miss = A.one_grid(item, "a convolution") or A.no_fields(item)
    if miss is not None:
        return miss
    if not item.unit.split.pair:
        return Miss("K does not depend on both points (it is rank 1, not a convolution)")
    shifted = A.shift(item, A.product(item.kernel))
    if shifted is None:
        return Miss("K(t, t−d) still depends on t after expanding, and ∂K/∂t + ∂K/∂s ≠ 0")
    g, how = shifted
    bad = _translation_guard(A, item)
    if bad:
        return Miss(f"{how} symbolically, but {bad}")
    iv = A.support(item, item.brackets)
    causal = iv is not None and iv.lo >= 0
    half = None
    if iv is not None and not (math.isinf(iv.lo) or math.isinf(iv.hi)):
        half = float(max(abs(iv.lo), abs(iv.hi)))
    why = f"{how}; g(d) = {short(g)}"
    if iv is not None:
        why += f", supported on d = t − s in {iv.text()}"
    why += " (compact: direct)" if half is not None else " (global: FFT)"
    return Match(why, {"causal": causal, "half_width": half, "kernel": str(g),
                       "edges": A.edges(item, item.brackets)})


def _translation_guard(A: Analysis, item: Item) -> str | None:
    """Numerically, K(t + δ, s + δ) = K(t, s) at random points and params."""
    rng = np.random.default_rng(A.rng_seed)
    n = 12
    t, s = A.points(item.xdom, n, rng), A.points(item.xdom, n, rng)
    delta = A.points(item.xdom, n, rng) - A.points(item.xdom, n, rng)
    env = A.env(item, t, s, rng)
    a = A.kernel_values(item, env, n)
    env.coords = {item.x: t + delta, item.y: s + delta}  # (K reads no field here)
    b = A.kernel_values(item, env, n)
    if not np.allclose(a, b, rtol=1e-8, atol=1e-12, equal_nan=True):
        return "K(t + δ, s + δ) ≠ K(t, s) at random points"
    return None


def match_convolution(A: Analysis) -> Match | Miss:
    """K(t,s) = g(t−s; params), t and s on one grid or index domain  ->  convolution"""
    ms, miss = A.per_item(_convolution_item)
    if miss is not None:
        return miss
    halves = [m.details["half_width"] for m in ms]
    edges = [m.details["edges"] for m in ms]
    return Match(A.joined(ms), {
        "causal": all(m.details["causal"] for m in ms),
        "half_width": None if None in halves else max(halves),
        "kernel": " ; ".join(m.details["kernel"] for m in ms),
        "edges": None if None in edges else tuple(sorted({e for es in edges for e in es}))})


RULES = (Rule("translation-invariant", "convolution",
              "K(t,s) = g(t−s; params), t and s on one grid/index domain", match_convolution),)


# ---- the form (on the Plan) ------------------------------------------------------------------


@dataclass(frozen=True)
class ConvSum:
    """Convolution: [mask]·kernel = g(x − y; params) on one grid or index domain."""

    sum: PairSum
    half_width: float | None  # the support |x − y| <= half_width in coordinates (None: global)
    # every x − y at which a bracket of the mask may change its value (None: not known). Where
    # one falls on a grid point, the reference and the kernels round each pair's x − y on its
    # own; the runner decides the mask pair by pair on those diagonals too, as they do
    edges: tuple[float, ...] | None = None


def find(plan: Plan) -> tuple[ConvSum, ...] | Miss:
    sums = plain_sums(plan)
    if isinstance(sums, Miss):
        return sums
    facts = plan.verdict.details if plan.verdict is not None else {}
    half, edges = facts.get("half_width"), facts.get("edges")
    out = []
    for ps in sums:
        why = irregular(plan, ps.over)
        if why is not None:
            return Miss(why)
        if not (of_coords(ps.kernel) and (ps.mask is None or of_coords(ps.mask))):
            return Miss(f"the kernel of {ps.step} reads more than coordinates and params")
        out.append(ConvSum(ps, half if isinstance(half, float) else None,
                           None if edges is None else tuple(edges)))
    return tuple(out)


def runs_as(plan: Plan, form) -> list[str]:
    out = [LIBRARY]
    for f in form:
        how = (f"direct depthwise conv1d over the support |x − y| <= {f.half_width} (FFT "
               "when it spans many points)" if f.half_width is not None else "FFT (torch.fft)")
        out.append(f"      {f.sum.step}: taps g(x − y) sampled on the grid, then {how}; "
                   "quadrature weights modulate f")
        edges = ", ".join(f"{e:g}" for e in f.edges or () if e != 0)
        if f.sum.mask is not None and edges:
            out.append(f"        at sizes where a bracket edge (x − y = {edges}) falls on grid "
                       "points, the mask on those diagonals is decided pair by pair")
    return out


STRATEGY = Strategy(
    name="convolution", rules=RULES,
    algorithm="direct sum over the kernel's support (compact), or FFT (global); quadrature "
              "weights modulate f",
    complexity="O(n·w·C) direct (w points in the support), O(n log n·C) by FFT",
    find=find, runs_as=runs_as)
