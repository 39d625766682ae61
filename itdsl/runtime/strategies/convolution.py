"""convolution (`symbolic/strategies/convolution.py`): out[i] = Σ_j g(i − j)·Y[j] with the
taps g sampled at grid points, then a depthwise conv1d (few taps) or an FFT (many). torch
autograd gives the gradients.
"""

from __future__ import annotations

import math

import torch

from ...symbolic.strategies.convolution import ConvSum
from ..plan_eval import PlanEvaluator
from . import tuning as T
from .common import SumsRunner, on, put


def _conv(ev: PlanEvaluator, f: ConvSum, Y: torch.Tensor) -> torch.Tensor:
    """out[i] = Σ_j g(i − j) Y[j]: the taps g sampled at grid points, then a depthwise conv1d
    (few taps) or an FFT (many)."""
    over, ps = f.sum.over, f.sum
    c = ev.sides[over].coords
    n = c.shape[0]
    D = n - 1
    if f.half_width is not None and n > 1:
        dom = ev.plan.op.domain(ev.plan.spaces[over].domain)
        h = dom.kind.entry.spacing(dom, n)
        D = min(n - 1, int(math.ceil(f.half_width / h - 1e-9)) + 1)

    def taps(xs, ys):
        at = ev.at({"x": xs, over: ys})
        vals = at.value(ps.kernel)
        if ps.mask is not None:
            m = at.value(ps.mask)
            vals = torch.where(m != 0, vals, torch.zeros((), dtype=vals.dtype, device=vals.device))
        while vals.dim() < 3:
            vals = vals.unsqueeze(0)
        vals = vals.expand(xs.shape[0], ys.shape[0], vals.shape[-1])
        return vals.reshape(xs.shape[0] * ys.shape[0], -1)  # [k, W]

    pos = taps(c[:D + 1], c[:1])  # g(0..D)
    neg = taps(c[:1], c[1:D + 1]) if D > 0 else pos[:0]  # g(-1..-D)
    g = torch.cat([neg.flip(0), pos], dim=0)  # g(-D..D)
    W = max(g.shape[-1], Y.shape[-1])
    g, Y = g.expand(2 * D + 1, W), Y.expand(*Y.shape[:-1], W)
    lead = Y.shape[:-2]
    x = Y.reshape(-1, n, W).transpose(1, 2)  # [N, W, n]
    if 2 * D + 1 <= T.DIRECT_TAPS:
        out = torch.nn.functional.conv1d(x, g.flip(0).t().unsqueeze(1), padding=D, groups=W)
    else:
        size = n + 2 * D
        fx = torch.fft.rfft(x, n=size)
        fg = torch.fft.rfft(g.t(), n=size)  # [W, size//2+1]
        out = torch.fft.irfft(fx * fg, n=size)[..., D:D + n]
    return out.transpose(1, 2).reshape(*lead, n, W)


class ConvolutionRunner(SumsRunner):
    def compute(self, ev: PlanEvaluator, f: ConvSum) -> set[str]:
        put(ev, f.sum, _conv(ev, f, on(ev, f.sum.inside, f.sum.over)))
        return {f.sum.step}


runner = ConvolutionRunner
