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

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..frontend import ir
from ..frontend.ast import DomainKind
from ..functions import FUNCTIONS
from .binding import RESERVED_KEYWORDS, Bound, bind, check_call, check_size
from .params import register_params, spline_eval

X_AXIS, Y_AXIS = -3, -2

def elementwise(name: str, args: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Elementwise function `name` (its torch form in `itdsl.functions`); a comparison's
    0/1 in `dtype`."""
    out = FUNCTIONS[name].torch(torch, *args)
    return out.to(dtype) if out.dtype == torch.bool else out


def grid_points(d: ir.Domain, n: int) -> np.ndarray:
    return d.lo + (d.hi - d.lo) * np.arange(n) / (n - 1)


def grid_weights(rule: ir.QuadRule, lo: float, hi: float, n: int) -> np.ndarray:
    """Composite quadrature weights on the n-point uniform grid of [lo, hi]."""
    h = (hi - lo) / (n - 1)
    w = np.full(n, h)
    if rule is ir.QuadRule.RIEMANN:  # left Riemann sum
        w[-1] = 0.0
    elif rule is ir.QuadRule.TRAPEZOID or (rule is ir.QuadRule.SIMPSON and n < 4 and n % 2 == 0):
        w[0] = w[-1] = h / 2
    elif rule is ir.QuadRule.SIMPSON:
        w = np.zeros(n)
        # Simpson's 1/3 rule on an even number of intervals; with an odd number, the
        # last three intervals take Simpson's 3/8 rule.
        k = n if n % 2 == 1 else n - 3
        if k >= 3:
            w[:k:2] += 2 * h / 3
            w[1:k:2] += 4 * h / 3
            w[0] -= h / 3
            w[k - 1] -= h / 3
        if k != n:
            w[k - 1:] += 3 * h / 8 * np.array([1, 3, 3, 1])
    return w


def gauss_legendre(n: int, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(n)
    return (lo + hi) / 2 + (hi - lo) / 2 * x, (hi - lo) / 2 * w


@dataclass
class _Var:
    domain: ir.Domain
    axis: int
    n: int
    coords: torch.Tensor | None = None  # override (gauss nodes)


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
    ctx.vars[out.var] = _Var(op.domain(out.domain), X_AXIS, n)
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
    d = var.domain
    if var.coords is not None:
        pts = var.coords.reshape(-1, 1)
    elif d.kind is DomainKind.POINTS:
        return _place(ctx.bound.coords[d.name].to(ctx.bound.dtype), var.axis)
    elif d.kind is DomainKind.GRID:
        pts = _const(grid_points(d, var.n), ctx).reshape(-1, 1)
    else:
        pts = torch.arange(var.n, dtype=ctx.bound.dtype, device=ctx.bound.device).reshape(-1, 1)
    return _place(pts, var.axis)


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
    d = ctx.module.ir.domain(e.domain)
    q = e.quad
    if q.rule is ir.QuadRule.GAUSS:
        nodes, w = gauss_legendre(q.n, d.lo, d.hi)
        var = _Var(d, Y_AXIS, q.n, coords=_const(nodes, ctx))
    else:
        var = _Var(d, Y_AXIS, ctx.bound.sizes[d.name])
    _check_pairs(e, var.n, ctx)
    ctx.vars[e.var] = var
    try:
        weights = _weights(e, var, ctx) if q.rule is not ir.QuadRule.GAUSS else \
            _const(w, ctx).reshape(-1, 1)
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
    """Quadrature weights, broadcastable against `[*B, n, m, C]`."""
    q, m, d = e.quad, var.n, var.domain
    if q.rule is ir.QuadRule.SUM:
        return _const(1.0, ctx)
    if q.rule is ir.QuadRule.MEAN:
        return _const(1.0 / m, ctx)
    if q.rule is ir.QuadRule.WEIGHTS:
        return _place(ctx.bound.fields[q.weights], Y_AXIS)
    if q.rule is ir.QuadRule.MONTECARLO:
        return _montecarlo_weights(e, var, ctx)
    return _const(grid_weights(q.rule, d.lo, d.hi, m), ctx).reshape(-1, 1)


def _montecarlo_weights(e: ir.Integral, var: _Var, ctx: _Ctx) -> torch.Tensor:
    """Weights `mu_j count_j / (S p_j)` of S indices drawn with replacement, `mu` the measure of
    the domain (1/m on `points`, whose default rule is `mean`; 1 on `index`): an unbiased
    estimate of what the default rule computes. The draws are shared by every integral of
    the call over the same domain and rule, so a ratio of two is self-normalised."""
    q, m = e.quad, var.n
    key = (e.domain, q.samples, q.importance)
    if key in ctx.draws:
        return ctx.draws[key]
    S = q.samples
    dev, dt = ctx.bound.device, ctx.bound.dtype
    if q.importance is None:
        idx = torch.randint(m, (S,), generator=ctx.generator, device=dev)
        counts = torch.bincount(idx, minlength=m).to(dt)
        w = (counts * (m / S)).reshape(-1, 1)  # count_j / (S p_j) with p_j = 1/m
    else:
        with torch.no_grad():
            imp = _eval(q.importance, ctx)  # [*B, 1, m, 1] (batch dims if it reads fields)
            lead = imp.shape[:-3]
            imp = imp.expand(*lead, 1, m, 1).reshape(-1, m)
            if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
                raise InputError(f"the importance of `integral({e.var}: {e.domain})` must be "
                                 "finite and >= 0 at every point", q.span)
            total = imp.sum(-1, keepdim=True)
            if bool((total <= 0).any()):
                raise InputError(f"the importance of `integral({e.var}: {e.domain})` is 0 at "
                                 "every point: nothing can be sampled", q.span)
            p = imp / total
            idx = torch.multinomial(p, S, replacement=True, generator=ctx.generator)
            counts = torch.zeros_like(p).scatter_add_(-1, idx, torch.ones_like(idx, dtype=dt))
            w = torch.where(counts > 0, counts / (S * p.clamp_min(torch.finfo(dt).tiny)),
                            torch.zeros_like(p))
            w = w.reshape(*lead, 1, m, 1)
    if var.domain.kind is DomainKind.POINTS:
        w = w / m  # the measure of `points` is the mean (its default rule); of `index`, the sum
    ctx.draws[key] = w
    return w


def _ratio(num: ir.Integral, den: ir.Integral, ctx: _Ctx) -> torch.Tensor:
    """`integral A / integral B`, with shared exponentials shifted by their max over y."""
    d = ctx.module.ir.domain(num.domain)
    shifts = {}
    if num.quad.rule is not ir.QuadRule.GAUSS and ctx.bound.sizes[d.name] > 0:
        _check_pairs(num, ctx.bound.sizes[d.name], ctx)
        ctx.vars[num.var] = _Var(d, Y_AXIS, ctx.bound.sizes[d.name])
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
