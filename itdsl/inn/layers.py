"""The integral layers a converted network is made of: each is a `.it` operator (the version 1
`integral_conv3x3` form for a convolution, `integral_linear` for a linear layer) whose weight
functions are splines with one coefficient per channel of the trained layer, sampled at the
sizes of the network's channel groups on every call.

A channel axis that is a group's is a grid on [0, 1] integrated with the trapezoid rule; one
that is not (the network's input channels, its output classes) stays discrete: its grid is
only ever sampled at its own nodes, where the spline interpolates its coefficients, and its
input axis is summed (`sum`) instead of integrated. The coefficients are the trained weights
divided by the quadrature weights at full size, so the converted layer computes the trained
one exactly there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..domains.rules import RULES
from ..errors import InputError
from ..runtime.params import keys_basis

RULE = {r.name: r for r in RULES}


def quadrature(rule: str, n: int, dtype=torch.float64) -> torch.Tensor:
    """The weights of `rule` ("trapezoid" or "sum") on n points of grid(0, 1): the language's
    own definition (`itdsl/domains/rules.py`)."""
    class _Unit:  # the domain grid(0, 1), as the rules read it
        lo, hi = 0.0, 1.0
    return torch.as_tensor(RULE[rule].weights(_Unit, n), dtype=dtype)


def sample(coef: torch.Tensor, at: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A spline's values at positions `at` in [0, 1], one 1-D tensor per trailing axis of
    `coef` (the leading axes are one spline each): `[..., *len(at)]`."""
    out = coef
    for i, u in enumerate(at):
        axis = coef.dim() - len(at) + i
        B = keys_basis(u.to(coef.dtype)[:, None], coef.shape[axis])  # [m, n]
        out = torch.tensordot(out.movedim(axis, -1), B, dims=([out.dim() - 1], [1]))
        out = out.movedim(-1, axis)
    return out


def node_weights(x: torch.Tensor) -> torch.Tensor:
    """The trapezoid rule's weights on sorted nodes x of [0, 1] (uniform nodes: the language's
    `trapezoid`)."""
    d = x[1:] - x[:-1]
    return torch.cat([d[:1], d[1:] + d[:-1], d[-1:]]) / 2


class Grid:
    """A network's channel axes: each group's size now, and the nodes of those whose nodes
    are trained (`gaps`: m − 1 logits; node i = Σ_{j<i} softplus(gap_j) / Σ softplus, so the
    nodes stay sorted, 0 first and 1 last). Shared by the network and its layers."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes = dict(sizes)
        self.gaps: dict[str, nn.Parameter] = {}

    def tuned(self, group: str | None) -> bool:
        return group is not None and group in self.gaps

    def nodes(self, group: str | None, n: int, like: torch.Tensor) -> torch.Tensor:
        """The nodes of an axis (a discrete one of n points, or a group's), `[m]`."""
        if self.tuned(group):
            c = torch.cumsum(F.softplus(self.gaps[group]), 0)
            x = torch.cat([c.new_zeros(1), c]) / c[-1]
            return x.to(like.dtype)
        m = n if group is None else self.sizes[group]
        return torch.linspace(0, 1, m, dtype=like.dtype, device=like.device)

    def weights(self, group: str | None, n: int, like: torch.Tensor) -> torch.Tensor:
        """The quadrature weights of an input axis: 1 on a discrete one (`sum`), else the
        trapezoid rule on its nodes."""
        if group is None:
            return torch.ones(n, dtype=like.dtype, device=like.device)
        if self.tuned(group):
            return node_weights(self.nodes(group, n, like))
        return quadrature("trapezoid", self.sizes[group], like.dtype).to(like.device)


def conv_source(name: str, k: tuple[int, int], stride: int, offset: int, n_out: int,
                n_in: int, in_rule: str | None, bias: bool, nodes: bool = False) -> str:
    """The `.it` text of a 2-D convolution layer: out(u, q) = c(u) + ∫∫ W(u, v, t) f(v, s·q +
    t + d) over the input channels v (rule `in_rule`; None: one input channel, no axis) and
    the taps t. The output lives on its own lattice Q unless s = 1 and d = 0. With `nodes`,
    the channel axes are points the call gives (U, V) and V's weights an input `q`."""
    same = stride == 1 and offset == 0
    read = ("p" if same else ("q" if stride == 1 else f"{stride}*q")) + " + t"
    if offset:
        read += f" {'+' if offset > 0 else '-'} {abs(offset)}"
    out_var = "p" if same else "q"
    axis = "points(1)" if nodes else "grid(0, 1)"
    u, v = ("u[0]", "v[0]") if nodes else ("u", "v")
    lines = [f"operator {name} {{", f"    domain U = {axis}", "    domain P = index(2)"]
    if not same:
        lines.append("    domain Q = index(2)")
    lines.append(f"    domain T = stencil({int(k[0])}, {int(k[1])})")
    if in_rule is None:
        lines += ["    input  f : P -> R", f"    param  W : spline({n_out}, per = T)"]
        body = f"integral(t: T) W({u}, t) * f({read})"
    else:
        rule = "weights(qv)" if nodes else in_rule
        lines += [f"    domain V = {axis}", "    input  f : V * P -> R",
                  f"    param  W : spline({n_out}, {n_in}, per = T)"]
        if nodes:
            lines.append("    input  qv : V -> R")
        body = f"integral(v: V, t: T) W({u}, {v}, t) * f(v, {read}) with ({rule}, sum)"
    if bias:
        lines.append(f"    param  c : spline({n_out})")
        body = f"c({u}) + " + body
    lines += [f"    output g(u: U, {out_var}: {'P' if same else 'Q'}) = {body}", "}"]
    return "\n".join(lines) + "\n"


def linear_source(name: str, n_out: int, n_in: int, in_rule: str, bias: bool,
                  nodes: bool = False) -> str:
    """The `.it` text of a linear layer: out(u) = c(u) + ∫ W(u, v) f(v) dv (with `nodes`, on
    points the call gives, V's weights an input `q`)."""
    axis = "points(1)" if nodes else "grid(0, 1)"
    u, v = ("u[0]", "v[0]") if nodes else ("u", "v")
    rule = "weights(qv)" if nodes else in_rule
    body = f"integral(v: V) W({u}, {v}) * f(v) with {rule}"
    lines = [f"operator {name} {{", f"    domain U = {axis}", f"    domain V = {axis}",
             "    input  f : V -> R", f"    param  W : spline({n_out}, {n_in})"]
    if nodes:
        lines.append("    input  qv : V -> R")
    if bias:
        lines.append(f"    param  c : spline({n_out})")
        body = f"c({u}) + " + body
    lines += [f"    output g(u: U) = {body}", "}"]
    return "\n".join(lines) + "\n"


def _compile(text: str, name: str) -> nn.Module:
    from ..api import compile_source
    return compile_source(text, target=None)[name]


class IntegralLayer(nn.Module):
    """One converted layer: `op` on uniform grids, and `op_nodes` (the same params) on the
    nodes of `grid` once one of its groups has trained nodes. `out_group` (None: the output
    axis is discrete) names the group of the output channels, `in_group` that of the input
    channels; `grid` is the network's (shared, not a submodule)."""

    def __init__(self, source, opname: str, in_group: str | None, out_group: str | None,
                 n_out: int, n_in: int, grid: Grid, like: torch.Tensor):
        super().__init__()
        self.source, self.opname = source, opname  # source(nodes: bool) -> .it text
        self.in_group, self.out_group = in_group, out_group
        self.n_out, self.n_in = n_out, n_in  # at full size
        self.op = _compile(source(False), opname).to(dtype=like.dtype, device=like.device)
        self.op_nodes = None
        object.__setattr__(self, "grid", grid)

    def _op(self) -> nn.Module:
        """`op`, or `op_nodes` (made on first use, sharing op's params) where nodes are tuned."""
        if not (self.grid.tuned(self.in_group) or self.grid.tuned(self.out_group)):
            return self.op
        if self.op_nodes is None:
            nodes = _compile(self.source(True), self.opname)
            for name, p in self.op.named_parameters():
                setattr(nodes, name, p)
            self.op_nodes = nodes
        return self.op_nodes

    def out_size(self) -> int:
        return self.n_out if self.out_group is None else self.grid.sizes[self.out_group]

    def _check_in(self, got: int, what: str) -> None:
        """The input's channels are the axis's size now (a discrete axis keeps its own)."""
        want = self.n_in if self.in_group is None else self.grid.sizes[self.in_group]
        if got != want:
            raise InputError(f"this layer takes {want} input {what}, got {got}",
                             hint="the converted net takes inputs of the trained model's shape")

    def _axes(self, like: torch.Tensor, n_in: int | None = None) -> dict:
        """The keyword arguments of the channel axes: sizes, or nodes and weights."""
        n_in = n_in or self.n_in
        if self._op() is self.op:
            return {"U": self.out_size()}
        g = self.grid
        kw = {"U": g.nodes(self.out_group, self.n_out, like)[:, None]}
        if not getattr(self, "single", False):
            kw["V"] = g.nodes(self.in_group, n_in, like)[:, None]
            kw["qv"] = g.weights(self.in_group, n_in, like)
        return kw

    def _sampled(self, n_in: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """W sampled at the output and input nodes `[..., m_out, m_in]` (the output's only
        for one input channel), the bias at the output nodes, the input's weights."""
        W = self.op.W.detach()
        g = self.grid
        with torch.no_grad():
            u = g.nodes(self.out_group, self.n_out, W)
            q = g.weights(self.in_group, n_in, W)
            v = g.nodes(self.in_group, n_in, W)
            w = sample(W, (u,) if getattr(self, "single", False) else (u, v))
            b = sample(self.op.c.detach(), (u,)) if self.has_bias else None
        return w, b, q


class IntegralConv2d(IntegralLayer):
    """A Conv2d (odd kernel, square stride, dilation 1, groups 1) as an integral layer, from
    its weight `[n_out, n_in, kh, kw]` and bias (None: none), a BatchNorm folded in."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, stride: int,
                 padding: tuple[int, int], in_group: str | None, out_group: str | None,
                 grid: Grid):
        n_out, n_in, *k = w.shape
        k = tuple(k)
        self.stride, self.padding = stride, tuple(padding)
        offset = (k[0] - 1) // 2 - padding[0]
        self.has_bias = bias = b is not None
        self.single = n_in == 1
        in_rule = None if n_in == 1 else ("sum" if in_group is None else "trapezoid")
        super().__init__(lambda nodes: conv_source("conv", k, stride, offset, n_out, n_in,
                                                   in_rule, bias, nodes),
                         "conv", in_group, out_group, n_out, n_in, grid, w)
        self.k, self.offset = k, offset
        w64 = w.detach().to(torch.float64)
        with torch.no_grad():
            if self.single:
                self.op.W.copy_(w64[:, 0].permute(1, 2, 0))  # [kh, kw, n_out]
            else:
                q = quadrature(in_rule, n_in).to(w.device)
                self.op.W.copy_((w64 / q[None, :, None, None]).permute(2, 3, 0, 1))
            if self.has_bias:
                self.op.c.copy_(b.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise InputError(f"a converted Conv2d takes [B, C, H, W] inputs, got "
                             f"{list(x.shape)}")
        self._check_in(x.shape[1], "channels")
        H, W = x.shape[-2:]
        kw = {"f": x[:, 0] if self.single else x, **self._axes(x, x.shape[1])}
        if not (self.stride == 1 and self.offset == 0):
            kw["Q"] = tuple((n + 2 * p - k) // self.stride + 1
                            for n, p, k in zip((H, W), self.padding, self.k))
        return self._op()(**kw)

    def export(self, n_in: int) -> nn.Conv2d:
        """A Conv2d at the current sizes (`n_in` input channels): the splines sampled at the
        nodes, times the input axis's quadrature weights."""
        w, b, q = self._sampled(n_in)
        w = w.permute(2, 0, 1)[:, None] if self.single else \
            w.permute(2, 3, 0, 1) * q[None, :, None, None]
        return _filled(nn.Conv2d(w.shape[1], w.shape[0], self.k, stride=self.stride,
                                 padding=self.padding, bias=b is not None, dtype=w.dtype,
                                 device=w.device), w, b)


class IntegralLinear(IntegralLayer):
    """A Linear layer as an integral layer, from its weight `[n_out, n_in]` and bias."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, in_group: str | None,
                 out_group: str | None, grid: Grid):
        n_out, n_in = w.shape
        if n_in < 2:
            raise InputError(f"a Linear layer with {n_in} input feature cannot be converted",
                             hint="an integral layer integrates over at least 2 input channels")
        self.has_bias = bias = b is not None
        in_rule = "sum" if in_group is None else "trapezoid"
        super().__init__(lambda nodes: linear_source("linear", n_out, n_in, in_rule, bias,
                                                     nodes),
                         "linear", in_group, out_group, n_out, n_in, grid, w)
        q = quadrature(in_rule, n_in).to(w.device)
        with torch.no_grad():
            self.op.W.copy_(w.detach().to(torch.float64) / q[None, :])
            if self.has_bias:
                self.op.c.copy_(b.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_in(x.shape[-1], "features")
        return self._op()(f=x, **self._axes(x, x.shape[-1]))

    def export(self, n_in: int) -> nn.Linear:
        w, b, q = self._sampled(n_in)
        w = w * q[None, :]
        return _filled(nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype,
                                 device=w.device), w, b)


def _filled(layer: nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> nn.Module:
    """A plain layer holding the sampled weight and bias."""
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)
    return layer


def count(ratio: float, n: int) -> int:
    """The size a group of n channels keeps at `ratio`: round(ratio · n), at least 2."""
    if not 0 < ratio <= 1:
        raise InputError(f"a resampling ratio is in (0, 1], got {ratio}")
    return min(n, max(2, int(math.floor(ratio * n + 0.5))))


class IntegralBatchNorm(nn.Module):
    """A BatchNorm over a channel axis in a net that trains. On a group's axis, γ, β and the
    running statistics are 1-D splines over the axis (one coefficient per trained channel),
    sampled at the group's nodes: at full size on the uniform grid it is the BatchNorm itself
    (and updates its running statistics); resampled, it normalises by the batch's statistics
    in training (the running ones, kept at full size, untouched) and by the sampled running
    ones in evaluation. On a discrete axis (`group` None: the net's outputs, or channels an
    add ties to its input) it is the BatchNorm at every size. In evaluation either uses the
    statistics `IntegralNet.calibrate` measured, while every group is at the sizes and nodes
    they were measured at (the input of a BatchNorm depends on every layer before it)."""

    def __init__(self, bn: nn.Module, group: str | None, grid: Grid):
        super().__init__()  # (`convert` refuses a BatchNorm without running statistics)
        self.group, self.n, self.eps, self.momentum = group, bn.num_features, bn.eps, bn.momentum
        self.dims = 4 if isinstance(bn, nn.BatchNorm2d) else 2
        self.weight = nn.Parameter(bn.weight.detach().clone()) if bn.affine else None
        self.bias = nn.Parameter(bn.bias.detach().clone()) if bn.affine else None
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked.detach().clone())
        # statistics measured by `calibrate` and the grid they hold for (`_at`): None until
        # then; in the state_dict once set
        for name in _CALIBRATED:
            self.register_buffer(name, None)
        self._collect: list | None = None  # the batches' statistics, during `calibrate`
        object.__setattr__(self, "grid", grid)

    def _full(self) -> bool:
        return self.group is None or (self.grid.sizes[self.group] == self.n
                                      and not self.grid.tuned(self.group))

    def _at(self) -> list[int]:
        """Every group's size and whether its nodes are trained, in the groups' order."""
        g = self.grid
        return [v for k in sorted(g.sizes) for v in (g.sizes[k], int(g.tuned(k)))]

    def affine(self, like: torch.Tensor):
        """(γ, β, mean, var) at the group's nodes (None where there is none); mean and var
        those `calibrate` measured here, if it did."""
        if self.calibrated_for is not None and self.calibrated_for.tolist() == self._at():
            w, b, _, _ = self._sampled(like)
            return w, b, self.calibrated_mean, self.calibrated_var
        return self._sampled(like)

    def _sampled(self, like: torch.Tensor):
        if self._full():
            return self.weight, self.bias, self.running_mean, self.running_var
        u = self.grid.nodes(self.group, self.n, like)
        at = (u,)
        return (None if self.weight is None else sample(self.weight, at),
                None if self.bias is None else sample(self.bias, at),
                sample(self.running_mean, at), sample(self.running_var, at).clamp_min(0))

    def _momentum(self) -> float:
        """The running statistics' update factor, as torch's BatchNorm: `momentum`, or with
        momentum=None the cumulative average over the batches so far."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._collect is not None:  # calibrating: the batch's statistics, recorded
            w, b, _, _ = self._sampled(x)
            reduce = [0] + list(range(2, x.dim()))
            var, mean = torch.var_mean(x.detach(), reduce, correction=1 if x.numel() >
                                       x.shape[1] else 0)
            self._collect.append((mean, var))
            return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        if self.training:
            w, b, mean, var = self._sampled(x)
            if self._full():  # the BatchNorm itself: its running statistics updated
                return F.batch_norm(x, mean, var, w, b, True, self._momentum(), self.eps)
            # the batch's statistics; the running ones stay those of full size
            return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        w, b, mean, var = self.affine(x)
        if mean.requires_grad or var.requires_grad:  # sampled at nodes being trained
            shape = (-1,) + (1,) * (x.dim() - 2)  # (tune_grid): F.batch_norm takes no grad
            y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
            return y if w is None else torch.addcmul(b.view(shape), y, w.view(shape))
        return F.batch_norm(x, mean, var, w, b, False, 0.0, self.eps)

    def calibrated(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the mean of the batches' means and of their (unbiased) variances as the
        statistics at the current nodes — what a torch BatchNorm with momentum=None, reset,
        accumulates over the same batches in training mode."""
        self.calibrated_mean = torch.stack([m for m, _ in batches]).mean(0)
        self.calibrated_var = torch.stack([v for _, v in batches]).mean(0)
        self.calibrated_for = torch.tensor(self._at(), dtype=torch.long)

    def clear_calibration(self) -> None:
        for name in _CALIBRATED:
            setattr(self, name, None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the calibrated statistics are buffers only once measured: take them (or their
        # absence) from the state_dict, then load the rest as usual
        found = {name: state_dict.pop(prefix + name, None) for name in _CALIBRATED}
        self.clear_calibration()
        # (saved before the count was kept: start it where it is)
        state_dict.setdefault(prefix + "num_batches_tracked", self.num_batches_tracked)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if any(t is None for t in found.values()):  # none, or a partial set: the missing
            if any(t is not None for t in found.values()):  # keys are reported as missing
                args[2].extend(prefix + k for k, t in found.items() if t is None)
            return
        like = self.running_mean  # (the module's dtype and device, not the file's)
        self.calibrated_mean = found["calibrated_mean"].detach().to(like).clone()
        self.calibrated_var = found["calibrated_var"].detach().to(like).clone()
        self.calibrated_for = found["calibrated_for"].detach().to("cpu", torch.long).clone()

    def export(self, dims: int) -> nn.Module:
        """A plain BatchNorm1d/2d at the current size, its parameters and statistics
        sampled (or calibrated)."""
        w, b, mean, var = (None if t is None else t.detach().clone()
                           for t in self.affine(self.running_mean))
        bn = (nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d)(
            mean.shape[0], eps=self.eps, momentum=self.momentum, affine=w is not None,
            dtype=mean.dtype, device=mean.device)
        with torch.no_grad():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            if w is not None:
                bn.weight.copy_(w)
                bn.bias.copy_(b)
        return bn.train(self.training)


_CALIBRATED = ("calibrated_mean", "calibrated_var", "calibrated_for")
