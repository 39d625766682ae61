"""The executable semantics of `.it`: plain PyTorch, straight from the definitions.

Every value is a tensor laid out `[*batch, n, m, C]`: axis -3 runs over the
output's points x, axis -2 over an integral's points y, the last axis over
channels (size 1 for a scalar). A value that does not depend on x or y has size
1 on that axis, so broadcasting does the bookkeeping. Integrals materialise the
N x M pair tensor: this is the oracle later strategies are tested against, not a
fast path. Any dtype works, and autograd flows through torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InputError
from ..frontend import ir
from ..functions import FUNCTIONS
from .binding import RESERVED_KEYWORDS, Bound, bind, check_call, check_size
from .params import register_params, spline_eval
from .sampling import draw, side_points

X_AXIS, Y_AXIS = -3, -2

def elementwise(name: str, args: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Elementwise function `name` (its torch form in `itdsl.functions`); a comparison's
    0/1 in `dtype`."""
    out = FUNCTIONS[name].torch(torch, *args)
    return out.to(dtype) if out.dtype == torch.bool else out


@dataclass
class _Var:
    domain: ir.Domain
    axis: int
    n: int
    coords: torch.Tensor | None  # [*B?, n, D] (None: a points domain the call gave none of)
    weights: torch.Tensor | None = None  # [*B?, n] of an integral's rule (None: drawn)


def _var(d: ir.Domain, quad: ir.Quad | None, axis: int, ctx: _Ctx) -> _Var:
    """The points of `d` that an integral with `quad` (None: the output) runs over."""
    pts = side_points(d, quad, ctx.bound)
    return _Var(d, axis, pts.n, pts.coords, pts.weights)


@dataclass
class _Ctx:
    module: ReferenceOperator
    bound: Bound
    generator: torch.Generator | None
    vars: dict[str, _Var] = field(default_factory=dict)
    overrides: dict[ir.Expr, torch.Tensor] = field(default_factory=dict)
    draws: dict[tuple, torch.Tensor] = field(default_factory=dict)


def _place(t: torch.Tensor, axis: int) -> torch.Tensor:
    """`[*B, n, C]` -> with the point axis at `axis` (-3 for x, -2 for y)."""
    return t.unsqueeze(-2) if axis == X_AXIS else t.unsqueeze(-3)


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
    op = module.ir
    out = op.output
    ctx = _Ctx(module=module, bound=bound, generator=generator)
    n = bound.sizes[out.domain]
    ctx.vars[out.var] = _var(op.domain(out.domain), None, X_AXIS, ctx)
    value = _eval(out.body, ctx)  # [*B, n or 1, 1, C]
    value = value.squeeze(Y_AXIS)
    width = out.width or 1
    value = value.expand(*bound.batch, n, width) if value.dim() - 2 <= len(bound.batch) else value
    value = value.expand(*value.shape[:-2], n, width)
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
        return _place(ctx.bound.fields[e.field], ctx.vars[e.var].axis)
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
        args = torch.broadcast_tensors(*args)
        return spline_eval(coef, list(args))
    if isinstance(e, ir.Integral):
        return _integral(e, ctx)
    raise TypeError(f"cannot evaluate {type(e).__name__}")  # pragma: no cover


def _is_bracket(e: ir.Expr) -> bool:
    return isinstance(e, ir.Op) and e.fn in ir.BRACKET_FNS


def _mlp_dtype(mlp: nn.Module) -> torch.dtype:
    return next(mlp.parameters()).dtype


def _masks(e: ir.Expr) -> bool:
    """`e` is a product with a bracket among its factors (and something else)."""
    factors = _factors(e)
    return 0 < sum(map(_is_bracket, factors)) < len(factors)


def _masked_product(factors: list[ir.Expr], ctx: _Ctx, extra=()) -> torch.Tensor:
    """The product of `factors` (and `extra` values) where its brackets hold, else 0. A
    bracket masks the whole product it is a factor of, however parenthesised: even where a
    factor overflows or is NaN, forward and backward (each factor is masked before the
    product, so autograd never multiplies a masked-off zero by it)."""
    c = _product([_eval(f, ctx) for f in factors if _is_bracket(f)]) != 0
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


def _ratio_shift(num: ir.Integral, den: ir.Integral, ctx: _Ctx) -> dict[ir.Expr, torch.Tensor]:
    """For `integral K*v / integral K` with a shared factor exp(s): exp(s - max_y s).

    The ratio is unchanged and the exponentials cannot overflow (softmax attention).
    """
    if (num.var, num.domain, num.quad) != (den.var, den.domain, den.quad):
        return {}
    shared = [f for f in _factors(num.body) if isinstance(f, ir.Op) and f.fn is ir.Fn.EXP
              and f in _factors(den.body)]
    out = {}
    for f in shared:
        s = _eval(f.args[0], ctx)
        # The max runs over the points where the rest of the denominator is non-zero, so
        # that masked-out terms (a causal bracket) cannot push the live ones to underflow.
        rest = [g for g in _factors(den.body) if g != f]
        live = s.detach()
        if rest:
            r = _product([_eval(g, ctx) for g in rest])
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


def _check_pairs(e: ir.Integral, m: int, ctx: _Ctx) -> None:
    """The pair tensors of an integral fit in memory (else a clear error, before they are
    allocated)."""
    op = ctx.module.ir
    n = ctx.vars[op.output.var].n
    width = max(max(op.param(x.param).sizes) if isinstance(x, ir.MlpCall) else x.width or 1
                for x in ir.walk(e.body))
    check_size(math.prod(ctx.bound.batch) * n * m * width, ctx.bound.dtype, ctx.bound.device,
               f"the reference semantics of `integral({e.var}: {e.domain})` over {n} × {m} "
               "pairs", 'target="reference" materialises every pair; compile for '
               'target="cpu" (tiled: no n × m buffer)')


def _integral(e: ir.Integral, ctx: _Ctx) -> torch.Tensor:
    var = _var(ctx.module.ir.domain(e.domain), e.quad, Y_AXIS, ctx)
    _check_pairs(e, var.n, ctx)
    ctx.vars[e.var] = var
    try:
        weights = _weights(e, var, ctx)
        if _masks(e.body):  # the bracket masks the quadrature weight too
            terms = _masked_product(_factors(e.body), ctx, [weights])
        else:
            terms = _eval(e.body, ctx) * weights
        # an integrand that does not depend on y still has one term per point of y
        terms = terms.expand(*terms.shape[:-2], var.n, terms.shape[-1])
        return terms.sum(dim=Y_AXIS, keepdim=True)
    finally:
        del ctx.vars[e.var]


def _weights(e: ir.Integral, var: _Var, ctx: _Ctx) -> torch.Tensor:
    """Quadrature weights `[*B?, 1, m, 1]`, broadcastable against `[*B, n, m, C]`: the
    rule's (runtime/sampling.py), or drawn once per call, domain and rule (montecarlo),
    so that a ratio of two integrals with the same draws is self-normalised."""
    if var.weights is not None:
        return _place(var.weights.unsqueeze(-1), Y_AXIS)
    q, m = e.quad, var.n
    key = (e.domain, q.samples, q.importance)
    if key not in ctx.draws:
        def importance() -> torch.Tensor:  # [*B?, m] (batch dims if it reads fields)
            imp = _eval(q.importance, ctx)  # [*B?, 1, m, 1]
            lead = imp.shape[:-3]
            return imp.expand(*lead, 1, m, 1).reshape(*lead, m)

        w = draw(q, var.domain, m, importance, ctx.generator, ctx.bound)
        ctx.draws[key] = _place(w.unsqueeze(-1), Y_AXIS)
    return ctx.draws[key]


def _ratio(num: ir.Integral, den: ir.Integral, ctx: _Ctx) -> torch.Tensor:
    """`integral A / integral B`, with shared exponentials shifted by their max over y."""
    d = ctx.module.ir.domain(num.domain)
    shifts = {}
    if not num.quad.rule.entry.own_nodes and ctx.bound.sizes[d.name] > 0:
        _check_pairs(num, ctx.bound.sizes[d.name], ctx)
        ctx.vars[num.var] = _var(d, num.quad, Y_AXIS, ctx)
        try:
            shifts = _ratio_shift(num, den, ctx)
        finally:
            del ctx.vars[num.var]
    saved = ctx.overrides
    ctx.overrides = {**saved, **shifts}
    try:
        return _eval(num, ctx) / _eval(den, ctx)
    finally:
        ctx.overrides = saved
