"""Learnable params of an operator as torch objects, and the spline they may hold.

`R` and `R^C` params are `nn.Parameter`s (shape `()` and `(C,)`), an `mlp` is an
`nn.Sequential` of `nn.Linear` and activation modules, a `spline(n1, n2)` is an
`nn.Parameter` of its `n1 x n2` coefficients (`spline(n1, n2, per = T)`: `[k1, k2, n1, n2]`,
one spline per point of the stencil T).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import CheckError
from ..frontend import ir
from ..frontend.ast import ParamKind
from ..functions import FUNCTIONS, MLP_ONLY

# `act = name` of an mlp: the torch module its entry in `itdsl.functions` names
ACTIVATION_MODULES = {**{name: f.module for name, f in FUNCTIONS.items() if f.module},
                      **{name: module for name, (module, _) in MLP_ONLY.items()}}
CUBIC_A = -0.75  # the cubic-convolution parameter (Keys 1981), as in INN and OpenCV


def _fill(t: torch.Tensor, init, default) -> torch.Tensor:
    kind, args = (init.kind, init.args) if init is not None else default
    with torch.no_grad():
        if kind == "const":
            t.fill_(args[0])
        elif kind == "normal":
            t.normal_(0.0, args[0])
        elif kind == "uniform":
            t.uniform_(args[0], args[1])
    return t


def make_param(p: ir.Param) -> nn.Module | nn.Parameter:
    """A fresh torch object for one `.it` param, initialised as declared."""
    if p.kind is ParamKind.REAL:
        shape = () if p.width is None else (p.width,)
        return nn.Parameter(_fill(torch.empty(shape), p.init, ("const", (0.0,))))
    if p.kind is ParamKind.MLP:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(p.sizes, p.sizes[1:])):
            lin = nn.Linear(a, b)
            if p.init is not None:
                _fill(lin.weight, p.init, None)
                with torch.no_grad():
                    lin.bias.zero_()
            layers.append(lin)
            if i < len(p.sizes) - 2:
                layers.append(ACTIVATION_MODULES[p.act](nn))
        return nn.Sequential(*layers)
    bound = 1.0 / math.sqrt(p.sizes[-1])  # like nn.Linear's default, fan-in = last axis
    return nn.Parameter(_fill(torch.empty(p.shape), p.init, ("uniform", (-bound, bound))))


def register_params(module: nn.Module, op: ir.Operator) -> None:
    """Attach every param of `op` to `module` under its `.it` name."""
    for p in op.params:
        if hasattr(module, p.name):
            raise CheckError(f"the param name `{p.name}` collides with an attribute of the "
                             "operator's torch module", p.span, "rename the param")
        value = make_param(p)
        if isinstance(value, nn.Parameter):
            module.register_parameter(p.name, value)
        else:
            module.add_module(p.name, value)


def cubic_weights(frac: torch.Tensor) -> list[torch.Tensor]:
    """Cubic-convolution weights of the taps at offsets -1, 0, 1, 2 for a fraction in [0, 1]."""
    a = CUBIC_A

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(1 + frac), near(frac), near(1 - frac), far(2 - frac)]


def spline_taps(u: torch.Tensor, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Indices and weights of the four taps of node grid `k/(n-1)` at positions `u`.

    `u` is clamped to [0, 1]; taps beyond the edge are clamped to it.
    """
    t = u.clamp(0.0, 1.0) * (n - 1)
    base = torch.floor(t).clamp(max=n - 1)
    frac = t - base
    base = base.long()
    idx = [(base + off).clamp(0, n - 1) for off in (-1, 0, 1, 2)]
    return idx, cubic_weights(frac)


def spline_eval(coef: torch.Tensor, args: list[torch.Tensor]) -> torch.Tensor:
    """Evaluate a 1-D or 2-D cubic-convolution spline with coefficients `coef` at `args`
    from its four taps per axis (the reference's way; autograd differentiates it)."""
    if coef.dim() == 1:
        idx, w = spline_taps(args[0], coef.shape[0])
        return sum(wi * coef[ii] for ii, wi in zip(idx, w))
    (iu, wu), (iv, wv) = (spline_taps(a, n) for a, n in zip(args, coef.shape))
    out = 0
    for ia, wa in zip(iu, wu):
        row = sum(wb * coef[ia, ib] for ib, wb in zip(iv, wv))
        out = out + wa * row
    return out


def keys_basis(u: torch.Tensor, n: int, deriv: int = 0) -> torch.Tensor:
    """The weights of all n nodes at `u` (`[..., 1]` -> `[..., n]`), in closed form: node p
    gets W(t - p), and the edge nodes also collect the taps clamped onto them:
    W(t + 1) for node 0 and W(t - n) for node n - 1, with t = clamp(u, 0, 1) (n - 1).
    With `deriv=1`, d/du of those weights (0 where u is clamped)."""
    a = CUBIC_A
    t = u.clamp(0.0, 1.0) * (n - 1)
    p = torch.arange(n, dtype=u.dtype, device=u.device)
    d = t - p
    extra = torch.zeros_like(d)
    if n > 0:
        first = (p == 0).to(u.dtype)
        last = (p == n - 1).to(u.dtype)
        extra = first * _keys(t + 1, a, deriv) + last * _keys(t - n, a, deriv)
    w = _keys(d, a, deriv) + extra
    if deriv:
        w = w * (((u >= 0) & (u <= 1)).to(u.dtype) * (n - 1))
    return w


def _keys(d: torch.Tensor, a: float, deriv: int) -> torch.Tensor:
    """The cubic-convolution kernel W(d) (or W'(d)), zero for |d| >= 2."""
    x = d.abs()
    if deriv == 0:
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    else:
        near = torch.sign(d) * (3 * (a + 2) * x - 2 * (a + 3)) * x
        far = torch.sign(d) * ((3 * a * x - 10 * a) * x + 8 * a)
    # a NaN argument gives NaN weights, as the reference's taps do
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.where(x.isnan(), x, 0.0)))
