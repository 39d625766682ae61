"""recurrence (`symbolic/strategies/recurrence.py`): decaying exponentials by a chunked
scan built from exp(rate·Δ) with Δ >= 0 (`decay_scan`), or a finite-rank kernel under the
causal bracket by the low-rank runner's chunked scan. torch autograd gives the gradients.
"""

from __future__ import annotations

import torch

from ...symbolic.plan import X_SIDE
from ...symbolic.strategies.recurrence import DecaySum
from ..plan_eval import PlanEvaluator
from . import tuning as T
from .common import SumsRunner, on, put
from .lowrank import LowRankRunner


def decay_scan(u: torch.Tensor, r: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """y[t] = Σ_{s <= t} exp(r·(t − s)) u[s] along dim -2 (r per channel, <= 0 for a decay).
    Inside a chunk the L×L matrix exp(r·Δ) (Δ >= 0); across chunks the same scan over the
    chunks' end states with rate r·L, recursively. Only exp(r·Δ) of Δ >= 0 is ever formed,
    never exp(r·t)·exp(−r·s), so long sequences stay finite."""
    n, C = u.shape[-2], u.shape[-1]
    r = r.expand(C)
    chunk = chunk or T.CHUNK
    L = min(chunk, n)
    nc = -(-n // L)
    if nc * L != n:
        u = torch.nn.functional.pad(u, (0, 0, 0, nc * L - n))
    d = torch.arange(L, dtype=u.dtype, device=u.device)
    D = d[:, None] - d[None, :]
    G = torch.where((D >= 0)[..., None], torch.exp(D.clamp_min(0)[..., None] * r), 0)  # [L,L,C]
    uc = u.reshape(*u.shape[:-2], nc, L, C)
    intra = torch.einsum("tsc,...ksc->...ktc", G, uc)
    if nc > 1:
        H = decay_scan(intra[..., -1, :], r * L, chunk)  # [*, nc, C]: state at each chunk's end
        H = torch.nn.functional.pad(H[..., :-1, :], (0, 0, 1, 0))
        intra = intra + torch.exp((d + 1)[:, None] * r) * H[..., None, :]
    return intra.reshape(*u.shape[:-2], nc * L, C)[..., :n, :]


def _decay(ev: PlanEvaluator, f: DecaySum, Y: torch.Tensor) -> torch.Tensor:
    over = f.sum.over
    c = ev.sides[over].coords  # [n, 1]
    step = (c[1] - c[0]) if c.shape[0] > 1 else torch.ones_like(c[0])
    pts = torch.stack([c[0], c[0] + step])  # x0 and the next point
    total = None
    for coef, expo in f.exps:
        E = ev.at({"x": pts, over: c[:1]}).value(expo)  # [2, 1, W]
        E = E.reshape(2, -1) if E.dim() >= 2 else E.reshape(1, -1).expand(2, -1)
        rate, g0 = E[1] - E[0], torch.exp(E[0])
        k = on(ev, coef, X_SIDE)[..., :1, :].reshape(-1) * g0  # c_k · exp(E_k(0))
        W = max(Y.shape[-1], rate.shape[-1], k.shape[-1])
        u = Y.expand(*Y.shape[:-1], W)
        y = decay_scan(u, rate.expand(W))
        if f.causal == "<":
            y = y - u
        y = y * k.expand(W)
        total = y if total is None else total + y
    return total


class DecayRunner(SumsRunner):
    def compute(self, ev: PlanEvaluator, f: DecaySum) -> set[str]:
        put(ev, f.sum, _decay(ev, f, on(ev, f.sum.inside, f.sum.over)))
        return {f.sum.step}


def runner(plan):
    """Exponentials or a causal low-rank kernel: the rule that fired made every part one kind."""
    return DecayRunner(plan) if isinstance(plan.form[0], DecaySum) else LowRankRunner(plan)
