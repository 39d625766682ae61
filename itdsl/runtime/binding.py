"""Binding a call's keyword arguments to an operator's domains and inputs.

Every compiled form of an operator is called the same way: domains by name
(coordinates `[..., n, D]` for `points`, an `int` size for `grid`/`index`, a tuple
`(n1, n2)` for a domain of several axes, nothing for a stencil), input fields by name
(`[..., n, C]`, or `[..., n]` for `R`; a field on `V * P` with P = index(2) is
`[..., n_V, H, W, C]`). This module checks a call and says exactly what is wrong with
it: which input, what shape was expected and what was given.

The bound fields are flattened over their domains' axes, `[..., N, C]` with N the
product of the axes' sizes in row-major order: the layout every side of a Plan has.
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

    sizes: dict[str, int]  # domain -> number of points (the product of its axes' sizes)
    coords: dict[str, torch.Tensor]  # points domain -> [..., n, D]
    fields: dict[str, torch.Tensor]  # input -> [..., N, C] (a trailing 1 for scalar fields),
    #                                  flattened over the axes of its domains
    batch: torch.Size
    dtype: torch.dtype
    device: torch.device
    shapes: dict[str, torch.Size]  # every tensor argument's shape as given
    axes: dict[str, tuple[int, ...]] = None  # domain -> the sizes of its axes
    batched: frozenset[str] = frozenset()  # the arguments with batch entries (more than one)

    def __post_init__(self):
        if self.axes is None:
            self.axes = {name: (n,) for name, n in self.sizes.items()}

    def field_axes(self, op: ir.Operator, name: str) -> tuple[int, ...]:
        """The axes' sizes of the input `name` (its domains' axes, in order)."""
        return tuple(n for d in op.input(name).domains for n in self.axes[d])


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


def broadcast(*shapes) -> torch.Size:
    """torch.broadcast_shapes, without its slow Python path (tens of microseconds, several
    times per kernel call) for concrete sizes; torch's own while torch.compile traces
    (symbolic sizes guard) and for shapes that do not broadcast (its error)."""
    if torch.compiler.is_compiling():
        return torch.broadcast_shapes(*shapes)
    out: list[int] = []
    for s in shapes:
        if len(s) > len(out):
            out[:0] = [1] * (len(s) - len(out))
        k = len(out) - len(s)
        for i, d in enumerate(s):
            o = out[k + i]
            if d != o:
                if o == 1:
                    out[k + i] = d
                elif d != 1:
                    return torch.broadcast_shapes(*shapes)  # raises torch's error
    return torch.Size(out)


def used_coords(op: ir.Operator) -> set[str]:
    """Domains whose point coordinates the operator reads."""
    nodes = list(ir.walk(op.output.body))
    return {n.domain for n in nodes if isinstance(n, ir.Coord)}


@dataclass(frozen=True)
class Facts:
    """What `bind` reads from an operator's body: found by walking it once per operator
    (a module keeps them), not on every call."""

    coords: frozenset[str]  # domains whose coordinates the body reads
    ranged: tuple[str, ...]  # domains the output or an integral ranges over (sizes needed)
    rules: tuple[tuple[ir.Integral, ir.Bind, ir.Quad], ...]  # binders whose rule needs points

    @staticmethod
    def of(op: ir.Operator) -> Facts:
        integrals = [n for n in ir.walk(op.output.body) if isinstance(n, ir.Integral)]
        ranged = set(op.output.domains) | {b.domain for n in integrals
                                           for b, q in zip(n.vars, n.quads)
                                           if not q.rule.entry.own_nodes}
        return Facts(frozenset(used_coords(op)), tuple(sorted(ranged)),
                     tuple((n, b, q) for n in integrals for b, q in zip(n.vars, n.quads)
                           if q.rule.entry.empty is not None))


def axes_text(d: ir.Domain) -> str:
    """How a call passes the size of `d`: "24" or "(H, W)"."""
    k = d.naxes
    return "an int" if k == 1 else "a tuple of " + str(k) + " ints"


def _example(d: ir.Domain) -> str:
    k = d.naxes
    return f"`{d.name}=24`" if k == 1 else f"`{d.name}=({', '.join(['16'] * k)})`"


def input_text(i: ir.Input, op: ir.Operator) -> str:
    """The shape a call passes for input `i`: "[..., n, 3]", "[..., n_V, H0, H1]"."""
    axes = []
    for name in i.domains:
        d = op.domain(name)
        k = d.naxes
        axes += [f"n_{name}"] if k == 1 else [f"{name}{j}" for j in range(k)]
    if len(axes) == 1:
        axes = ["n"]
    return "[..., " + ", ".join(axes + ([] if i.width is None else [str(i.width)])) + "]"



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


def bind(op: ir.Operator, kwargs: dict, param_dtype: torch.dtype | None = None,
         facts: Facts | None = None) -> Bound:
    """The call's arguments checked against `op` (`facts`: `Facts.of(op)`, kept by a module)."""
    facts = facts or Facts.of(op)
    known = [d.name for d in op.domains] + [i.name for i in op.inputs]
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        takes = [d.name for d in op.domains if d.fixed is None] + [i.name for i in op.inputs]
        raise InputError(f"operator `{op.name}` got an unexpected argument `{unknown[0]}`; it "
                         f"takes {', '.join(f'`{k}`' for k in takes)}")
    sizes: dict[str, tuple[tuple[int, ...], str]] = {}  # domain -> (axes, where from)
    for d in op.domains:
        if d.fixed is not None:
            sizes[d.name] = (d.fixed, f"the declaration of `{d.name}`")

    def set_size(domain: str, n: tuple[int, ...], source: str, hint: str | None = None) -> None:
        if domain in sizes and sizes[domain][0] != n:
            have, src = sizes[domain]
            show = (lambda t: str(t[0]) if len(t) == 1 else str(t))  # noqa: E731
            raise InputError(f"{source} has {show(n)} points of `{domain}`, but {src} has "
                             f"{show(have)}", hint=hint)
        sizes.setdefault(domain, (n, source))

    tensors: list[tuple[str, torch.Tensor]] = []
    coords: dict[str, torch.Tensor] = {}
    batches: list[tuple[str, torch.Size]] = []
    need_coords = facts.coords
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
            set_size(d.name, (v.shape[-2],), f"`{d.name}`")
        elif d.fixed is not None:
            raise InputError(f"`{d.name}` is a stencil: its points are fixed by its "
                             "declaration, and a call passes nothing for it",
                             hint=f"drop `{d.name}=` from the call")
        else:
            k = d.naxes
            vals = v if isinstance(v, tuple) and k > 1 else (v,)
            if len(vals) != k or any([isinstance(x, torch.Tensor) or not isinstance(x, int)
                                     or isinstance(x, bool) for x in vals]):
                got = type(v).__name__ + (f" of {len(v)}" if isinstance(v, tuple) else "")
                article = "an" if d.kind.value[0] in "aeiou" else "a"
                raise InputError(f"`{d.name}` is {article} {d.kind.value} domain"
                                 + (f" of {k} axes" if k > 1 else "")
                                 + ": pass its number of points "
                                 + ("along each axis " if k > 1 else "")
                                 + f"as {axes_text(d)} ({_example(d)}), got {got}")
            least = d.kind.entry.min_size  # (an empty index, as an empty field)
            if any([x < least for x in vals]):
                raise InputError(f"`{d.name}` needs at least {least} points"
                                 + (" along each axis" if k > 1 else "") + f", got {v}")
            set_size(d.name, vals, f"`{d.name}={v}`")
    fields: dict[str, torch.Tensor] = {}
    for i in op.inputs:
        if i.name not in kwargs:
            raise InputError(f"operator `{op.name}` is missing the input `{i.name}` "
                             f"({i.domain} -> {'R' if i.width is None else f'R^{i.width}'})")
        v = kwargs[i.name]
        want = input_text(i, op)
        typ = f"{' * '.join(i.domains)} -> {'R' if i.width is None else f'R^{i.width}'}"
        if not isinstance(v, torch.Tensor):
            raise InputError(f"input `{i.name}` should be a tensor {want}, got {type(v).__name__}")
        _dense(f"input `{i.name}`", v)
        k = sum([op.domain(name).naxes for name in i.domains])  # point axes
        ok = v.dim() >= k + 1 and v.shape[-1] == i.width if i.width is not None else v.dim() >= k
        if not ok:
            raise InputError(f"input `{i.name}` should have shape {want} ({typ}), got "
                             f"{_shape(v)}")
        f = v if i.width is not None else v.unsqueeze(-1)
        tensors.append((i.name, v))
        batches.append((i.name, f.shape[:-k - 1]))
        hint = None
        if i.width is None and v.dim() >= 2 and v.shape[-1] == 1 and k == 1:
            hint = (f"`{i.name}` is a scalar field (R): pass it as [..., n], without a "
                    f"trailing 1 (`{i.name}.squeeze(-1)`), or declare it `R^1`")
        at = f.dim() - k - 1
        for name in i.domains:
            na = op.domain(name).naxes
            set_size(name, tuple(f.shape[at:at + na]), f"input `{i.name}`", hint)
            at += na
        n = math.prod(f.shape[f.dim() - k - 1:-1])
        fields[i.name] = f.reshape(*f.shape[:-k - 1], n, f.shape[-1]) if k > 1 else f
    for d in op.domains:
        if d.kind.entry.given and d.name in need_coords and d.name not in coords:
            raise InputError(f"operator `{op.name}` needs the coordinates of `{d.name}`: pass "
                             f"`{d.name}=` a tensor [..., n, {d.dim}]")
    # Every domain the output or an integral ranges over needs a size (not a rule with
    # nodes of its own, gauss: the integrand is evaluated at its nodes).
    for name in facts.ranged:
        if name not in sizes:
            d = op.domain(name)
            how = (f"`{name}=` its coordinates" if d.kind.entry.given
                   else f"its size, e.g. {_example(d)}")
            raise InputError(f"the number of points of `{name}` is unknown: no input lives on "
                             f"it; pass {how}")
    for name, (n, src) in sizes.items():
        d = op.domain(name)
        if min(n) < d.kind.entry.min_size:
            raise InputError(f"the {d.kind.value} `{name}` needs at least "
                             f"{d.kind.entry.min_size} points"
                             + (" along each axis" if len(n) > 1 else "")
                             + f", but {src} has {n[0] if len(n) == 1 else n}")
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
        batch = broadcast(*(b for _, b in batches)) if batches else torch.Size()
    except RuntimeError:
        shown = ", ".join(f"`{n}` {list(b)}" for n, b in batches)
        raise InputError(f"the leading (batch) dimensions do not broadcast: {shown}") from None
    axes = {k: v[0] for k, v in sizes.items()}
    counts = {k: math.prod(v) for k, v in axes.items()}
    _check_empty(facts, counts)
    for d in op.domains:  # sizes given as numbers: the points and the output are allocated
        if d.name in kwargs and not d.kind.entry.given:
            width = (op.output.width or 1) if d.name in op.output.domains else 1
            check_size(math.prod(batch) * counts[d.name] * width, dtype, device,
                       f"`{d.name}={kwargs[d.name]}`")
    out = math.prod([counts[name] for name in op.output.domains])  # (a list: dynamo traces it)
    check_size(math.prod(batch) * out * (op.output.width or 1), dtype, device,
               f"the output on {' * '.join(op.output.domains)}")
    return Bound(sizes=counts, coords=coords, fields=fields, batch=batch, dtype=dtype,
                 device=device, shapes={name: t.shape for name, t in tensors}, axes=axes,
                 batched=frozenset(name for name, b in batches if math.prod(b) > 1))


def _check_empty(facts: Facts, sizes: dict[str, int]) -> None:
    """An integral whose rule needs points (mean, montecarlo: `Rule.empty`) over a domain
    with none."""
    for n, b, q in facts.rules:
        if sizes.get(b.domain) == 0:
            raise InputError(f"`integral({b.var}: {b.domain})` with `{q.rule.value}` has no "
                             f"points of `{b.domain}`: {q.rule.entry.empty}",
                             q.span if q.explicit else n.span,
                             f"pass at least one point of `{b.domain}`, or integrate with "
                             "`sum` (0 over no points)")
