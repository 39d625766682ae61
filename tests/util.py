"""Helpers shared by the tests (one copy only)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.func import functional_call

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def gradcheck_op(op: torch.nn.Module, inputs: dict, params: bool = True, **kw) -> bool:
    """`torch.autograd.gradcheck` of `op(**inputs)` with respect to every floating input
    tensor and (if `params`) every parameter of `op`. Everything must be float64."""
    tensor_names = [k for k, v in inputs.items()
                    if isinstance(v, torch.Tensor) and v.is_floating_point()]
    rest = {k: v for k, v in inputs.items() if k not in tensor_names}
    pnames = [n for n, _ in op.named_parameters()] if params else []
    ptensors = [p.detach().clone().requires_grad_(True) for _, p in op.named_parameters()]
    ptensors = ptensors if params else []
    leaves = [inputs[k].detach().clone().requires_grad_(True) for k in tensor_names] + ptensors

    def f(*ts):
        kwargs = dict(zip(tensor_names, ts[:len(tensor_names)]), **rest)
        if not pnames:
            return op(**kwargs)
        return functional_call(op, dict(zip(pnames, ts[len(tensor_names):])), kwargs=kwargs)

    return torch.autograd.gradcheck(f, leaves, **kw)


def grads(fn, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of `sum(fn() * fixed random cotangent)` with respect to `leaves`."""
    out = fn()
    g = torch.Generator().manual_seed(1234)
    cot = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return list(torch.autograd.grad((out * cot).sum(), leaves, allow_unused=True))


def random_inputs(op, gen=None, sizes=(5, 6, 7, 4), dtype=None) -> dict:
    """Random keyword arguments for a checked operator (`ir.Operator`): coordinates for its
    `points` domains, a size for `grid`/`index` domains no input lives on (a tuple for a
    domain of several axes; nothing for a stencil), a field per input; one size per axis
    (from `sizes`, in declaration order)."""
    from itdsl.frontend.ast import DomainKind
    dtype = dtype or torch.float64
    gen = gen or torch.Generator().manual_seed(0)
    n = {d.name: d.fixed or tuple(sizes[(k + a) % len(sizes)] for a in range(d.naxes))
         for k, d in enumerate(op.domains)}
    fed = {name for i in op.inputs for name in i.domains}
    kw = {}
    for d in op.domains:
        if d.kind is DomainKind.POINTS:
            kw[d.name] = torch.rand(n[d.name][0], d.dim, generator=gen, dtype=dtype)
        elif d.name not in fed and d.fixed is None:
            kw[d.name] = n[d.name][0] if d.naxes == 1 else n[d.name]
    for i in op.inputs:
        axes = tuple(k for name in i.domains for k in n[name])
        shape = axes if i.width is None else (*axes, i.width)
        kw[i.name] = torch.randn(*shape, generator=gen, dtype=dtype)
    return kw


def keys_spline(C: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Cubic convolution (a = −0.75) of the coefficients `C` [..., n] at the points `u` of
    [0, 1] (node k at k/(n − 1), taps beyond the edge clamped): [..., len(u)]."""
    n = C.shape[-1]
    s = u * (n - 1)
    i = torch.floor(s).clamp(0, n - 1)
    out = 0
    for j in range(-1, 3):
        x = (s - (i + j)).abs()
        a = -0.75
        w = torch.where(x <= 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                        torch.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0))
        out = out + w * C[..., (i + j).clamp(0, n - 1).long()]
    return out
