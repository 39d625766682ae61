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
from .common import Declined, SumsRunner, on, put


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

    def taps(e, xs, ys):
        vals = ev.at({"x": xs, over: ys}).value(e)
        while vals.dim() < 3:
            vals = vals.unsqueeze(0)
        vals = vals.expand(xs.shape[0], ys.shape[0], vals.shape[-1])
        return vals.reshape(xs.shape[0] * ys.shape[0], -1)  # [k, W]

    def signed(e):  # e at the pairs (d, 0) and (0, -d): [2D + 1, W] for d = -D..D
        pos = taps(e, c[:D + 1], c[:1])
        neg = taps(e, c[:1], c[1:D + 1]) if D > 0 else pos[:0]
        return torch.cat([neg.flip(0), pos], dim=0)

    g = signed(ps.kernel)  # g(-D..D)
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(g).all()):
        # a tap that overflowed (or is NaN) would reach every output through the FFT, and
        # through conv1d's zero padding (inf · 0), where the definition has it in the sums
        # of its own pairs only: the kernels, which take each pair on its own
        raise Declined("a tap of the kernel is NaN or infinite")
    mask = None
    if ps.mask is not None:
        mask = signed(ps.mask) != 0
        g = torch.where(mask, g, torch.zeros((), dtype=g.dtype, device=g.device))
    W = max(g.shape[-1], Y.shape[-1])
    g, Y = g.expand(2 * D + 1, W), Y.expand(*Y.shape[:-1], W)
    lead = Y.shape[:-2]
    x = Y.reshape(-1, n, W).transpose(1, 2)  # [N, W, n]
    if 2 * D + 1 <= T.DIRECT_TAPS:
        out = torch.nn.functional.conv1d(x, g.flip(0).t().unsqueeze(1), padding=D, groups=W)
    else:
        size = n + 2 * D
        gt = g.t()
        scale = not _fft_in_range(x, gt, size)
        if scale:  # each signal scaled by a power of 2 near its largest magnitude (exact), so
            # the transforms' sums stay inside the dtype's range wherever the convolution does
            sx, sg = _pow2_scale(x), _pow2_scale(gt)  # [N, W, 1], [W, 1]
            x, gt = x / sx, gt / sg
        fg = torch.fft.rfft(gt, n=size)  # [W, size//2+1]
        out = torch.fft.irfft(torch.fft.rfft(x, n=size) * fg, n=size)[..., D:D + n]
        if scale:
            out = out * sx * sg
    out = out.transpose(1, 2).reshape(*lead, n, W)
    if mask is not None and f.edges:
        out = _edge_pairs(ev, f, c, D, g, mask, Y, out)
    return out


def _fft_in_range(x: torch.Tensor, g: torch.Tensor, size: int) -> bool:
    """Whether the FFT's sums of x and g (each at most size² · max |x| · max |g|) stay well
    inside the dtype's range, so no scaling is needed: a read of x, no copy. Always False
    under torch.compile (no branch on values there: the scaled form is the graph)."""
    if torch.compiler.is_compiling():
        return False
    bound = x.detach().abs().amax() * g.detach().abs().amax() * float(size) ** 2
    return bool(bound < torch.finfo(x.dtype).max * 2.0 ** -8)


def _pow2_scale(v: torch.Tensor) -> torch.Tensor:
    """2^e with 2^(e−1) ≤ max |v| < 2^e over the last axis (1 where v is all 0), detached: the
    convolution is linear, so dividing a signal by it and multiplying the result back changes
    no bit but the range its FFT's sums reach. A NaN or inf in v gives a NaN or inf scale,
    spread over the row as the FFT itself spreads it."""
    m = v.detach().abs().amax(-1, keepdim=True)
    m = torch.where(m == 0, torch.ones((), dtype=m.dtype, device=m.device), m)
    _, e = torch.frexp(m)
    return torch.ldexp(torch.ones_like(m), e)


def _edge_pairs(ev: PlanEvaluator, f: ConvSum, c: torch.Tensor, D: int, g: torch.Tensor,
                mask: torch.Tensor, Y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The mask decided pair by pair on the diagonals where a bracket's edge falls (the
    reference and the kernels round each pair's x − y on its own: with an edge on a grid
    point, some pairs of one diagonal are in and some out). The taps decided each diagonal
    once; where a pair decides otherwise, its term is added or taken away."""
    over, n = f.sum.over, c.shape[0]
    dom = ev.plan.op.domain(ev.plan.spaces[over].domain)
    h = dom.kind.entry.spacing(dom, n) if n > 1 else 1.0
    # a pair can decide otherwise than its tap only where the edge is within rounding of the
    # diagonal's x − y = d·h (a few ulps of the coordinates; generously): decided from the
    # sizes alone, so a call whose edges fall between grid points pays nothing
    scale = max(abs(dom.lo or 0.0), abs(dom.hi or 0.0), max(abs(e) for e in f.edges), 1.0)
    tol = 64 * torch.finfo(Y.dtype).eps * scale
    diagonals = {d for e in f.edges if e != 0 for d in (math.floor(e / h), math.ceil(e / h))
                 if 0 < abs(d) <= D and abs(d * h - e) <= tol}  # (x − y = 0: exact)
    for d in sorted(diagonals):
        lo, hi = max(0, d), min(n, n + d)  # the rows i with a pair (i, i − d)
        keep = ev.at_pairs({"x": c[lo:hi], over: c[lo - d:hi - d]}).value(f.sum.mask)
        keep = keep.reshape(*keep.shape[:-3], -1)[..., 0].expand(hi - lo) != 0
        tap = mask[d + D].reshape(-1)[:1].to(out.dtype)  # the diagonal's decision, once
        sign = keep.to(out.dtype) - tap  # +1: add the pair's term, −1: take it away, 0: same
        gd = ev.at({"x": c[d:d + 1] if d > 0 else c[:1],
                    over: c[:1] if d > 0 else c[-d:-d + 1]}).value(f.sum.kernel).reshape(-1)
        term = Y[..., lo - d:hi - d, :] * (sign[:, None] * gd)  # (no branch on values: it
        # traces as one graph; a pair deciding as its tap adds an exact 0, not 0 · inf)
        term = torch.where(sign[:, None] != 0, term, torch.zeros((), dtype=term.dtype,
                                                                 device=term.device))
        out = out + torch.nn.functional.pad(term, (0, 0, lo, n - hi))
    return out


class ConvolutionRunner(SumsRunner):
    def compute(self, ev: PlanEvaluator, f: ConvSum) -> set[str]:
        put(ev, f.sum, _conv(ev, f, on(ev, f.sum.inside, f.sum.over)))
        return {f.sum.step}


runner = ConvolutionRunner
