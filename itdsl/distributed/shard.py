"""`shard`: an operator whose integration domain is split across the ranks of a process group.

What we chose, and why. A rank owns a contiguous slice of the sharded domain Y (its points,
the fields on it) and its own output points. Two exact ways to compute:

- the ring (`_Ring`), where the output is one integral over a points domain with sum, mean or
  weights: Y's blocks pass from rank to rank and their integrals add up, O(|Y|/W) memory per
  rank; the backward passes the blocks round again with their gradients (recomputing each
  block's integral) and brings each gradient home;
- the all-gather (`_Gather`), for every other operator: Y's slices gathered, padded to the
  largest (gloo cannot gather unequal sizes), the operator run on the rank's output points
  against the whole of Y; the backward all-reduces the gradients of the gathered tensors (a
  sum, not scaled by the world size) and hands each rank its slice. So:

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
- memory: O(|Y|) per rank for the gathered coordinates and fields (and their gradients); the
  gather is exact for every operator the language accepts, where the ring needs partial
  integrals that add up. No pair tensor is formed on any path but the reference's.

What is refused: sharding a domain the output ranges over (each rank would need the whole
output's domain; a recurrence across slices would need the state carried between ranks), a
domain of several axes, a stencil, and a domain integrated only by rules with nodes of their
own (`gauss(n)`, `midpoint(n)`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InputError, ItdslError, UnsupportedError
from ..frontend import ir

# the per-call exchange: one int64 row per rank
_OK, _SIZE, _GIVEN, _GRAD, _SHAPES = range(5)


def _operator_ir(op: nn.Module, over: str) -> ir.Operator:
    if isinstance(op, ShardedOperator) and op.over == over:
        raise InputError(f"this operator is sharded over `{over}` already",
                         hint="shard the operator itself once")
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
    for b in code.output.vars:
        od = code.domain(b.domain)
        if od.kind.entry.given or not _reads_position(code, b):
            continue
        raise UnsupportedError(
            f"the output's domain `{b.domain}` is a {od.kind.entry.name}: each rank's output "
            f"points would start at its own first point, while `{code.name}` reads where they "
            f"are (`{b.var}` in arithmetic, a comparison, or a read of a field of another "
            "domain): the ranks' positions would not be the global ones",
            hint=f"declare `{b.domain}` as points(1) and pass each rank's global positions "
                 "as its coordinates")


def _reads_position(code: ir.Operator, b: ir.Bind) -> bool:
    """Whether the body uses output variable `b` other than in plain reads of fields on its
    own domain (its coordinate, arithmetic on it, a read of another domain's field)."""
    for n in ir.walk(code.output.body):
        if isinstance(n, ir.Coord) and n.var == b.var:
            return True
        if isinstance(n, ir.FieldAt):
            doms = code.input(n.field).domains
            for dom, at in zip(doms, n.at):
                if b.var in at.vars and (at.var != b.var or dom != b.domain):
                    return True
    return False


RING_RULES = ("sum", "weights", "mean")  # per-point weights a block knows (mean: rescaled)


def _ring_refusal(code: ir.Operator, over: str) -> str | None:
    """Why the ring cannot compute this operator (None: it can). The ring adds up the
    integrals over Y's blocks, so the output must be one integral over Y whose weights a
    block knows on its own, over scattered points (no global position to know)."""
    body, d = code.output.body, code.domain(over)
    if d.kind.entry.name != "points":
        return (f"`{over}` is a {d.kind.entry.name}: its points' positions depend on the "
                "slices before it")
    if not (isinstance(body, ir.Integral) and len(body.vars) == 1):
        return "the output is not a single integral over it (a ratio, or more than a sum)"
    rule = body.quads[0].rule.entry.name
    if rule not in RING_RULES:
        return f"its rule `{rule}` does not add up over blocks"
    return None


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
            t = _pad(t, dim, m)
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


def _pass_on(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Send `tensors` to the next rank of the ring and receive the previous rank's (equal
    shapes on every rank: padded)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    to = dist.get_global_rank(group or dist.group.WORLD, (rank + 1) % world)
    frm = dist.get_global_rank(group or dist.group.WORLD, (rank - 1) % world)
    got = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), to, group) for t in tensors] + \
          [dist.P2POp(dist.irecv, g, frm, group) for g in got]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return got


class _Ring(torch.autograd.Function):
    """The integral over Y as the sum of the integrals over its blocks, the blocks passed
    from rank to rank (as ring attention does): a rank holds its own block and the one in
    flight, O(|Y|/W). The backward passes each block round again with its gradient
    accumulating, recomputing the block's integral, and brings the gradient home."""

    @staticmethod
    def forward(ctx, sop, sizes, names, dims, n_y, others, consts, n_params, *flat):
        group = sop.group
        ys, rest = list(flat[:n_y]), list(flat[n_y:])
        xs = rest[:len(rest) - n_params]  # (the params are inputs for their gradients)
        ctx.sop, ctx.sizes, ctx.names, ctx.dims, ctx.n_y = sop, sizes, names, dims, n_y
        ctx.others, ctx.consts, ctx.n_params = others, consts, n_params
        ctx.save_for_backward(*ys, *xs)
        m = max(sizes)
        padded = [_pad(t, dim, m) for t, dim in zip(ys, dims)]
        world, rank = len(sizes), dist.get_rank(group)
        acc = None
        with torch.no_grad():
            for step in range(world):
                owner = (rank - step) % world
                part = sop._block(names, padded, sizes[owner], sum(sizes),
                                  {**consts, **dict(zip(others, xs))})
                if part is not None:
                    acc = part if acc is None else acc + part
                if step < world - 1:
                    padded = _pass_on(padded, group)
        if acc is None:  # every block empty, or no output point here: the call as it is
            acc = sop._block(names, ys, 0, sum(sizes), {**consts, **dict(zip(others, xs))},
                             empty=True)
        return acc

    @staticmethod
    def backward(ctx, dout):
        sop, sizes, dims, group = ctx.sop, ctx.sizes, ctx.dims, ctx.sop.group
        saved = ctx.saved_tensors
        ys, xs = list(saved[:ctx.n_y]), list(saved[ctx.n_y:])
        params = [p for p in sop.op.parameters()][:ctx.n_params]
        world, rank, m = len(sizes), dist.get_rank(group), max(sizes)
        need = ctx.needs_input_grad[8:]
        need_y, need_x = need[:ctx.n_y], need[ctx.n_y:len(need) - ctx.n_params]
        need_p = need[len(need) - ctx.n_params:]
        blocks = [_pad(t, dim, m) for t, dim in zip(ys, dims)]
        grads = [torch.zeros_like(b) for b in blocks]
        gx = [torch.zeros_like(x) if w else None for x, w in zip(xs, need_x)]
        gp = [torch.zeros_like(p) if w else None for p, w in zip(params, need_p)]
        for step in range(world):
            owner = (rank - step) % world
            n = sizes[owner]
            if n and dout.numel():
                with torch.enable_grad():
                    yl = [b.narrow(dim, 0, n).detach().requires_grad_(w)
                          for b, dim, w in zip(blocks, dims, need_y)]
                    xl = [x.detach().requires_grad_(w) for x, w in zip(xs, need_x)]
                    part = sop._block(ctx.names, yl, n, sum(sizes),
                                      {**ctx.consts, **dict(zip(ctx.others, xl))})
                    wrt = [t for t, w in zip(yl, need_y) if w] + \
                          [t for t, w in zip(xl, need_x) if w] + \
                          [p for p, w in zip(params, need_p) if w]
                    got = list(torch.autograd.grad(part, wrt, dout, allow_unused=True)) \
                        if wrt else []
                for k, w in enumerate(need_y):
                    if w:
                        g = got.pop(0)
                        if g is not None:
                            grads[k].narrow(dims[k], 0, n).add_(g)
                for acc, w in zip([*gx, *gp], [*need_x, *need_p]):
                    if w:
                        g = got.pop(0)
                        if g is not None:
                            acc.add_(g)
            if world > 1:  # the block on to the next rank, its gradient with it; after the
                # last block, the gradient alone goes home (the next rank owns it)
                moved = _pass_on((blocks if step < world - 1 else []) + grads, group)
                if step < world - 1:
                    blocks, grads = moved[:len(blocks)], moved[len(blocks):]
                else:
                    grads = moved
        gy = [g.narrow(dim, 0, sizes[rank]) if w else None
              for g, dim, w in zip(grads, dims, need_y)]
        return (None,) * 8 + (*gy, *gx, *gp)


def _pad(t: torch.Tensor, dim: int, m: int) -> torch.Tensor:
    """`t` with zeros appended along `dim` up to `m` entries."""
    if t.shape[dim] >= m:
        return t.contiguous()
    shape = list(t.shape)
    shape[dim] = m - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim)


def _fingerprint(items: list[tuple[torch.Tensor, int]]) -> int:
    """The shapes (the sharded axis left out) and dtypes of the gathered tensors, as an int63:
    every rank must pass the same."""
    text = ";".join(f"{t.dtype}:{[s if a != t.dim() + dim else -1 for a, s in enumerate(t.shape)]}"
                    for t, dim in items)
    h = 0
    for c in text.encode():  # (plain arithmetic: torch.compile traces no hashlib)
        h = (h * 1000003 + c) % (1 << 61)
    return h


class ShardedOperator(nn.Module):
    """An itdsl operator whose domain `over` is split across the ranks of `group`; see
    `shard`. Its params are the operator's (`self.op`), one copy per rank."""

    def __init__(self, op: nn.Module, over: str, group=None, ring: bool | None = None):
        super().__init__()
        code = _operator_ir(op, over)
        _check_shardable(code, over)
        self.op, self.over, self.group = op, over, group
        self.ir = code
        self._layout = _layout(code, over)
        self._dims = dict(self._layout)  # argument -> its axis on `over`
        self._sampled = _sampled(code)
        why = _ring_refusal(code, over)
        if ring and why:
            raise UnsupportedError(f"the ring cannot shard `{over}` of `{code.name}`: {why}",
                                   hint="ring=None (the default) gathers the slices instead")
        self.ring = why is None if ring is None else bool(ring)

    def extra_repr(self) -> str:
        return f"over={self.over}, {'ring' if self.ring else 'all-gather'}"

    def _block(self, names: list[str], ys: list[torch.Tensor], n: int, total: int, call: dict,
               empty: bool = False) -> torch.Tensor | None:
        """The integral over one block of Y (the first `n` points of the padded tensors `ys`,
        the arguments `names`), at this rank's output points (`call`: the other arguments);
        None for an empty block unless `empty`."""
        if n == 0 and not empty:
            return None
        dims = self._dims
        out = self.op(**call, **{g: t.narrow(dims[g], 0, n) for g, t in zip(names, ys)})
        if self.ir.output.body.quads[0].rule.entry.name == "mean" and n:
            out = out * (n / total)  # the block's mean, as its share of the global mean
        return out

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
                what = (f"the coordinates [..., n, D] of this rank's slice of `{name}`"
                        if name == self.over else f"this rank's slice of the field `{name}`")
                raise InputError(f"`{name}` is {what}, a tensor; got {type(t).__name__}")
            if t.dim() < -dim:
                raise InputError(f"`{name}` has {t.dim()} dims; it needs at least {-dim} "
                                 f"(its axis on `{self.over}` is dim {dim})")
            sizes[name] = t.shape[dim]
        n = kwargs.get(self.over)
        if isinstance(n, int) and not isinstance(n, bool):
            sizes[self.over] = n
        elif n is not None and self.over not in self._dims:
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

    def _bind_local(self, kwargs: dict) -> None:
        """This rank's call checked as a call of the operator on its own slice (shapes,
        dtypes, the params' dtype), so that a bad one fails here, on every rank, and not
        after the exchange on this rank alone."""
        from dataclasses import replace

        from ..runtime.binding import Facts, bind
        params = list(self.op.parameters())
        # (an empty slice is fine here: the integral runs over every rank's)
        facts = replace(Facts.of(self.ir), rules=())
        # and a slice may hold fewer points than the whole domain needs (a grid's 2): those
        # are checked as the domain's least, shapes and dtypes unchanged otherwise
        least = self.ir.domain(self.over).kind.entry.min_size
        kw = dict(kwargs)
        for name, dim in self._layout:
            t = kw.get(name)
            if isinstance(t, torch.Tensor) and t.dim() >= -dim:
                kw[name] = _pad(t, dim, least)
        n = kw.get(self.over)
        if isinstance(n, int) and not isinstance(n, bool) and n < least:
            kw[self.over] = least
        bound = bind(self.ir, kw, params[0].dtype if params else None, facts)
        for p in params:
            if p.dtype != bound.dtype:
                raise InputError(f"the params are {p.dtype} but the inputs are {bound.dtype}",
                                 hint=f"call `.to({bound.dtype})` on the module")

    def _exchange(self, kwargs: dict, args: tuple = ()) -> tuple[list[int], list[str], list[bool]]:
        """Every rank's slice size, the gathered names, and whether each needs a gradient
        anywhere; one all-gather. An error on one rank is raised on every rank (so none waits
        in a collective the failing one never reaches)."""
        world = dist.get_world_size(self.group)
        row = torch.zeros(5, dtype=torch.int64)
        error = None
        try:
            if args:
                raise InputError("call a sharded operator with keyword arguments, as the "
                                 "operator itself", hint=f"e.g. `sop({self.over}=...)`")
            self._bind_local(kwargs)
            n, given = self._local(kwargs)
            items = [(kwargs[g], self._dims[g]) for g in given]
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
        if not (dist.is_available() and dist.is_initialized()):
            raise InputError("torch.distributed is not initialised",
                             hint='call torch.distributed.init_process_group("gloo") first '
                                  "(torchrun sets the rank and world size in the environment)")
        sizes, given, need = self._exchange(kwargs, args)
        dims = [self._dims[g] for g in given]
        tensors = []
        for name, want in zip(given, need):
            t = kwargs[name]
            if want and not t.requires_grad:  # (another rank needs this gradient: take part)
                t = t.detach().requires_grad_()
            tensors.append(t)
        if self.ring:
            others = [k for k, v in kwargs.items()
                      if k not in given and isinstance(v, torch.Tensor)]
            consts = {k: v for k, v in kwargs.items()
                      if k not in given and k not in others and k != self.over}
            params = list(self.op.parameters())
            return _Ring.apply(self, sizes, given, dims, len(tensors), others, consts,
                               len(params), *tensors, *(kwargs[k] for k in others), *params)
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


def shard(op: nn.Module, over: str, group=None, ring: bool | None = None) -> ShardedOperator:
    """The operator `op` (an itdsl operator module) with its domain `over` split across the
    ranks of `group` (torch.distributed's default group unless given).

    Each rank calls the result as it would call `op`, passing its own output points and its
    contiguous slice of `over` (its coordinates, every field on it, or its size as an int),
    the slices in rank order; they may be uneven or empty. It returns, at the rank's output
    points, the integral over the whole of `over`. With the total loss the sum of the ranks'
    losses, the gradients of every tensor are exact (a slice of `over` gets the contributions
    of every rank's outputs), and each rank's param gradients are its share of the total's:
    `all_reduce_grads` sums them (DDP averages them). Every rank must make the same calls, and
    call backward through them, in the same order — as with any collective.

    How (see this module's docstring): `ring=None` passes Y's blocks from rank to rank where
    the output is one integral over a points domain with `sum`, `mean` or `weights` (O(|Y|/W)
    memory per rank), and all-gathers the slices otherwise (exact for every operator, O(|Y|)
    per rank); True insists on the ring (an error says why it cannot), False gathers."""
    return ShardedOperator(op, over, group, ring)


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
