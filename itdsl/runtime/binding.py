"""Binding a call's keyword arguments to an operator's domains and inputs.

Every compiled form of an operator is called the same way: domains by name
(coordinates `[..., n, D]` for `points`, an `int` size for `grid`/`index`),
input fields by name (`[..., n, C]`, or `[..., n]` for `R`). This module checks
a call and says exactly what is wrong with it: which input, what shape was
expected and what was given.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..frontend import ir

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


def _dense(what: str, v: torch.Tensor) -> None:
    if v.layout != torch.strided:
        raise InputError(f"{what} is a {str(v.layout).removeprefix('torch.')} tensor; itdsl "
                         "takes dense (strided) tensors", hint="pass `t.to_dense()`")


def check_call(args: tuple, generator) -> None:
    """A call takes keywords only, and `generator` is a torch.Generator (or None)."""
    if args:
        raise InputError(f"operators take keyword arguments only, but this call has "
                         f"{len(args)} positional argument{'s' if len(args) > 1 else ''}",
                         hint="name every argument: `op(X=x, b=b)`")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InputError(f"`generator` must be a torch.Generator, got {type(generator).__name__}",
                         hint="pass `generator=torch.Generator().manual_seed(0)` for "
                              "reproducible montecarlo draws")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return None


PHYSICAL_MEMORY = _physical_memory()  # read once: torch.compile cannot trace os.sysconf


def memory_bytes(device: torch.device) -> int | None:
    """The memory of `device` (physical memory for the CPU), or None if unknown."""
    if device.type != "cuda":
        return PHYSICAL_MEMORY
    try:
        return torch.cuda.get_device_properties(device).total_memory
    except (AttributeError, RuntimeError):  # pragma: no cover
        return None


def check_size(elements: int, dtype: torch.dtype, device: torch.device, what: str,
               hint: str | None = None) -> None:
    """Fail clearly, before allocating, if `elements` values of `dtype` exceed the memory."""
    need = elements * dtype.itemsize
    have = memory_bytes(device)
    if have is not None and need > have:
        raise InputError(f"{what} needs {need / 2**30:,.1f} GiB, more than the "
                         f"{have / 2**30:,.1f} GiB of memory here", hint=hint)


def bind(op: ir.Operator, kwargs: dict, param_dtype: torch.dtype | None = None) -> Bound:
    known = [d.name for d in op.domains] + [i.name for i in op.inputs]
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        raise InputError(f"operator `{op.name}` got an unexpected argument `{unknown[0]}`; it "
                         f"takes {', '.join(f'`{k}`' for k in known)}")
    sizes: dict[str, tuple[int, str]] = {}  # domain -> (n, where it came from)

    def set_size(domain: str, n: int, source: str, hint: str | None = None) -> None:
        if domain in sizes and sizes[domain][0] != n:
            have, src = sizes[domain]
            raise InputError(f"{source} has {n} points of `{domain}`, but {src} has {have}",
                             hint=hint)
        sizes.setdefault(domain, (n, source))

    tensors: list[tuple[str, torch.Tensor]] = []
    coords: dict[str, torch.Tensor] = {}
    batches: list[tuple[str, torch.Size]] = []
    need_coords = used_coords(op)
    for d in op.domains:
        if d.name not in kwargs:
            continue
        v = kwargs[d.name]
        if d.kind.entry.given:
            if not isinstance(v, torch.Tensor):
                raise InputError(f"`{d.name}` takes the coordinates of the points as a tensor "
                                 f"[..., n, {d.dim}], got {type(v).__name__}")
            _dense(f"`{d.name}`", v)
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
            least = d.kind.entry.min_size  # (an empty index, as an empty field)
            if v < least:
                raise InputError(f"`{d.name}` needs at least {least} points, got {v}")
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
        _dense(f"input `{i.name}`", v)
        ok = v.dim() >= 2 and v.shape[-1] == i.width if i.width is not None else v.dim() >= 1
        if not ok:
            raise InputError(f"input `{i.name}` should have shape {want} ({i.domain} -> "
                             f"{'R' if i.width is None else f'R^{i.width}'}), got {_shape(v)}")
        f = v if i.width is not None else v.unsqueeze(-1)
        fields[i.name] = f
        tensors.append((i.name, v))
        batches.append((i.name, f.shape[:-2]))
        hint = None
        if i.width is None and v.dim() >= 2 and v.shape[-1] == 1:
            hint = (f"`{i.name}` is a scalar field (R): pass it as [..., n], without a "
                    f"trailing 1 (`{i.name}.squeeze(-1)`), or declare it `R^1`")
        set_size(i.domain, f.shape[-2], f"input `{i.name}`", hint)
    for d in op.domains:
        if d.kind.entry.given and d.name in need_coords and d.name not in coords:
            raise InputError(f"operator `{op.name}` needs the coordinates of `{d.name}`: pass "
                             f"`{d.name}=` a tensor [..., n, {d.dim}]")
    # Every domain the output or an integral ranges over needs a size (not a rule with
    # nodes of its own, gauss: the integrand is evaluated at its nodes).
    ranged = {op.output.domain} | {n.domain for n in ir.walk(op.output.body)
                                   if isinstance(n, ir.Integral)
                                   and not n.quad.rule.entry.own_nodes}
    for name in sorted(ranged):
        if name not in sizes:
            d = op.domain(name)
            how = (f"`{name}=` its coordinates" if d.kind.entry.given
                   else f"its size, e.g. `{name}=24`")
            raise InputError(f"the number of points of `{name}` is unknown: no input lives on "
                             f"it; pass {how}")
    for name, (n, src) in sizes.items():
        d = op.domain(name)
        if n < d.kind.entry.min_size:
            raise InputError(f"the {d.kind.value} `{name}` needs at least "
                             f"{d.kind.entry.min_size} points, but {src} has {n}")
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
    counts = {k: v[0] for k, v in sizes.items()}
    _check_empty(op, counts)
    for d in op.domains:  # sizes given as numbers: the points and the output are allocated
        if d.name in kwargs and not d.kind.entry.given:
            width = (op.output.width or 1) if d.name == op.output.domain else 1
            check_size(math.prod(batch) * counts[d.name] * width, dtype, device,
                       f"`{d.name}={counts[d.name]}`")
    return Bound(sizes=counts, coords=coords, fields=fields, batch=batch, dtype=dtype,
                 device=device, shapes={name: t.shape for name, t in tensors})


def _check_empty(op: ir.Operator, sizes: dict[str, int]) -> None:
    """An integral whose rule needs points (mean, montecarlo: `Rule.empty`) over a domain
    with none."""
    for n in ir.walk(op.output.body):
        if isinstance(n, ir.Integral) and sizes.get(n.domain) == 0 \
                and n.quad.rule.entry.empty is not None:
            raise InputError(f"`integral({n.var}: {n.domain})` with `{n.quad.rule.value}` has no "
                             f"points of `{n.domain}`: {n.quad.rule.entry.empty}",
                             n.quad.span if n.quad.explicit else n.span,
                             f"pass at least one point of `{n.domain}`, or integrate with "
                             "`sum` (0 over no points)")
