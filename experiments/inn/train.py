"""Training and evaluating the discrete networks: Adam, cross-entropy, seeded initialisation
and batch order, a tqdm bar per run."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import common
from .data import Split

BATCH = 64
LR = 3e-3


class Shuffled(common.Shuffled):
    """The training split in batches of `BATCH`, in a new order on every pass, drawn from a
    generator seeded with `seed`."""

    def __init__(self, data: Split, seed: int):
        super().__init__((data.x_train, data.y_train), BATCH, seed)


def train(model: nn.Module, data: Split, epochs: int, seed: int, desc: str = "") -> nn.Module:
    """`model` trained in place on the training split for `epochs` epochs (the seed fixes the
    batch order; the caller seeds the initialisation); returned in eval mode."""
    loader = Shuffled(data, seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    steps = epochs * len(loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    model.train()
    with tqdm(total=steps, desc=desc, leave=False, unit="step") as bar:
        for _ in range(epochs):
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
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
