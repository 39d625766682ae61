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


MAX_AXES = 3  # of a lattice, a tensor-product grid or a stencil
MAX_STENCIL = 1023  # points of a stencil along one axis


def _numbers(vals: list, usage: str) -> None:
    """Every argument is a plain number (not a tuple `(a, b)`)."""
    for k, v in enumerate(vals):
        if isinstance(v, tuple):
            raise DeclarationError(f"argument {k + 1} of `{usage}` is a number, not a tuple",
                                   f"write `{usage}`", arg=k)


def _points_declare(vals: list) -> dict:
    _numbers(vals, "points(D)")
    (dim,) = vals
    if not math.isfinite(dim) or dim != int(dim) or not 1 <= dim <= 64:
        raise DeclarationError(f"the dimension of `points` must be an integer in [1, 64], got "
                               f"{fmt(dim)}", arg=0)
    return {"dim": int(dim)}


def _interval(lo: float, hi: float, arg: int | None = None, box: bool = False) -> dict:
    if not lo < hi:
        written = f"({fmt(lo)}, {fmt(hi)})" if box else f"grid({fmt(lo)}, {fmt(hi)})"
        right = f"({fmt(hi)}, {fmt(lo)})" if box else f"grid({fmt(hi)}, {fmt(lo)})"
        raise DeclarationError(f"a grid needs a < b, got {written}",
                               f"write `{right}`" if lo > hi else
                               "a grid spans an interval of positive length", arg=arg)
    if not math.isfinite(hi - lo):
        raise DeclarationError(f"the interval ({fmt(lo)}, {fmt(hi)}) is longer than the largest "
                               "float (b − a overflows)", "rescale the coordinate: a grid's "
                               "length must be a finite number", arg=arg)
    return {"lo": lo, "hi": hi}


def _grid_declare(vals: list) -> dict:
    """`grid(a, b)`, or the tensor product `grid((a1, b1), (a2, b2))` of up to 3 boxes."""
    if all(isinstance(v, tuple) for v in vals):
        if len(vals) > MAX_AXES:
            raise DeclarationError(f"a grid has at most {MAX_AXES} axes, got {len(vals)}")
        for k, v in enumerate(vals):
            if len(v) != 2:
                raise DeclarationError(f"axis {k + 1} of the grid is {len(v)} numbers; an axis "
                                       "is an interval `(a, b)`", arg=k)
            _interval(*v, arg=k, box=True)
        if len(vals) == 1:  # one box is the plain grid
            return _interval(*vals[0], arg=0, box=True)
        return {"boxes": tuple(tuple(v) for v in vals)}
    if any(isinstance(v, tuple) for v in vals):
        raise DeclarationError("a grid is `grid(a, b)`, or a product of intervals "
                               "`grid((a1, b1), (a2, b2))`, not a mix of both",
                               "write `grid((0, 1), (0, 1))`")
    if len(vals) != 2:
        raise DeclarationError(f"`grid` takes 2 arguments, got {len(vals)}",
                               "write `grid(a, b)`, or `grid((a1, b1), (a2, b2))` for a "
                               "product of intervals")
    return _interval(*vals, arg=0)


def _index_declare(vals: list) -> dict:
    _numbers(vals, "index(D)")
    if not vals:
        return {}
    (dim,) = vals
    if not math.isfinite(dim) or dim != int(dim) or not 1 <= dim <= MAX_AXES:
        raise DeclarationError(f"the dimension of `index` must be 1, 2 or 3, got {fmt(dim)}",
                               arg=0)
    return {} if dim == 1 else {"dim": int(dim)}  # index(1) is index


def _stencil_declare(vals: list) -> dict:
    _numbers(vals, "stencil(k1, k2)")
    if not 1 <= len(vals) <= MAX_AXES:
        raise DeclarationError(f"a stencil has 1 to {MAX_AXES} sizes, got {len(vals)}")
    for k, v in enumerate(vals):
        if not math.isfinite(v) or v != int(v) or not 1 <= v <= MAX_STENCIL:
            raise DeclarationError(f"a stencil's size must be an integer in [1, {MAX_STENCIL}], "
                                   f"got {fmt(v)}", arg=k)
        if int(v) % 2 == 0:
            raise DeclarationError(f"a stencil's size must be odd (the offsets −(k − 1)/2 … "
                                   f"(k − 1)/2 are centred on 0), got {fmt(v)}",
                                   f"write {fmt(v - 1)} or {fmt(v + 1)}", arg=k)
    return {"sizes": tuple(int(v) for v in vals)}


def _grid_text(d, num) -> str:
    if d.boxes:
        return "grid(" + ", ".join(f"({num(a)}, {num(b)})" for a, b in d.boxes) + ")"
    return f"grid({num(d.lo)}, {num(d.hi)})"


def _uniform(d, n, rng) -> np.ndarray:
    boxes = d.boxes or ((d.lo, d.hi),)
    return np.stack([rng.uniform(a, b, size=n) for a, b in boxes], axis=-1)


def _lattice_sample(d, n, rng) -> np.ndarray:
    """n distinct, spread-out integer points (one column per axis)."""
    axes = d.dim or 1
    return np.stack([rng.permutation(4 * n + 16)[:n] for _ in range(axes)], -1).astype(float)


def _stencil_sample(d, n, rng) -> np.ndarray:
    return np.stack([rng.integers(-(k // 2), k // 2 + 1, size=n) for k in d.sizes],
                    -1).astype(float)


KINDS = [
    # scattered points in R^D, their coordinates passed by the call; the mean is their measure
    Kind(name="points", usage="points(D)", arity=(1,), default="mean", given=True, min_size=0,
         regular=False, measure=lambda d, n: 1.0 / n, declare=_points_declare,
         width=lambda d: d.dim, text=lambda d, num: f"points({d.dim})",
         sample=lambda d, n, rng: rng.normal(size=(n, d.dim))),
    # the n uniform points a, a + h, ..., b of an interval, the call passing n ≥ 2; or the
    # tensor product of such grids, one per box
    Kind(name="grid", usage="grid(a, b)", arity=(1, 2, 3), default="trapezoid", given=False,
         min_size=2, regular=True, points=_grid_points, spacing=_grid_spacing,
         declare=_grid_declare, text=_grid_text, sample=_uniform,
         split=lambda d: [{"lo": a, "hi": b, "boxes": ()} for a, b in d.boxes] if d.boxes
         else None, width=lambda d: len(d.boxes) if d.boxes else None,
         naxes=lambda d: len(d.boxes) if d.boxes else 1),
    # the integers 0, 1, ..., n − 1 (`index`), or the lattice of integer vectors of D axes
    # (`index(D)`); the sum is their measure
    Kind(name="index", usage="index(D)", arity=(0, 1), default="sum", given=False, min_size=0,
         regular=True, points=lambda d, n: np.arange(n, dtype=float),
         spacing=lambda d, n: 1.0, measure=lambda d, n: 1.0, declare=_index_declare,
         text=lambda d, num: "index" if d.dim is None else f"index({d.dim})",
         sample=_lattice_sample, split=lambda d: [{"dim": None}] * d.dim if d.dim else None,
         width=lambda d: d.dim, naxes=lambda d: d.dim or 1, integer=True),
    # the fixed integer offsets −(k − 1)/2 … (k − 1)/2 along each of 1 to 3 axes
    Kind(name="stencil", usage="stencil(k1, k2)", arity=(1, 2, 3), default="sum", given=False,
         min_size=1, regular=True,
         points=lambda d, n: np.arange(n, dtype=float) - (n - 1) / 2,
         spacing=lambda d, n: 1.0, declare=_stencil_declare,
         text=lambda d, num: "stencil(" + ", ".join(map(str, d.sizes)) + ")",
         sample=_stencil_sample,
         split=lambda d: [{"sizes": (k,)} for k in d.sizes] if len(d.sizes) > 1 else None,
         width=lambda d: len(d.sizes) if len(d.sizes) > 1 else None,
         fixed=lambda d: d.sizes, naxes=lambda d: len(d.sizes), integer=True),
]
