"""Training and evaluating the discrete networks: Adam, cross-entropy, seeded initialisation
and batch order, a tqdm bar per run."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import Split

BATCH = 64
LR = 3e-3


def train(model: nn.Module, data: Split, epochs: int, seed: int, desc: str = "") -> nn.Module:
    """`model` trained in place on the training split for `epochs` epochs (the seed fixes the
    batch order; the caller seeds the initialisation); returned in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    n = len(data.y_train)
    steps = epochs * ((n + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    model.train()
    with tqdm(total=steps, desc=desc, leave=False, unit="step") as bar:
        for _ in range(epochs):
            order = torch.randperm(n, generator=g)
            for i in range(0, n, BATCH):
                idx = order[i:i + BATCH]
                loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """The model's outputs on `x`, in batches."""
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of `x` that `model` classifies as `y`."""
    return (logits(model, x).argmax(1) == y).float().mean().item()
