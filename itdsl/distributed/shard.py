"""`shard`: an operator whose integration domain is split across the ranks of a process group.

What we chose, and why. A rank owns a contiguous slice of the sharded domain Y (its points,
the fields on it) and its own output points. Each call all-gathers Y's slices, padded to the
largest (gloo cannot gather unequal sizes), and runs the operator on the rank's output points
against the whole of Y; the backward all-reduces the gradients of the gathered tensors (a sum,
not scaled by the world size) and hands each rank its slice. So:

- every quadrature is the global one (a `mean` divides by the global size, `trapezoid` and
  `simpson` weight the global ends, a grid's points are where they are on the whole grid,
  an index's positions are global), because the operator sees the whole of Y;
- every normalised ratio is exact (the running max, denominator and numerator are the
  operator's own, over all of Y), and so is any output built from integrals over Y;
- every strategy that runs the operator on a call runs here unchanged (dense kernels, low
  rank, attention): nothing is recombined, so nothing is approximated;
- Monte Carlo draws come from a seed drawn on rank 0 and broadcast: every rank draws the same
  points of Y;
- the pairs are split: rank r evaluates |X_r| × |Y| of them, 1/W of the work when the output
  points are split evenly;
- memory: O(|Y|) per rank for the gathered coordinates and fields (and their gradients), not
  O(|Y|/W) as a ring that passes Y's blocks from rank to rank would give. A ring recombines
  partial integrals, which only a sum (or a softmax ratio, by its max and denominator) of
  integrals over Y allows; the gather is exact for every operator the language accepts. No
  pair tensor is formed on any path but the reference's.

What is refused: sharding a domain the output ranges over (each rank would need the whole
output's domain; a recurrence across slices would need the state carried between ranks), a
domain of several axes, a stencil, and a domain integrated only by rules with nodes of their
own (`gauss(n)`, `midpoint(n)`).
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InputError, ItdslError, UnsupportedError
from ..frontend import ir

# the per-call exchange: one int64 row per rank
_OK, _SIZE, _GIVEN, _GRAD, _SHAPES = range(5)


def _operator_ir(op: nn.Module) -> ir.Operator:
    code = getattr(op, "ir", None)
    if not isinstance(code, ir.Operator):
        raise InputError(f"itdsl.distributed.shard takes an itdsl operator module (`prog[name]` "
                         f"of a compiled program), not {type(op).__name__}")
    return code


def _layout(code: ir.Operator, over: str) -> list[tuple[str, int]]:
    """The call's arguments that live on `over`, each with the position of its axis counted
    from the end: its coordinates `[..., n, D]` (a points domain) and every field on it."""
    out = [(over, -2)] if code.domain(over).kind.entry.given else []
    for i in code.inputs:
        if over not in i.domains:
            continue
        if i.domains.count(over) > 1:
            raise UnsupportedError(f"input `{i.name}` of `{code.name}` lives on `{over}` twice "
                                   f"({' * '.join(i.domains)}); a sharded domain's fields "
                                   "have one axis on it")
        after = i.domains[i.domains.index(over) + 1:]
        trailing = sum(code.domain(d).naxes for d in after) + (i.width is not None)
        out.append((i.name, -1 - trailing))
    return out


def _check_shardable(code: ir.Operator, over: str) -> None:
    names = [d.name for d in code.domains]
    if over not in names:
        from ..errors import did_you_mean
        raise InputError(f"operator `{code.name}` has no domain `{over}`; its domains are "
                         + ", ".join(f"`{n}`" for n in names), hint=did_you_mean(over, names))
    d = code.domain(over)
    integrals = [n for n in ir.walk(code.output.body) if isinstance(n, ir.Integral)]
    rules = [q.rule for n in integrals for b, q in zip(n.vars, n.quads) if b.domain == over]
    if not rules:
        raise InputError(f"no integral of `{code.name}` ranges over `{over}`; shard the domain "
                         "an integral sums over")
    if over in code.output.domains:
        raise UnsupportedError(
            f"the output `{code.output.name}` of `{code.name}` ranges over `{over}`, the domain "
            "to shard: a rank's output points would be its slice of it while the integral runs "
            "over all of it (and a recurrence along it would need the state carried from rank "
            "to rank, which itdsl does not do)",
            hint=f"declare the output's points as a domain of their own (e.g. `domain Q` for "
                 f"the queries, `{over}` for the keys) and pass each rank's slice as both")
    if d.fixed is not None:
        raise UnsupportedError(f"`{over}` is a {d.kind.entry.name}: its points are fixed by the "
                               "declaration, there is nothing to split across ranks")
    if d.naxes != 1:
        raise UnsupportedError(f"`{over}` has {d.naxes} axes; itdsl shards a domain of one axis",
                               hint="declare the axis to split as a domain of its own")
    if all(r.entry.own_nodes for r in rules):
        raise UnsupportedError(f"the integrals of `{code.name}` over `{over}` use "
                               f"`{rules[0].entry.name}`, whose nodes are its own, not points "
                               "a rank could hold a slice of")


def _sampled(code: ir.Operator) -> bool:
    """Whether a call draws Monte Carlo points (and so needs the same draws on every rank)."""
    return any(q.rule.entry.sampled for n in ir.walk(code.output.body)
               if isinstance(n, ir.Integral) for q in n.quads)


class _Gather(torch.autograd.Function):
    """The ranks' slices of each tensor along its sharded axis, concatenated in rank order;
    its backward sums the gradients over the ranks and returns each rank its slice."""

    @staticmethod
    def forward(ctx, group, sizes: list[int], dims: list[int], *tensors):
        rank = dist.get_rank(group)
        ctx.group, ctx.dims, ctx.sizes = group, dims, sizes
        ctx.offset, ctx.n = sum(sizes[:rank]), sizes[rank]
        m = max(sizes)
        outs = []
        for t, dim in zip(tensors, dims, strict=True):
            if m == 0:  # (every slice empty: nothing to exchange)
                outs.append(t.detach().clone())
                continue
            if t.shape[dim] < m:
                pad = list(t.shape)
                pad[dim] = m - t.shape[dim]
                t = torch.cat([t, t.new_zeros(pad)], dim)
            t = t.contiguous()
            bufs = [torch.empty_like(t) for _ in sizes]
            dist.all_gather(bufs, t, group=group)
            outs.append(torch.cat([b.narrow(dim, 0, n) for b, n in zip(bufs, sizes)], dim))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        out = []
        for k, (g, dim) in enumerate(zip(grads, ctx.dims, strict=True)):
            # (the same on every rank: `shard` made the need for a gradient global)
            if not ctx.needs_input_grad[3 + k]:
                out.append(None)
                continue
            g = g.contiguous().clone()
            if max(ctx.sizes) > 0:
                dist.all_reduce(g, group=ctx.group)  # a sum over the ranks' outputs
            out.append(g.narrow(dim, ctx.offset, ctx.n))
        return (None, None, None, *out)


def _fingerprint(items: list[tuple[torch.Tensor, int]]) -> int:
    """The shapes (the sharded axis left out) and dtypes of the gathered tensors, as an int63:
    every rank must pass the same."""
    text = ";".join(f"{t.dtype}:{[s if a != t.dim() + dim else -1 for a, s in enumerate(t.shape)]}"
                    for t, dim in items)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


class ShardedOperator(nn.Module):
    """An itdsl operator whose domain `over` is split across the ranks of `group`; see
    `shard`. Its params are the operator's (`self.op`), one copy per rank."""

    def __init__(self, op: nn.Module, over: str, group=None):
        super().__init__()
        code = _operator_ir(op)
        _check_shardable(code, over)
        self.op, self.over, self.group = op, over, group
        self.ir = code
        self._layout = _layout(code, over)
        self._sampled = _sampled(code)

    def extra_repr(self) -> str:
        return f"over={self.over}"

    def _device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _local(self, kwargs: dict) -> tuple[int, list[str]]:
        """This rank's slice size, and the names of the tensors on the sharded domain it passes
        (raises on an inconsistent call)."""
        sizes = {}
        given = [n for n, _ in self._layout if n in kwargs]
        for name, dim in self._layout:
            if name not in kwargs:
                continue
            t = kwargs[name]
            if not isinstance(t, torch.Tensor):
                raise InputError(f"`{name}` is a tensor, got {type(t).__name__}")
            if t.dim() < -dim:
                raise InputError(f"`{name}` has {t.dim()} dims; it needs at least {-dim} "
                                 f"(its axis on `{self.over}` is dim {dim})")
            sizes[name] = t.shape[dim]
        n = kwargs.get(self.over)
        if isinstance(n, int) and not isinstance(n, bool):
            sizes[self.over] = n
        elif n is not None and self.over not in dict(self._layout):
            raise InputError(f"`{self.over}` is given by its size, an int; got "
                             f"{type(n).__name__}")
        if not sizes:
            raise InputError(f"this rank passed nothing on `{self.over}`",
                             hint=f"pass its slice of `{self.over}`: the fields on it"
                                  + (", its coordinates" if self._layout and
                                     self._layout[0][0] == self.over else ", or its size"))
        if len(set(sizes.values())) > 1:
            raise InputError(f"this rank's slice of `{self.over}` has different sizes in "
                             + ", ".join(f"`{k}` ({v})" for k, v in sizes.items()),
                             hint="every tensor on the sharded domain holds the same slice")
        return next(iter(sizes.values())), given

    def _exchange(self, kwargs: dict) -> tuple[list[int], list[str], list[bool]]:
        """Every rank's slice size, the gathered names, and whether each needs a gradient
        anywhere; one all-gather. An error on one rank is raised on every rank (so none waits
        in a collective the failing one never reaches)."""
        world = dist.get_world_size(self.group)
        row = torch.zeros(5, dtype=torch.int64)
        error = None
        try:
            n, given = self._local(kwargs)
            items = [(kwargs[g], dict(self._layout)[g]) for g in given]
            row[_OK], row[_SIZE] = 1, n
            row[_GIVEN] = sum(1 << k for k, (name, _) in enumerate(self._layout)
                              if name in given)
            row[_GRAD] = sum(1 << k for k, (t, _) in enumerate(items) if t.requires_grad)
            row[_SHAPES] = _fingerprint(items)
        except ItdslError as e:
            error = e
        rows = [torch.zeros_like(row, device=self._device()) for _ in range(world)]
        dist.all_gather(rows, row.to(self._device()), group=self.group)
        rows = torch.stack(rows).cpu()
        if error is not None:
            raise error
        bad = [j for j in range(world) if not rows[j, _OK]]
        if bad:
            raise InputError(f"rank {bad[0]} of {world} could not make this call of the "
                             f"sharded `{self.ir.name}` (its error is raised there)")
        for col, what in ((_GIVEN, "which arguments on the sharded domain they pass"),
                          (_SHAPES, "the shapes (besides the sharded axis) or dtypes of the "
                                    "arguments on it")):
            differ = [j for j in range(world) if rows[j, col] != rows[0, col]]
            if differ:
                raise InputError(f"ranks 0 and {differ[0]} differ in {what}, calling the "
                                 f"sharded `{self.ir.name}` over `{self.over}`",
                                 hint="every rank passes the same arguments, each with its "
                                      "slice of the sharded domain")
        grads = 0
        for g in rows[:, _GRAD].tolist():
            grads |= g
        return rows[:, _SIZE].tolist(), given, [bool(grads >> k & 1) for k in range(len(given))]

    def _generator(self, generator: torch.Generator | None) -> torch.Generator:
        """A generator seeded alike on every rank: the seed drawn on rank 0 (from `generator`,
        or torch's default there) and broadcast."""
        seed = torch.zeros(1, dtype=torch.int64)
        if dist.get_rank(self.group) == 0:
            seed[0] = draw_seed(generator)
        seed = seed.to(self._device())
        dist.broadcast(seed, src=dist.get_global_rank(self.group or dist.group.WORLD, 0),
                       group=self.group)
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.Generator(device=device).manual_seed(int(seed.item()))

    def forward(self, *args, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
        if args:
            raise InputError("call a sharded operator with keyword arguments, as the operator "
                             "itself", hint=f"e.g. `sop({self.over}=...)`")
        if not (dist.is_available() and dist.is_initialized()):
            raise InputError("torch.distributed is not initialised",
                             hint='call torch.distributed.init_process_group("gloo") first '
                                  "(torchrun sets the rank and world size in the environment)")
        sizes, given, need = self._exchange(kwargs)
        dims = [dict(self._layout)[g] for g in given]
        tensors = []
        for name, want in zip(given, need):
            t = kwargs[name]
            if want and not t.requires_grad:  # (another rank needs this gradient: take part)
                t = t.detach().requires_grad_()
            tensors.append(t)
        call = dict(kwargs)
        call.update(zip(given, _Gather.apply(self.group, sizes, dims, *tensors)))
        if self.over in kwargs and not isinstance(kwargs[self.over], torch.Tensor):
            call[self.over] = sum(sizes)
        if self._sampled:
            generator = self._generator(generator)
        return self.op(**call, generator=generator)


def draw_seed(generator: torch.Generator | None) -> int:
    """The seed rank 0 draws for a call's Monte Carlo points (every rank's generator is seeded
    with it): one process reproduces a sharded call with
    `op(..., generator=torch.Generator().manual_seed(draw_seed(g)))`."""
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator).item())


def shard(op: nn.Module, over: str, group=None) -> ShardedOperator:
    """The operator `op` (an itdsl operator module) with its domain `over` split across the
    ranks of `group` (torch.distributed's default group unless given).

    Each rank calls the result as it would call `op`, passing its own output points and its
    contiguous slice of `over` (its coordinates, every field on it, or its size as an int),
    the slices in rank order; they may be uneven or empty. It returns, at the rank's output
    points, the integral over the whole of `over`. With the total loss the sum of the ranks'
    losses, the gradients of every tensor are exact (a slice of `over` gets the contributions
    of every rank's outputs), and each rank's param gradients are its share of the total's:
    `all_reduce_grads` sums them (DDP averages them). Every rank must make the same calls, and
    call backward through them, in the same order — as with any collective. The cost, and why
    the slices are gathered: see this module's docstring."""
    return ShardedOperator(op, over, group)


def all_reduce_grads(module: nn.Module, group=None, average: bool = False) -> None:
    """Sum the gradients of `module`'s params over the ranks of `group` (their mean with
    `average`), in one collective: after it every rank holds the gradient of the total loss.
    A param without a gradient on a rank counts as zero there."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_kind: dict[tuple, list[nn.Parameter]] = {}  # one collective per dtype and device
    for p in params:
        by_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for same in by_kind.values():
        flat = torch.cat([p.grad.reshape(-1) for p in same])
        dist.all_reduce(flat, group=group)
        if average:
            flat /= dist.get_world_size(group)
        at = 0
        for p in same:
            p.grad.copy_(flat[at:at + p.numel()].view_as(p.grad))
            at += p.numel()
