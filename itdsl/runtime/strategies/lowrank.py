"""lowrank: K(x, y) = Σ_t a_t(x)·b_t(y) (`symbolic/strategies/lowrank.py`): two GEMMs,
A·(Bᵀ·Y); under a causal bracket (the recurrence's causal low-rank form) a chunked scan.
Sums with one kernel (a normalised ratio's two integrals) run as one, their insides side by
side. torch autograd gives the gradients.
"""

from __future__ import annotations

import torch

from ...symbolic.strategies.lowrank import LowRankSum
from ..plan_eval import PlanEvaluator
from . import tuning as T
from .common import SumsRunner, broadcast_lead, factors, on, put, ready


def causal_lowrank(A: torch.Tensor, B: torch.Tensor, Y: torch.Tensor, strict: bool,
                   chunk: int | None = None) -> torch.Tensor:
    """out[t] = Σ_{s <= t (or s < t)} (A[t]·B[s]) Y[s]: per chunk a masked L×L product, across
    chunks a running state Σ B[s] Y[s]ᵀ (an exclusive cumulative sum of the chunks' states)."""
    A, B, Y = broadcast_lead(A, B, Y)
    n = A.shape[-2]
    chunk = chunk or T.CHUNK
    seg = T.SEGMENT * chunk
    if n > seg:  # segments one after another, the state carried: a bounded working set
        outs, state = [], None
        for lo in range(0, n, seg):
            a, b, y = (t[..., lo:lo + seg, :] for t in (A, B, Y))
            out = causal_lowrank(a, b, y, strict, chunk)
            if state is not None:
                out = out + a @ state
            step = b.transpose(-1, -2) @ y
            state = step if state is None else state + step
            outs.append(out)
        return torch.cat(outs, dim=-2)
    nc = -(-n // chunk)
    pad = nc * chunk - n
    if pad:
        A, B, Y = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (A, B, Y))
    Ac, Bc, Yc = (t.reshape(*t.shape[:-2], nc, chunk, t.shape[-1]) for t in (A, B, Y))
    S = Ac @ Bc.transpose(-1, -2)  # [*B, nc, L, L]
    keep = torch.ones(chunk, chunk, dtype=torch.bool, device=A.device).tril(-1 if strict else 0)
    out = (S * keep) @ Yc
    Z = Bc.transpose(-1, -2) @ Yc  # [*B, nc, R, C]: each chunk's state
    H = Z.cumsum(-3) - Z  # the state before each chunk
    out = out + Ac @ H
    return out.reshape(*out.shape[:-3], nc * chunk, out.shape[-1])[..., :n, :]


def _lowrank(ev: PlanEvaluator, f: LowRankSum, Y: torch.Tensor) -> torch.Tensor:
    A, B = factors(ev, f.terms, f.sum.over)
    if f.causal is None:
        B, Y = broadcast_lead(B, Y)
        return A @ (B.transpose(-1, -2) @ Y)  # two passes: Σ_y ψ(y) f(y)ᵀ, then φ(x)·that
    return causal_lowrank(A, B, Y, strict=f.causal == "<")


class LowRankRunner(SumsRunner):
    def __init__(self, plan):
        super().__init__(plan)
        groups: dict[tuple, list[LowRankSum]] = {}
        for f in self.form:
            groups.setdefault((f.terms, f.causal, f.sum.over), []).append(f)
        self.groups = {f.sum.step: g for g in groups.values() for f in g}

    def compute(self, ev: PlanEvaluator, f: LowRankSum) -> set[str]:
        group = [g for g in self.groups[f.sum.step]
                 if g is f or ready(ev, g.sum.inside, g.sum.outside)]
        Ys = [on(ev, g.sum.inside, g.sum.over) for g in group]
        Ys = broadcast_lead(*Ys) if len(Ys) > 1 else Ys
        out = _lowrank(ev, f, torch.cat(Ys, dim=-1))
        col = 0
        for g, Y in zip(group, Ys):
            put(ev, g.sum, out[..., col:col + Y.shape[-1]])
            col += Y.shape[-1]
        return {g.sum.step for g in group}


runner = LowRankRunner
