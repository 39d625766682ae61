"""Training and evaluating every model of the ITNet experiment the same way: AdamW with a
one-cycle schedule, cross-entropy, seeded batch order (the caller seeds the initialisation),
the mean training loss and the test accuracy after every epoch, a tqdm bar per run.

Every model is called as `model(x, lengths)`: the task's raw input and its sequences' lengths
(None for fixed-length data)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..common import Shuffled
from .data import Task


@dataclass(frozen=True)
class Recipe:
    """How long and how fast: the same for every model on a task."""

    epochs: int
    batch: int
    lr: float  # the one-cycle schedule's peak
    weight_decay: float = 0.01  # AdamW's default


@dataclass
class History:
    """One run: per epoch the mean training loss and the test accuracy; the training's wall
    time and its mean time per step (the evaluations excluded)."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    steps: int = 0

    @property
    def step_ms(self) -> float:
        return 1000 * self.train_seconds / max(self.steps, 1)


def fit(model: nn.Module, task: Task, recipe: Recipe, seed: int, desc: str = "",
        eval_batch: int | None = None) -> History:
    """`model` trained in place on `task`'s training split, evaluated on its test split after
    every epoch; returned in eval mode with its History. The test accuracy of the last epoch is
    the run's result (no epoch is picked on the test set)."""
    loader = Shuffled((task.x_train, task.y_train, task.len_train), recipe.batch, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr,
                                                total_steps=recipe.epochs * len(loader))
    history = History()
    with tqdm(total=recipe.epochs * len(loader), desc=desc, leave=False, unit="step") as bar:
        for _ in range(recipe.epochs):
            model.train()
            total, count = 0.0, 0
            start = time.perf_counter()
            for x, y, lengths in loader:
                loss = F.cross_entropy(model(x, lengths), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(y)
                count += len(y)
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
            history.train_seconds += time.perf_counter() - start
            history.steps += len(loader)
            history.loss.append(total / count)
            history.accuracy.append(accuracy(model, task, eval_batch or recipe.batch))
            bar.set_postfix(loss=f"{history.loss[-1]:.3f}", test=f"{history.accuracy[-1]:.3f}")
    return history


@torch.no_grad()
def accuracy(model: nn.Module, task: Task, batch: int) -> float:
    """The fraction of the test split that `model` classifies right (in eval mode, in
    batches of `batch`)."""
    model.eval()
    x, y, lengths = task.x_test, task.y_test, task.len_test
    right = 0
    for i in range(0, len(y), batch):
        part = None if lengths is None else lengths[i:i + batch]
        right += (model(x[i:i + batch], part).argmax(1) == y[i:i + batch]).sum().item()
    return right / len(y)
