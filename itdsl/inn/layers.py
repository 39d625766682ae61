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


def sample(coef: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """A spline's values at the nodes of grids of `sizes` points on [0, 1] (one size per
    trailing axis of `coef`, the leading axes are one spline each): `[..., *sizes]`."""
    out = coef
    for i, m in enumerate(sizes):
        axis = coef.dim() - len(sizes) + i
        n = coef.shape[axis]
        u = torch.linspace(0, 1, m, dtype=coef.dtype, device=coef.device)[:, None]
        B = keys_basis(u, n)  # [m, n]
        out = torch.tensordot(out.movedim(axis, -1), B, dims=([out.dim() - 1], [1]))
        out = out.movedim(-1, axis)
    return out


def _fmt(x: int) -> str:
    return str(int(x))


def conv_source(name: str, k: tuple[int, int], stride: int, offset: int, n_out: int,
                n_in: int, in_rule: str | None, bias: bool) -> str:
    """The `.it` text of a 2-D convolution layer: out(u, q) = c(u) + ∫∫ W(u, v, t) f(v, s·q +
    t + d) over the input channels v (rule `in_rule`; None: one input channel, no axis) and
    the taps t. The output lives on its own lattice Q unless s = 1 and d = 0."""
    same = stride == 1 and offset == 0
    read = ("p" if same else ("q" if stride == 1 else f"{stride}*q")) + " + t"
    if offset:
        read += f" {'+' if offset > 0 else '-'} {abs(offset)}"
    out_var = "p" if same else "q"
    lines = [f"operator {name} {{",
             "    domain U = grid(0, 1)",
             "    domain P = index(2)"]
    if not same:
        lines.append("    domain Q = index(2)")
    lines.append(f"    domain T = stencil({_fmt(k[0])}, {_fmt(k[1])})")
    if in_rule is None:
        lines += ["    input  f : P -> R",
                  f"    param  W : spline({n_out}, per = T)"]
        body = f"integral(t: T) W(u, t) * f({read})"
    else:
        lines += ["    domain V = grid(0, 1)",
                  "    input  f : V * P -> R",
                  f"    param  W : spline({n_out}, {n_in}, per = T)"]
        body = f"integral(v: V, t: T) W(u, v, t) * f(v, {read}) with ({in_rule}, sum)"
    if bias:
        lines.append(f"    param  c : spline({n_out})")
        body = "c(u) + " + body
    lines += [f"    output g(u: U, {out_var}: {'P' if same else 'Q'}) = {body}", "}"]
    return "\n".join(lines) + "\n"


def linear_source(name: str, n_out: int, n_in: int, in_rule: str, bias: bool) -> str:
    """The `.it` text of a linear layer: out(u) = c(u) + ∫ W(u, v) f(v) dv."""
    body = f"integral(v: V) W(u, v) * f(v) with {in_rule}"
    lines = [f"operator {name} {{",
             "    domain U = grid(0, 1)",
             "    domain V = grid(0, 1)",
             "    input  f : V -> R",
             f"    param  W : spline({n_out}, {n_in})"]
    if bias:
        lines.append(f"    param  c : spline({n_out})")
        body = "c(u) + " + body
    lines += [f"    output g(u: U) = {body}", "}"]
    return "\n".join(lines) + "\n"


def _compile(text: str, name: str) -> nn.Module:
    from ..api import compile_source
    return compile_source(text, target=None)[name]


class IntegralLayer(nn.Module):
    """One converted layer. `sizes` is the network's (shared) map from group name to its
    current number of channels; `out_group` (None: the output axis is discrete) names the
    group of the output channels, `in_group` that of the input channels."""

    def __init__(self, text: str, opname: str, in_group: str | None, out_group: str | None,
                 n_out: int, n_in: int, sizes: dict[str, int]):
        super().__init__()
        self.text, self.in_group, self.out_group = text, in_group, out_group
        self.n_out, self.n_in = n_out, n_in  # at full size
        self.op = _compile(text, opname)
        self.sizes = sizes

    def out_size(self) -> int:
        return self.n_out if self.out_group is None else self.sizes[self.out_group]

    def _in_rule(self) -> str:
        return "sum" if self.in_group is None else "trapezoid"


class IntegralConv2d(IntegralLayer):
    """A Conv2d (odd kernel, square stride, dilation 1, groups 1) as an integral layer, from
    its weight `[n_out, n_in, kh, kw]` and bias (None: none), a BatchNorm folded in."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, stride: int,
                 padding: tuple[int, int], in_group: str | None, out_group: str | None,
                 sizes: dict[str, int]):
        n_out, n_in, *k = w.shape
        k = tuple(k)
        self.stride, self.padding = stride, tuple(padding)
        offset = (k[0] - 1) // 2 - padding[0]
        self.has_bias = b is not None
        in_rule = None if n_in == 1 else ("sum" if in_group is None else "trapezoid")
        text = conv_source("conv", k, stride, offset, n_out, n_in, in_rule, self.has_bias)
        super().__init__(text, "conv", in_group, out_group, n_out, n_in, sizes)
        self.k, self.offset, self.single = k, offset, n_in == 1
        self.op.to(dtype=w.dtype, device=w.device)
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
        H, W = x.shape[-2:]
        kw = {"f": x[:, 0] if self.single else x, "U": self.out_size()}
        if not (self.stride == 1 and self.offset == 0):
            kw["Q"] = tuple((n + 2 * p - k) // self.stride + 1
                            for n, p, k in zip((H, W), self.padding, self.k))
        return self.op(**kw)

    def weights(self, n_in: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The plain layer's weight `[m_out, n_in, kh, kw]` and bias at the current sizes:
        the splines sampled there, times the input axis's quadrature weights."""
        m = self.out_size()
        W = self.op.W.detach()
        if self.single:
            w = sample(W, (m,)).permute(2, 0, 1)[:, None]
        else:
            q = quadrature(self._in_rule(), n_in, W.dtype)
            w = sample(W, (m, n_in)).permute(2, 3, 0, 1) * q[None, :, None, None]
        b = sample(self.op.c.detach(), (m,)) if self.has_bias else None
        return w, b

    def export(self, n_in: int) -> nn.Conv2d:
        w, b = self.weights(n_in)
        conv = nn.Conv2d(w.shape[1], w.shape[0], self.k, stride=self.stride,
                         padding=self.padding, bias=b is not None, dtype=w.dtype,
                         device=w.device)
        with torch.no_grad():
            conv.weight.copy_(w)
            if b is not None:
                conv.bias.copy_(b)
        return conv


class IntegralLinear(IntegralLayer):
    """A Linear layer as an integral layer, from its weight `[n_out, n_in]` and bias."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, in_group: str | None,
                 out_group: str | None, sizes: dict[str, int]):
        n_out, n_in = w.shape
        if n_in < 2:
            raise InputError(f"a Linear layer with {n_in} input feature cannot be converted",
                             hint="an integral layer integrates over at least 2 input channels")
        self.has_bias = b is not None
        in_rule = "sum" if in_group is None else "trapezoid"
        text = linear_source("linear", n_out, n_in, in_rule, self.has_bias)
        super().__init__(text, "linear", in_group, out_group, n_out, n_in, sizes)
        self.op.to(dtype=w.dtype, device=w.device)
        q = quadrature(in_rule, n_in).to(w.device)
        with torch.no_grad():
            self.op.W.copy_(w.detach().to(torch.float64) / q[None, :])
            if self.has_bias:
                self.op.c.copy_(b.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(f=x, U=self.out_size())

    def weights(self, n_in: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.out_size()
        W = self.op.W.detach()
        w = sample(W, (m, n_in)) * quadrature(self._in_rule(), n_in, W.dtype)[None, :]
        b = sample(self.op.c.detach(), (m,)) if self.has_bias else None
        return w, b

    def export(self, n_in: int) -> nn.Linear:
        w, b = self.weights(n_in)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype,
                        device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        return lin


def count(ratio: float, n: int) -> int:
    """The size a group of n channels keeps at `ratio`: round(ratio · n), at least 2."""
    if not 0 < ratio <= 1:
        raise InputError(f"a resampling ratio is in (0, 1], got {ratio}")
    return min(n, max(2, int(math.floor(ratio * n + 0.5))))
