"""The points, quadrature weights and Monte Carlo draws of an integral's side, as tensors.

Written once for every torch path (the reference, the Plan evaluator and through it the
compiled operators and the strategies), so that they see the same nodes and weights and
consume a call's generator identically by construction. What each domain kind and rule
is comes from `itdsl.domains`; this module only turns it into tensors and draws.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..frontend import ir
from .binding import Bound


@dataclass
class Points:
    """The points one side of a Plan (or one integral of the reference) runs over."""

    n: int
    coords: torch.Tensor | None  # [*B?, n, D]; None: a points domain whose coordinates the
    #                              call did not give (the operator does not read them)
    weights: torch.Tensor | None  # [*B?, n]; None: the output's side, or drawn (`draw`)


def _tensor(x, bound: Bound) -> torch.Tensor:
    return torch.as_tensor(x, dtype=bound.dtype, device=bound.device)


def side_points(d: ir.Domain, quad: ir.Quad | None, bound: Bound) -> Points:
    """The points of domain `d` an integral with `quad` runs over (`quad` None: the output's
    points), with its weights unless they are drawn (`quad.rule.entry.sampled`). A domain of
    several axes is the product of its axes, flattened row-major: a point's coordinate is
    the vector of its axes' coordinates, its weight the product of the axes' weights."""
    rule = None if quad is None else quad.rule.entry
    if rule is not None and rule.own_nodes:
        k = d.naxes
        nodes, w = _fixed(d, quad, (quad.n,) * k, bound.dtype, bound.device)
        return Points(quad.n ** k, nodes, w)
    n = bound.sizes[d.name]
    kind = d.kind.entry
    axes = bound.axes[d.name]
    if kind.given:
        coords = bound.coords.get(d.name)
        coords = None if coords is None else coords.to(bound.dtype)
    else:
        coords = _fixed(d, None, axes, bound.dtype, bound.device)[0]
    if rule is None or rule.sampled:
        weights = None
    elif rule.from_input:
        weights = bound.fields[quad.weights][..., 0]
    else:
        weights = _fixed(d, quad, axes, bound.dtype, bound.device)[1]
    return Points(n, coords, weights)


def _fixed(*args) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`_made(*args)`, kept per arguments (torch.compile traces the function itself: its
    graph holds the values)."""
    return (_made.__wrapped__ if torch.compiler.is_compiling() else _made)(*args)


@functools.lru_cache(maxsize=256)
def _made(d: ir.Domain, quad: ir.Quad | None, axes: tuple[int, ...], dtype: torch.dtype,
           device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(coordinates `[n, k]`, weights `[n]`) that depend on the declaration and the sizes of
    its k axes only: a rule's own nodes, a grid's or an index's points, fixed weights (the
    tensor products of the axes'); made once per size, dtype and device (read only: no
    caller writes into them)."""
    def tensor(x):
        return torch.as_tensor(x, dtype=dtype, device=device)
    rule = None if quad is None else quad.rule.entry
    kind = d.kind.entry
    coords, weights = [], []
    for axis, n in zip(d.axes, axes):
        if rule is not None and rule.own_nodes:
            c, w = rule.nodes(axis, n)
        else:
            c = None if kind.given else kind.points(axis, n)
            w = rule.weights(axis, n) if rule is not None and rule.weights else None
        coords.append(c)
        weights.append(w)
    if coords[0] is None:
        c = None
    elif len(coords) == 1:
        c = tensor(coords[0]).reshape(-1, 1)
    else:
        grids = torch.meshgrid(*[tensor(x) for x in coords], indexing="ij")
        c = torch.stack([g.reshape(-1) for g in grids], dim=-1)
    if weights[0] is None:
        w = None
    else:
        w = tensor(weights[0])
        for x in weights[1:]:
            w = torch.outer(w, tensor(x)).reshape(-1)
    return c, w


def draw(quad: ir.Quad, d: ir.Domain, m: int, importance: Callable[[], torch.Tensor] | None,
         generator: torch.Generator | None, bound: Bound) -> torch.Tensor:
    """Montecarlo weights `mu_j count_j / (S p_j)` `[*B?, m]` of S indices drawn with
    replacement from the m points of `d`, uniformly or with p_j ∝ `importance()` (a tensor
    `[*B?, m]`, evaluated without gradients), `mu` the domain's measure (1/m on `points`,
    whose default rule is `mean`; 1 on `index`): an unbiased estimate of what the default
    rule computes (docs/language.md)."""
    S, dev, dt = quad.samples, bound.device, bound.dtype
    if quad.importance is None:
        idx = torch.randint(m, (S,), generator=generator, device=dev)
        w = torch.bincount(idx, minlength=m).to(dt) * (m / S)  # count_j / (S p_j), p_j = 1/m
    else:
        with torch.no_grad():
            imp = importance()
        lead = imp.shape[:-1]
        p = imp.reshape(-1, m)
        if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
            raise InputError(f"the importance of an integral over `{d.name}` must be finite "
                             "and >= 0 at every point", quad.span)
        total = p.sum(-1, keepdim=True)
        if bool((total <= 0).any()):
            raise InputError(f"the importance of an integral over `{d.name}` is 0 at every "
                             "point: nothing can be sampled", quad.span)
        p = p / total
        idx = torch.multinomial(p, S, replacement=True, generator=generator)
        counts = torch.zeros_like(p).scatter_add_(-1, idx, torch.ones_like(idx, dtype=dt))
        w = torch.where(counts > 0, counts / (S * p.clamp_min(torch.finfo(dt).tiny)),
                        torch.zeros_like(p)).reshape(*lead, m)
    return w * d.kind.entry.measure(d, m)


def compact(op: ir.Operator, domain: str, kwargs: dict, weights: torch.Tensor
            ) -> tuple[dict, torch.Tensor] | None:
    """A Monte Carlo side over the points domain `domain` with its drawn `weights` `[*B?, m]`
    (0 at the points not drawn) reduced to the points drawn: the call's arguments with the
    coordinates of `domain` and every field on it gathered there (torch indexing, so autograd
    scatters their gradients back), and the weights there, `[*B?, k]` with k ≤ S (rows with
    fewer distinct draws padded with weight 0). So the kernels do n·S pairs of work, not n·m.
    None where this cannot be done: the domain's coordinates are not given, or a field lives
    on it and another domain (the caller checked no other side ranges over the domain)."""
    d = op.domain(domain)
    coords = kwargs.get(domain)
    on = [i for i in op.inputs if domain in i.domains]
    if not d.kind.entry.given or not torch.is_tensor(coords) or \
            any(i.domains != (domain,) for i in on):
        return None
    m = weights.shape[-1]
    drawn = weights != 0
    k = max(int(drawn.sum(-1).max()), 1) if weights.numel() else 1
    # the drawn points first in each row, in index order (a stable sort of "not drawn"); a
    # row with fewer than k is padded with its first drawn point at weight 0 (a point not
    # drawn may hold a NaN that a strategy's GEMM would spread)
    idx = torch.sort((~drawn).to(torch.uint8), dim=-1, stable=True).indices[..., :k]
    pad = ~torch.gather(drawn, -1, idx)
    idx = torch.where(pad, idx[..., :1], idx)
    new = dict(kwargs)

    def gather(t: torch.Tensor, axis: int) -> torch.Tensor:
        """`t` at the drawn points along `axis` (its axis of m points, counted from the
        end), its leading dims broadcast against the draws'."""
        tail = t.shape[len(t.shape) + axis + 1:]
        lead = torch.broadcast_shapes(t.shape[:len(t.shape) + axis], idx.shape[:-1])
        i = idx.reshape(*idx.shape[:-1], k, *(1,) * len(tail))
        return torch.gather(t.expand(*lead, m, *tail), len(lead),
                            i.expand(*lead, k, *tail))

    new[domain] = gather(coords, -2)
    for inp in on:
        if inp.name in kwargs:
            new[inp.name] = gather(kwargs[inp.name], -1 if inp.width is None else -2)
    return new, torch.gather(weights, -1, idx).masked_fill(pad, 0.0)
