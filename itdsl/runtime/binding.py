"""Binding a call's keyword arguments to an operator's domains and inputs.

Every compiled form of an operator is called the same way: domains by name
(coordinates `[..., n, D]` for `points`, an `int` size for `grid`/`index`),
input fields by name (`[..., n, C]`, or `[..., n]` for `R`). This module checks
a call and says exactly what is wrong with it: which input, what shape was
expected and what was given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..frontend import ir
from ..frontend.ast import DomainKind

RESERVED_KEYWORDS = ("generator", "self")  # keywords of the modules' forward()
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclass
class Bound:
    """A checked call: tensors and sizes for every domain and input."""

    sizes: dict[str, int]  # domain -> number of points
    coords: dict[str, torch.Tensor]  # points domain -> [..., n, D]
    fields: dict[str, torch.Tensor]  # input -> [..., n, C] (a trailing 1 for scalar fields)
    batch: torch.Size
    dtype: torch.dtype
    device: torch.device
    shapes: dict[str, torch.Size]  # every tensor argument's shape as given


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


def used_coords(op: ir.Operator) -> set[str]:
    """Domains whose point coordinates the operator reads."""
    nodes = list(ir.walk(op.output.body))
    return {n.domain for n in nodes if isinstance(n, ir.Coord)}


def bind(op: ir.Operator, kwargs: dict, param_dtype: torch.dtype | None = None) -> Bound:
    known = [d.name for d in op.domains] + [i.name for i in op.inputs]
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        raise InputError(f"operator `{op.name}` got an unexpected argument `{unknown[0]}`; it "
                         f"takes {', '.join(f'`{k}`' for k in known)}")
    sizes: dict[str, tuple[int, str]] = {}  # domain -> (n, where it came from)

    def set_size(domain: str, n: int, source: str) -> None:
        if domain in sizes and sizes[domain][0] != n:
            have, src = sizes[domain]
            raise InputError(f"{source} has {n} points of `{domain}`, but {src} has {have}")
        sizes.setdefault(domain, (n, source))

    tensors: list[tuple[str, torch.Tensor]] = []
    coords: dict[str, torch.Tensor] = {}
    batches: list[tuple[str, torch.Size]] = []
    need_coords = used_coords(op)
    for d in op.domains:
        if d.name not in kwargs:
            continue
        v = kwargs[d.name]
        if d.kind is DomainKind.POINTS:
            if not isinstance(v, torch.Tensor):
                raise InputError(f"`{d.name}` takes the coordinates of the points as a tensor "
                                 f"[..., n, {d.dim}], got {type(v).__name__}")
            if v.dim() < 2 or v.shape[-1] != d.dim:
                raise InputError(f"`{d.name}` should have shape [..., n, {d.dim}] (points in "
                                 f"R^{d.dim}), got {_shape(v)}")
            coords[d.name] = v
            tensors.append((d.name, v))
            batches.append((d.name, v.shape[:-2]))
            set_size(d.name, v.shape[-2], f"`{d.name}`")
        else:
            if isinstance(v, torch.Tensor) or not isinstance(v, int) or isinstance(v, bool):
                raise InputError(f"`{d.name}` is a {d.kind.value} domain: pass its number of "
                                 f"points as an int (`{d.name}=24`), got {type(v).__name__}")
            if v < (2 if d.kind is DomainKind.GRID else 1):
                raise InputError(f"`{d.name}` needs at least "
                                 f"{2 if d.kind is DomainKind.GRID else 1} points, got {v}")
            set_size(d.name, v, f"`{d.name}={v}`")
    fields: dict[str, torch.Tensor] = {}
    for i in op.inputs:
        if i.name not in kwargs:
            raise InputError(f"operator `{op.name}` is missing the input `{i.name}` "
                             f"({i.domain} -> {'R' if i.width is None else f'R^{i.width}'})")
        v = kwargs[i.name]
        want = f"[..., n, {i.width}]" if i.width is not None else "[..., n]"
        if not isinstance(v, torch.Tensor):
            raise InputError(f"input `{i.name}` should be a tensor {want}, got {type(v).__name__}")
        ok = v.dim() >= 2 and v.shape[-1] == i.width if i.width is not None else v.dim() >= 1
        if not ok:
            raise InputError(f"input `{i.name}` should have shape {want} ({i.domain} -> "
                             f"{'R' if i.width is None else f'R^{i.width}'}), got {_shape(v)}")
        f = v if i.width is not None else v.unsqueeze(-1)
        fields[i.name] = f
        tensors.append((i.name, v))
        batches.append((i.name, f.shape[:-2]))
        set_size(i.domain, f.shape[-2], f"input `{i.name}`")
    for d in op.domains:
        if d.kind is DomainKind.POINTS and d.name in need_coords and d.name not in coords:
            raise InputError(f"operator `{op.name}` needs the coordinates of `{d.name}`: pass "
                             f"`{d.name}=` a tensor [..., n, {d.dim}]")
    # Every domain the output or an integral ranges over needs a size (gauss has its nodes).
    ranged = {op.output.domain} | {n.domain for n in ir.walk(op.output.body)
                                   if isinstance(n, ir.Integral)
                                   and n.quad.rule is not ir.QuadRule.GAUSS}
    for name in sorted(ranged):
        if name not in sizes:
            d = op.domain(name)
            how = (f"`{name}=` its coordinates" if d.kind is DomainKind.POINTS
                   else f"its size, e.g. `{name}=24`")
            raise InputError(f"the number of points of `{name}` is unknown: no input lives on "
                             f"it; pass {how}")
    for name, (n, src) in sizes.items():
        d = op.domain(name)
        if d.kind is DomainKind.GRID and n < 2:
            raise InputError(f"the grid `{name}` needs at least 2 points, but {src} has {n}")
    # dtype and device: one for all tensors
    dtype = device = None
    for name, t in tensors:
        if t.dtype not in FLOAT_DTYPES:
            raise InputError(f"`{name}` has dtype {t.dtype}; itdsl operators take floating "
                             "tensors (float32 or float64)")
        if dtype is None:
            dtype, device, first = t.dtype, t.device, name
        elif t.dtype != dtype:
            raise InputError(f"`{name}` has dtype {t.dtype} but `{first}` has {dtype}; pass all "
                             "tensors in one dtype")
        elif t.device != device:
            raise InputError(f"`{name}` is on {t.device} but `{first}` is on {device}")
    if dtype is None:
        dtype, device = param_dtype or torch.get_default_dtype(), torch.device("cpu")
    try:
        batch = torch.broadcast_shapes(*(b for _, b in batches)) if batches else torch.Size()
    except RuntimeError:
        shown = ", ".join(f"`{n}` {list(b)}" for n, b in batches)
        raise InputError(f"the leading (batch) dimensions do not broadcast: {shown}") from None
    return Bound(sizes={k: v[0] for k, v in sizes.items()}, coords=coords, fields=fields,
                 batch=batch, dtype=dtype, device=device,
                 shapes={name: t.shape for name, t in tensors})
