"""The executable semantics of `.it`: plain PyTorch, straight from the definitions.

Every value is a tensor laid out `[*batch, n, m, C]`: axis -3 runs over the
output's points x, axis -2 over an integral's points y, the last axis over
channels (size 1 for a scalar). A value that does not depend on x or y has size
1 on that axis, so broadcasting does the bookkeeping. Integrals materialise the
N x M pair tensor: this is the oracle later strategies are tested against, not a
fast path. Any dtype works, and autograd flows through torch.

A side (the output's points, or an integral's) is the product of its variables'
domains, flattened row-major: the first domain runs slowest, each domain's axes in
order, the last axis of the last domain fastest; so `n` counts every point of
`U × P` for `output g(u: U, p: P)`, and `m` every point of `V × T` for
`integral(v: V, t: T)`. Each variable's coordinate is a tensor over the flat points
of its side (a vector for a domain of several axes), and a point's quadrature
weight is the product of its variables' weights. A field read `f(a_1, ..., a_r)`
becomes an integer index per axis of the field's domains (a bare variable of the
domain: the point's position along each axis; an affine point of an index lattice:
Σ c·coordinate + offset), and a gather from the flattened field padded with one
zero row, which every index outside the lattice selects (zero padding). The result
is `[*batch, *axes of the output's domains, C]` (no C for an `R` output).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InputError
from ..frontend import ir
from ..functions import FUNCTIONS
from .binding import RESERVED_KEYWORDS, Bound, bind, check_call, check_size
from .params import register_params, spline_eval, spline_taps
from .sampling import draw, side_points

X_AXIS, Y_AXIS = -3, -2


def elementwise(name: str, args: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Elementwise function `name` (its torch form in `itdsl.functions`); a comparison's
    0/1 in `dtype`."""
    out = FUNCTIONS[name].torch(torch, *args)
    return out.to(dtype) if out.dtype == torch.bool else out


@dataclass
class _Var:
    """A point variable: its domain, and its points over the flat points of its side."""

    domain: ir.Domain
    axis: int  # the side it runs over: X_AXIS or Y_AXIS
    coords: torch.Tensor | None  # [*B?, n, D] (None: a points domain the call gave none of)
    index: torch.Tensor  # [n] (long): the point's row-major index in its domain
    sizes: tuple[int, ...]  # the domain's axes' sizes (a rule's own nodes: theirs)

    def positions(self) -> list[torch.Tensor]:
        """The point's position along each axis of its domain, placed on its side."""
        return [_place_index(p, self.axis) for p in torch.unravel_index(self.index, self.sizes)]

    def lattice_coords(self) -> list[torch.Tensor]:
        """The integer coordinate along each axis of a lattice point: its position on an
        index, the offset position − (k − 1)/2 on a stencil."""
        if self.domain.fixed is None:
            return self.positions()
        return [p - (k - 1) // 2 for p, k in zip(self.positions(), self.sizes)]


@dataclass
class _Side:
    """The points an output or an integral runs over: the product of its variables'
    domains, flattened row-major."""

    n: int
    axis: int  # X_AXIS or Y_AXIS
    names: tuple[str, ...]
    vars: dict[str, _Var]
    weights: torch.Tensor | None  # [*B?, n], the product of the rules' weights (None: the
    #                               output's side, or drawn)


def _spread(t: torch.Tensor, k: int, sizes: list[int], dim: int = -1) -> torch.Tensor:
    """`t`, whose axis `dim` runs over the points of the k-th factor of a product of
    domains of `sizes` points, over the product's flat points (row-major)."""
    if len(sizes) == 1:
        return t
    dim %= t.dim()
    lead, trail = t.shape[:dim], t.shape[dim + 1:]
    ones = [1] * len(sizes)
    ones[k] = sizes[k]
    return t.reshape(*lead, *ones, *trail).expand(*lead, *sizes, *trail).reshape(
        *lead, math.prod(sizes), *trail)


def _side(binds: tuple[ir.Bind, ...], quads: tuple[ir.Quad | None, ...], axis: int,
          ctx: _Ctx) -> _Side:
    """The points of the product of `binds`' domains that an integral with `quads` (None:
    the output) runs over, with their coordinates and weights (runtime/sampling.py)."""
    doms = [ctx.module.ir.domain(b.domain) for b in binds]
    pts = [side_points(d, q, ctx.bound) for d, q in zip(doms, quads)]
    sizes = [p.n for p in pts]
    weights = None
    if all(p.weights is not None for p in pts):
        weights = _product([_spread(p.weights, k, sizes) for k, p in enumerate(pts)])
    out = {}
    for k, (b, d, q, p) in enumerate(zip(binds, doms, quads, pts)):
        own = q is not None and q.rule.entry.own_nodes
        axes = (q.n,) * d.naxes if own else ctx.bound.axes[d.name]
        coords = None if p.coords is None else _spread(p.coords, k, sizes, dim=-2)
        index = _spread(torch.arange(p.n, device=ctx.bound.device), k, sizes)
        out[b.var] = _Var(d, axis, coords, index, axes)
    return _Side(math.prod(sizes), axis, tuple(b.var for b in binds), out, weights)


@dataclass
class _Ctx:
    module: ReferenceOperator
    bound: Bound
    generator: torch.Generator | None
    n: int = 0  # the output's points
    vars: dict[str, _Var] = field(default_factory=dict)
    sides: dict[int, tuple[str, ...]] = field(default_factory=dict)  # axis -> its variables
    overrides: dict[ir.Expr, torch.Tensor] = field(default_factory=dict)
    draws: dict[tuple, torch.Tensor] = field(default_factory=dict)
    # in a softmax ratio (a shared exp, shifted): a point of weight 0 is not live, so out of
    # the sums too (as the Plan masks it: its exp may overflow, and 0 · inf is NaN)
    live_only: bool = False


@contextmanager
def _entered(side: _Side, ctx: _Ctx):
    """`side`'s variables in scope."""
    ctx.vars.update(side.vars)
    ctx.sides[side.axis] = side.names
    try:
        yield side
    finally:
        for name in side.names:
            del ctx.vars[name]
        del ctx.sides[side.axis]


def _place(t: torch.Tensor, axis: int) -> torch.Tensor:
    """`[*B, n, C]` -> with the point axis at `axis` (-3 for x, -2 for y)."""
    return t.unsqueeze(-2) if axis == X_AXIS else t.unsqueeze(-3)


def _place_index(t: torch.Tensor, axis: int) -> torch.Tensor:
    """`[n]` -> `[n, 1]` on x, `[1, n]` on y (indices: no batch, no channel)."""
    return t.unsqueeze(-1) if axis == X_AXIS else t.unsqueeze(0)


class ReferenceOperator(nn.Module):
    """An operator evaluated by its definition (N x M pair tensors)."""

    target = "reference"

    def __init__(self, op: ir.Operator, strategy=None):
        super().__init__()
        self.ir = op
        self._strategy = strategy  # a str, or a callable that analyses on first use
        for name in RESERVED_KEYWORDS:
            if any(d.name == name for d in op.domains) or any(i.name == name for i in op.inputs):
                raise InputError(f"`{name}` is a reserved keyword of operator calls; rename "
                                 f"that domain or input of `{op.name}`")
        register_params(self, op)

    @property
    def strategy(self) -> str | None:
        """The strategy the symbolic layer recognised (the reference computes by definition
        whatever it is)."""
        if callable(self._strategy):
            self._strategy = self._strategy()
        return self._strategy

    def extra_repr(self) -> str:
        return f"operator={self.ir.name}, target={self.target}"

    def _param_dtype(self) -> torch.dtype | None:
        for p in self.parameters():
            return p.dtype
        return None

    def forward(self, *args, generator: torch.Generator | None = None,
                **kwargs) -> torch.Tensor:
        check_call(args, generator)
        bound = bind(self.ir, kwargs, self._param_dtype())
        return evaluate(self, bound, generator)


def evaluate(module: ReferenceOperator, bound: Bound,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """The output `[*B, *axes of its domains, C]` (no C for an `R` output)."""
    out = module.ir.output
    ctx = _Ctx(module=module, bound=bound, generator=generator)
    side = _side(out.vars, (None,) * len(out.vars), X_AXIS, ctx)
    ctx.n = n = side.n
    with _entered(side, ctx):
        value = _eval(out.body, ctx)  # [*B, n or 1, 1, C]
    value = value.squeeze(Y_AXIS)
    width = out.width or 1
    value = value.expand(*bound.batch, n, width) if value.dim() - 2 <= len(bound.batch) else value
    value = value.expand(*value.shape[:-2], n, width)
    axes = [k for d in out.domains for k in bound.axes[d]]
    value = value.reshape(*value.shape[:-2], *axes, width)
    if out.width is None:
        value = value.squeeze(-1)
    return value.clone() if value.stride().count(0) else value


def _const(x, ctx: _Ctx) -> torch.Tensor:
    return torch.as_tensor(x, dtype=ctx.bound.dtype, device=ctx.bound.device)


def _coord(var: _Var, ctx: _Ctx) -> torch.Tensor:
    return _place(var.coords, var.axis)


def _eval(e: ir.Expr, ctx: _Ctx) -> torch.Tensor:
    if ctx.overrides and e in ctx.overrides:
        return ctx.overrides[e]
    if isinstance(e, ir.Const):
        return _const([e.value], ctx).reshape(1, 1, 1)
    if isinstance(e, ir.Coord):
        return _coord(ctx.vars[e.var], ctx)
    if isinstance(e, ir.FieldAt):
        return _read(e, ctx)
    if isinstance(e, ir.ParamRef):
        p = getattr(ctx.module, e.param)
        return p.to(ctx.bound.dtype).reshape(1, 1, -1)
    if isinstance(e, ir.Op):
        if e.fn is ir.Fn.DIV and all(isinstance(a, ir.Integral) for a in e.args):
            return _ratio(e.args[0], e.args[1], ctx)
        if e.fn is ir.Fn.MUL and _masks(e):
            return _masked_product(_factors(e), ctx)
        return elementwise(e.fn.value, [_eval(a, ctx) for a in e.args], ctx.bound.dtype)
    if isinstance(e, ir.Reduce):
        args = [_eval(a, ctx) for a in e.args]
        if e.fn is ir.RFn.DOT:
            return (args[0] * args[1]).sum(-1, keepdim=True)
        if e.fn is ir.RFn.NORM:
            return torch.sqrt((args[0] * args[0]).sum(-1, keepdim=True))
        if e.fn is ir.RFn.SQNORM:
            return (args[0] * args[0]).sum(-1, keepdim=True)
        return args[0].sum(-1, keepdim=True)
    if isinstance(e, ir.Component):
        return _eval(e.arg, ctx)[..., e.index:e.index + 1]
    if isinstance(e, ir.MlpCall):
        args = [_eval(a, ctx) for a in e.args]
        lead = torch.broadcast_shapes(*(a.shape[:-1] for a in args))
        x = torch.cat([a.expand(*lead, a.shape[-1]) for a in args], dim=-1)
        mlp = getattr(ctx.module, e.param)
        return mlp.to(ctx.bound.dtype)(x) if _mlp_dtype(mlp) != ctx.bound.dtype else mlp(x)
    if isinstance(e, ir.SplineCall):
        coef = getattr(ctx.module, e.param).to(ctx.bound.dtype)
        args = [_eval(a, ctx) for a in e.args]
        if e.at is not None:
            return _spline_per(coef, args, ctx.vars[e.at])
        return spline_eval(coef, list(torch.broadcast_tensors(*args)))
    if isinstance(e, ir.Integral):
        return _integral(e, ctx)
    raise TypeError(f"cannot evaluate {type(e).__name__}")  # pragma: no cover


def _read(e: ir.FieldAt, ctx: _Ctx) -> torch.Tensor:
    """Field `e.field` at the points `e.at`: `[*B, n or 1, m or 1, C]`."""
    f = ctx.bound.fields[e.field]  # [*B, N, C], flattened over its domains' axes
    if e.plain:  # at the variables of one side, in order: the side's points are the field's
        at = tuple(a.var for a in e.at)
        for axis, names in ctx.sides.items():
            if at == names:
                return _place(f, axis)
    zero = f.new_zeros(*f.shape[:-2], 1, f.shape[-1])
    return torch.cat([f, zero], dim=-2)[..., _flat_index(e, ctx), :]


def _flat_index(e: ir.FieldAt, ctx: _Ctx) -> torch.Tensor:
    """The row-major index `[n or 1, m or 1]` of the point `e` reads in its flattened field,
    or the field's number of points (the zero row) where it falls outside the lattice."""
    flat, inside, total = 0, True, 1
    for a, name in zip(e.at, ctx.module.ir.input(e.field).domains):
        for p, size in zip(_point(a, name, ctx), ctx.bound.axes[name]):
            inside = inside & (p >= 0) & (p < size)
            flat = flat * size + p
            total *= size
    return torch.where(inside, flat, total)


def _point(a: ir.Affine, domain: str, ctx: _Ctx) -> list[torch.Tensor]:
    """The position along each axis of `domain` of the point `a`: a variable of `domain`
    its own; an affine point of an index lattice Σ c·coordinate + offset."""
    var = ctx.vars.get(a.var) if a.var is not None else None
    if var is not None and var.domain.name == domain:
        return var.positions()
    out: list = [a.offset] * len(ctx.bound.axes[domain])
    for c, name in a.terms:
        for k, x in enumerate(ctx.vars[name].lattice_coords()):
            out[k] = out[k] + c * x
    return out


def _spline_per(coef: torch.Tensor, args: list[torch.Tensor], at: _Var) -> torch.Tensor:
    """The spline of the point `at` of a `per` domain (coefficients `coef[at]`, `coef`
    `[*sizes of the domain, n1(, n2)]`) at `args`: `spline_eval`'s taps, per point."""
    coef = coef.reshape(-1, *coef.shape[coef.dim() - len(args):])
    *args, sel = torch.broadcast_tensors(*args, _place_index(at.index, at.axis).unsqueeze(-1))
    taps = [spline_taps(a, n) for a, n in zip(args, coef.shape[1:])]
    if len(taps) == 1:
        return sum(w * coef[sel, i] for i, w in zip(*taps[0]))
    (iu, wu), (iv, wv) = taps
    out = 0
    for ia, wa in zip(iu, wu):
        out = out + wa * sum(wb * coef[sel, ia, ib] for ib, wb in zip(iv, wv))
    return out


def _is_bracket(e: ir.Expr) -> bool:
    return isinstance(e, ir.Op) and e.fn in ir.BRACKET_FNS


def _mlp_dtype(mlp: nn.Module) -> torch.dtype:
    return next(mlp.parameters()).dtype


def _masks(e: ir.Expr) -> bool:
    """`e` is a product with a bracket among its factors (and something else)."""
    factors = _factors(e)
    return 0 < sum(map(_is_bracket, factors)) < len(factors)


def _masked_product(factors: list[ir.Expr], ctx: _Ctx, extra=(),
                    keep: torch.Tensor | None = None) -> torch.Tensor:
    """The product of `factors` (and `extra` values) where its brackets (and `keep`) hold,
    else 0. A bracket masks the whole product it is a factor of, however parenthesised: even
    where a factor overflows or is NaN, forward and backward (each factor is masked before
    the product, so autograd never multiplies a masked-off zero by it)."""
    brackets = [_eval(f, ctx) for f in factors if _is_bracket(f)]
    c = _product(brackets) != 0 if brackets else keep
    if brackets and keep is not None:
        c = c & keep
    values = [_eval(f, ctx) for f in factors if not _is_bracket(f)] + list(extra)
    zero = torch.zeros((), dtype=values[0].dtype, device=values[0].device)
    return _product([torch.where(c, v, zero) for v in values])


def _product(values: list[torch.Tensor]) -> torch.Tensor:
    out = values[0]
    for v in values[1:]:
        out = out * v
    return out


def _factors(e: ir.Expr) -> list[ir.Expr]:
    if isinstance(e, ir.Op) and e.fn is ir.Fn.MUL:
        return _factors(e.args[0]) + _factors(e.args[1])
    return [e]


def _ratio_shift(num: ir.Integral, den: ir.Integral, side: _Side,
                 ctx: _Ctx) -> dict[ir.Expr, torch.Tensor]:
    """For `integral K*v / integral K` with a shared factor exp(s): exp(s - max_y s).

    The ratio is unchanged and the exponentials cannot overflow (softmax attention).
    """
    if (num.vars, num.quads) != (den.vars, den.quads):
        return {}
    shared = [f for f in _factors(num.body) if isinstance(f, ir.Op) and f.fn is ir.Fn.EXP
              and f in _factors(den.body)]
    out = {}
    for f in shared:
        s = _eval(f.args[0], ctx)
        # The max runs over the points where the rest of the denominator (its weight too)
        # is non-zero, so that masked-out terms (a causal bracket, a point not drawn)
        # cannot push the live ones to underflow.
        rest = [g for g in _factors(den.body) if g != f]
        values = [_eval(g, ctx) for g in rest]
        if any(q.rule.entry.zeros for q in den.quads):  # a point of weight 0 is not live
            values.append(_weights(den, side, ctx))
        live = s.detach()
        if values:
            r = _product(values)
            mask = (r.detach() != 0).expand(torch.broadcast_shapes(r.shape, s.shape))
            live = torch.where(mask, live, torch.full_like(live, -math.inf))
            if all(g in _factors(num.body) for g in rest):
                # the numerator is masked alike (attention): a masked-out score is -inf,
                # so that its exp cannot overflow (nor its gradient be 0 · inf); else the
                # numerator reads the exponential where the denominator's mask fails
                s = torch.where(mask, s, torch.full_like(s, -math.inf))
        shift = live.amax(dim=Y_AXIS, keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        out[f] = torch.exp(s - shift)
    return out


def _binders(e: ir.Integral) -> str:
    return ", ".join(f"{b.var}: {b.domain}" for b in e.vars)


def _check_pairs(e: ir.Integral, m: int, ctx: _Ctx) -> None:
    """The pair tensors of an integral fit in memory (else a clear error, before they are
    allocated)."""
    op = ctx.module.ir
    n = ctx.n
    width = max(max(op.param(x.param).sizes) if isinstance(x, ir.MlpCall) else x.width or 1
                for x in ir.walk(e.body))
    check_size(math.prod(ctx.bound.batch) * n * m * width, ctx.bound.dtype, ctx.bound.device,
               f"the reference semantics of `integral({_binders(e)})` over {n} × {m} "
               "pairs", 'target="reference" materialises every pair; compile for '
               'target="cpu" (tiled: no n × m buffer)')


def _integral(e: ir.Integral, ctx: _Ctx) -> torch.Tensor:
    side = _side(e.vars, e.quads, Y_AXIS, ctx)
    _check_pairs(e, side.n, ctx)
    with _entered(side, ctx):
        weights = _weights(e, side, ctx)
        # a point a rule drops (montecarlo's not drawn) is masked out as by a bracket
        drops = weights != 0 if any(q.rule.entry.drops or ctx.live_only and q.rule.entry.zeros
                                    for q in e.quads) else None
        if _masks(e.body) or drops is not None:  # the bracket masks the weight too
            terms = _masked_product(_factors(e.body), ctx, [weights], drops)
        else:
            terms = _eval(e.body, ctx) * weights
        # an integrand that does not depend on y still has one term per point of y
        terms = terms.expand(*terms.shape[:-2], side.n, terms.shape[-1])
        return terms.sum(dim=Y_AXIS, keepdim=True)


def _weights(e: ir.Integral, side: _Side, ctx: _Ctx) -> torch.Tensor:
    """Quadrature weights `[*B?, 1, m, 1]`, broadcastable against `[*B, n, m, C]`: the
    product of the rules' (runtime/sampling.py), or drawn once per call, domain and rule
    (montecarlo, on an integral of one variable), so that a ratio of two integrals with the
    same draws is self-normalised."""
    if side.weights is not None:
        return _place(side.weights.unsqueeze(-1), Y_AXIS)
    (b,), (q,), m = e.vars, e.quads, side.n
    key = (b.domain, q.samples, q.importance)
    if key not in ctx.draws:
        def importance() -> torch.Tensor:  # [*B?, m] (batch dims if it reads fields)
            imp = _eval(q.importance, ctx)  # [*B?, 1, m, 1]
            lead = imp.shape[:-3]
            return imp.expand(*lead, 1, m, 1).reshape(*lead, m)

        w = draw(q, side.vars[b.var].domain, m, importance, ctx.generator, ctx.bound)
        ctx.draws[key] = _place(w.unsqueeze(-1), Y_AXIS)
    return ctx.draws[key]


def _ratio(num: ir.Integral, den: ir.Integral, ctx: _Ctx) -> torch.Tensor:
    """`integral A / integral B`, with shared exponentials shifted by their max over y."""
    shifts = {}
    m = math.prod(ctx.bound.sizes.get(b.domain, 0) for b in num.vars)
    if not any(q.rule.entry.own_nodes for q in num.quads) and m > 0:
        _check_pairs(num, m, ctx)
        side = _side(num.vars, num.quads, Y_AXIS, ctx)
        with _entered(side, ctx):
            shifts = _ratio_shift(num, den, side, ctx)
    saved, live_only = ctx.overrides, ctx.live_only
    ctx.overrides, ctx.live_only = {**saved, **shifts}, bool(shifts)
    try:
        return _eval(num, ctx) / _eval(den, ctx)
    finally:
        ctx.overrides, ctx.live_only = saved, live_only
