"""The domain kinds: `points(D)`, `grid(a, b)`, `index` (docs/language.md, "Domains")."""

from __future__ import annotations

import numpy as np

from .entry import Kind


def _grid_spacing(d, n: int) -> float:
    """h = (b − a)/(n − 1) between the n uniform points of [a, b] (a grid has n ≥ 2)."""
    return (d.hi - d.lo) / (n - 1)


def _grid_points(d, n: int) -> np.ndarray:
    return d.lo + (d.hi - d.lo) * np.arange(n) / (n - 1)


KINDS = [
    # scattered points in R^D, their coordinates passed by the call; the mean is their measure
    Kind(name="points", usage="points(D)", arity=1, default="mean", given=True, min_size=0,
         regular=False, measure=lambda d, n: 1.0 / n),
    # the n uniform points a, a + h, ..., b of an interval, the call passing n ≥ 2
    Kind(name="grid", usage="grid(a, b)", arity=2, default="trapezoid", given=False,
         min_size=2, regular=True, points=_grid_points, spacing=_grid_spacing),
    # the integers 0, 1, ..., n − 1; the sum is their measure
    Kind(name="index", usage="index", arity=0, default="sum", given=False, min_size=0,
         regular=True, points=lambda d, n: np.arange(n, dtype=float),
         spacing=lambda d, n: 1.0, measure=lambda d, n: 1.0),
]
