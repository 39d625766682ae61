"""Random inputs for a checked operator: sizes (1, 0 now and then, n != m), leading batch
dims that broadcast (an empty batch now and then), non-contiguous layouts and, now and then,
special values (NaN, +-inf, 1e30, +-80) in coordinates or fields. Drawn from the program's
seed, so a failure replays from its seed; a corpus file's header can pin any of the draws.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

SPECIALS = (math.nan, math.inf, -math.inf, 1e30, -1e30, 80.0, -80.0)
SIZES = (1, 1, 2, 2, 3, 3, 4, 5, 7)
EMPTY = 0.04  # how often a domain whose size a tensor carries has no points; a batch dim 0
BATCHES = ((), (), (), (), (2,), (3,), (2, 3), (1,))


@dataclass
class TensorArg:
    """One tensor argument: float64 values, shown to the call in some memory layout."""

    values: torch.Tensor  # contiguous, the shape the call sees
    layout: str = "contiguous"  # or "transposed" (last two dims), "strided" (every 2nd)

    def make(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(leaf, view): a fresh leaf that requires grad, and the view the call gets."""
        v = self.values.to(dtype)
        if self.layout == "transposed":
            leaf = v.transpose(-1, -2).contiguous().requires_grad_(True)
            return leaf, leaf.transpose(-1, -2)
        if self.layout == "strided":
            leaf = torch.stack([v, torch.zeros_like(v)], -1).flatten(-2).requires_grad_(True)
            return leaf, leaf[..., ::2]
        leaf = v.clone().requires_grad_(True)
        return leaf, leaf


@dataclass
class Inputs:
    """The keyword arguments of one call (and what is unusual about them)."""

    ints: dict[str, int]
    tensors: dict[str, TensorArg]
    special: bool  # holds NaN, inf or huge values
    empty: bool  # a domain or the batch has no points

    def call(self, dtype: torch.dtype) -> tuple[dict, dict[str, torch.Tensor]]:
        """Keyword arguments in `dtype`, and the tensors among them (views of fresh leaves,
        which gradients are taken with respect to)."""
        views = {name: t.make(dtype)[1] for name, t in self.tensors.items()}
        return {**self.ints, **views}, views

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.ints.items()]  # (a tuple for several axes)
        for k, t in self.tensors.items():
            bad = (~torch.isfinite(t.values)).sum().item() + (t.values.abs() >= 80).sum().item()
            parts.append(f"{k}{list(t.values.shape)}" + (f" {t.layout}" if t.layout !=
                                                          "contiguous" else "")
                         + (" +special" if bad else ""))
        return ", ".join(parts)


def make_inputs(op, seed: int, options: dict[str, str] | None = None) -> Inputs:
    """Random inputs for the checked operator `op` (an `ir.Operator`), drawn from `seed`.
    `options` (from a corpus file's header) fix some draws: `sizes=X:0,Y:3`, `batch=2x3`
    (or `none`), `special=none`, `layout=contiguous`."""
    options = options or {}
    r = random.Random(f"inputs:{seed}")
    gen = torch.Generator().manual_seed(seed)
    carried = {name for i in op.inputs for name in i.domains} | {
        d.name for d in op.domains if d.kind.value == "points"}

    def draw(d) -> tuple[int, ...]:  # the sizes of the axes of d (a stencil's are fixed)
        if d.fixed is not None:
            return d.fixed
        first = 0 if d.name in carried and r.random() < EMPTY else r.choice(SIZES)
        return (first, *(r.choice(SIZES) for _ in d.axes[1:]))

    sizes = {d.name: draw(d) for d in op.domains}
    for d in op.domains:
        if d.kind.value == "grid" and r.random() < 0.95:
            sizes[d.name] = tuple(max(n, 2) for n in sizes[d.name])
    sizes.update(_pairs(options.get("sizes", "")))
    batch = r.choice(BATCHES) if r.random() > EMPTY else (0,)
    if "batch" in options:
        batch = () if options["batch"] == "none" else tuple(
            int(b) for b in options["batch"].split("x"))
    tensors, ints = {}, {}
    for d in op.domains:
        if d.kind.value == "points":
            shape = (*_batch_of(r, batch), sizes[d.name][0], d.dim)
            tensors[d.name] = TensorArg(torch.rand(shape, generator=gen, dtype=torch.float64)
                                        * 2 - 1)
        elif d.fixed is None and (d.name not in carried or r.random() < 0.1):
            ints[d.name] = sizes[d.name][0] if len(d.axes) == 1 else sizes[d.name]
    for i in op.inputs:
        axes = tuple(n for name in i.domains for n in sizes[name])
        shape = (*_batch_of(r, batch), *axes, *(() if i.width is None else (i.width,)))
        tensors[i.name] = TensorArg(torch.randn(shape, generator=gen, dtype=torch.float64))
    special = options.get("special") != "none" and r.random() < 0.12
    if special:
        for name in r.sample(sorted(tensors), min(len(tensors), r.choice((1, 1, 2)))):
            t = tensors[name].values.view(-1)
            for _ in range(r.choice((1, 1, 2))):
                if t.numel():
                    t[r.randrange(t.numel())] = r.choice(SPECIALS)
    for name, at, value in _settings(options.get("set", "")):  # `set=q@0=nan,k@3=1e30`
        tensors[name].values.view(-1)[at] = value
        special = True
    for t in tensors.values():
        if options.get("layout") != "contiguous" and r.random() < 0.15:
            t.layout = "transposed" if t.values.dim() >= 2 and r.random() < 0.5 else "strided"
    empty = 0 in batch or any(0 in sizes[d] for d in carried)
    return Inputs(ints, tensors, special, empty)


def _batch_of(r: random.Random, batch: tuple[int, ...]) -> tuple[int, ...]:
    """The batch dims of one tensor: all of `batch`, a suffix, or with some dims 1."""
    how = r.random()
    if how < 0.5:
        return batch
    if how < 0.75:
        return batch[r.randint(0, len(batch)):]
    return tuple(1 if r.random() < 0.5 else b for b in batch)


def _pairs(text: str) -> dict[str, tuple[int, ...]]:
    """`X:0,L:3x4` -> {"X": (0,), "L": (3, 4)}."""
    return {k: tuple(int(n) for n in v.split("x"))
            for k, v in (p.split(":") for p in text.split(",") if p)}


def _settings(text: str) -> list[tuple[str, int, float]]:
    out = []
    for part in filter(None, text.split(",")):
        target, value = part.split("=")
        name, at = target.split("@")
        out.append((name, int(at), float(value)))
    return out
