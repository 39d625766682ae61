"""Evidence (b): the learnable kernel operator becomes the special cases. A mixer of
`itdsl.nn` (its kernel an MLP of the two positions and the two tokens' keys) is fitted by
distillation to a teacher — a Conv1d, a softmax attention layer, an exponential moving
average — on random sequences, and its relative L2 error measured on held-out ones.

    python -m experiments.itnet.distill [--steps 3000] [--seed 0] [--lr 1e-2] [--only NAME]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from itdsl import nn as itnn

C, T, BATCH, HELD_OUT = 8, 32, 32, 256
BARS = {"conv1d": 0.02, "attention": 0.05, "ema": 0.02}


class Attention(nn.Module):
    """One softmax attention head over the sequence (no mask), the output mapped back to C."""

    def __init__(self, d: int = 8, temperature: float = 2.0):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(C, d, bias=False) for _ in range(3))
        self.o = nn.Linear(d, C, bias=False)
        self.scale = temperature / math.sqrt(d)  # (peaked enough to depend on content)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.q(f) @ self.k(f).transpose(1, 2) * self.scale, -1)
        return self.o(a @ self.v(f))


class EMA(nn.Module):
    """y_t = λ·y_{t−1} + (1 − λ)·f_t per channel, λ from 0.5 to 0.95 (an S4D-style diagonal
    recurrence with real poles)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("lam", torch.linspace(0.5, 0.95, C))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        y, state = [], torch.zeros_like(f[:, 0])
        for t in range(f.shape[1]):
            state = self.lam * state + (1 - self.lam) * f[:, t]
            y.append(state)
        return torch.stack(y, 1)


class Conv(nn.Module):
    """A Conv1d of C channels, 5 taps, "same" padding, over [B, T, C] sequences."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(C, C, 5, padding=2)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.conv(f.transpose(1, 2)).transpose(1, 2)


def teacher(name: str) -> nn.Module:
    return {"conv1d": Conv, "attention": Attention, "ema": EMA}[name]().eval()


def student(name: str) -> itnn.Mix:
    """The mixer fitted to each teacher: the MLP kernel (non-causal for the convolution,
    causal for the EMA), its normalised softmax form for attention."""
    if name == "attention":
        return itnn.Mix(C, kind="softmax", coords=1, keys=8, hidden=64, layers=2)
    return itnn.Mix(C, kind="mlp", coords=1, keys=4, hidden=64, layers=2, width=32,
                    causal=name == "ema")


def fit(name: str, steps: int, seed: int, lr: float = 1e-2, progress: bool = True) -> dict:
    """Distil `name` into its student; returns the held-out relative L2 error."""
    torch.manual_seed(seed)
    teach, stud = teacher(name), student(name)
    pos = torch.arange(T, dtype=torch.float32)[None, :, None]  # (in steps: a tap is 1 apart)
    g = torch.Generator().manual_seed(seed + 1)
    test = torch.randn(HELD_OUT, T, C, generator=g)
    with torch.no_grad():
        want = teach(test)
    opt = torch.optim.Adam(stud.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps + 1)
    bar = tqdm(range(steps), desc=f"distil {name}", leave=False, disable=not progress)
    for _ in bar:
        f = torch.randn(BATCH, T, C, generator=g)
        with torch.no_grad():
            y = teach(f)
        loss = F.mse_loss(stud(f, pos), y) / y.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(rel=f"{loss.item() ** 0.5:.3f}")
    with torch.no_grad():
        got = torch.cat([stud(x, pos) for x in test.split(64)])
    err = ((got - want).norm() / want.norm()).item()
    return {"teacher": name, "rel_l2": err, "bar": BARS[name], "steps": steps,
            "params": sum(p.numel() for p in stud.parameters())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--only", choices=list(BARS))
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| teacher | student params | steps | held-out relative L2 error | bar |")
    print("|---|---|---|---|---|")
    for name in [args.only] if args.only else BARS:
        r = fit(name, args.steps, args.seed, args.lr)
        ok = "met" if r["rel_l2"] <= r["bar"] else "missed"
        print(f"| {name} | {r['params']:,} | {r['steps']} | {100 * r['rel_l2']:.2f} % | "
              f"≤ {100 * r['bar']:.0f} % ({ok}) |", flush=True)


if __name__ == "__main__":
    main()
