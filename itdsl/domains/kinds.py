"""The domain kinds: `points(D)`, `grid(a, b)`, `index` (docs/language.md, "Domains")."""

from __future__ import annotations

import math

import numpy as np

from .entry import DeclarationError, Kind, fmt


def _grid_spacing(d, n: int) -> float:
    """h = (b − a)/(n − 1) between the n uniform points of [a, b] (a grid has n ≥ 2)."""
    return (d.hi - d.lo) / (n - 1)


def _grid_points(d, n: int) -> np.ndarray:
    return d.lo + (d.hi - d.lo) * np.arange(n) / (n - 1)


def _points_declare(vals: list[float]) -> dict:
    (dim,) = vals
    if not math.isfinite(dim) or dim != int(dim) or not 1 <= dim <= 64:
        raise DeclarationError(f"the dimension of `points` must be an integer in [1, 64], got "
                               f"{fmt(dim)}", arg=0)
    return {"dim": int(dim)}


def _grid_declare(vals: list[float]) -> dict:
    lo, hi = vals
    if not lo < hi:
        raise DeclarationError(f"a grid needs a < b, got grid({fmt(lo)}, {fmt(hi)})",
                               f"write `grid({fmt(hi)}, {fmt(lo)})`" if lo > hi else
                               "a grid spans an interval of positive length")
    if not math.isfinite(hi - lo):
        raise DeclarationError(f"grid({fmt(lo)}, {fmt(hi)}) is longer than the largest float "
                               "(b − a overflows)", "rescale the coordinate: a grid's length "
                               "must be a finite number")
    return {"lo": lo, "hi": hi}


KINDS = [
    # scattered points in R^D, their coordinates passed by the call; the mean is their measure
    Kind(name="points", usage="points(D)", arity=1, default="mean", given=True, min_size=0,
         regular=False, measure=lambda d, n: 1.0 / n, declare=_points_declare,
         text=lambda d, num: f"points({d.dim})",
         sample=lambda d, n, rng: rng.normal(size=(n, d.dim))),
    # the n uniform points a, a + h, ..., b of an interval, the call passing n ≥ 2
    Kind(name="grid", usage="grid(a, b)", arity=2, default="trapezoid", given=False,
         min_size=2, regular=True, points=_grid_points, spacing=_grid_spacing,
         declare=_grid_declare, text=lambda d, num: f"grid({num(d.lo)}, {num(d.hi)})",
         sample=lambda d, n, rng: rng.uniform(d.lo, d.hi, size=(n, 1))),
    # the integers 0, 1, ..., n − 1; the sum is their measure
    Kind(name="index", usage="index", arity=0, default="sum", given=False, min_size=0,
         regular=True, points=lambda d, n: np.arange(n, dtype=float),
         spacing=lambda d, n: 1.0, measure=lambda d, n: 1.0, text=lambda d, num: "index",
         # distinct integers, spread out
         sample=lambda d, n, rng: rng.permutation(4 * n + 16)[:n, None].astype(float)),
]
