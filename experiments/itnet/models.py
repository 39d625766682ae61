"""The models of the ITNet experiment: ITNet (`itdsl.nn`) on a task's raw input through one of
its encoders, and the plain-torch baselines at ITNet's parameter count."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from itdsl import nn as itnn

from . import baselines
from .data import Task
from .train import Recipe

ENCODERS = ("pixels", "patches", "series")
MODELS = ("itnet", *baselines.MODELS)  # itnet, mlp, cnn, transformer, gru


@dataclass(frozen=True)
class Config:
    """ITNet on one task, and the recipe every model trains with there. `mix`: the mixers'
    options (`kind`, `keys`, `hidden`, `rank`, `samples`; see `itdsl.nn.Mix`); `target`: the
    mixers' compile target (None: the tensors' device; "reference": every pair materialised in
    torch)."""

    encoder: str  # "pixels", "patches" (patch × patch) or "series"
    dim: int
    depth: int
    recipe: Recipe
    mix: dict = field(default_factory=lambda: {"kind": "mlp"})
    ffn: int | None = None  # the blocks' hidden units (None: 2·dim)
    patch: int = 4
    octaves: int = 0  # Fourier features of the positions (see `fourier`); 0: the positions
    window: int = 1  # a pixel's or a step's token: its window × window (or window) neighbours
    target: str | None = None

    def with_kind(self, kind: str) -> Config:
        return replace(self, mix={**self.mix, "kind": kind})


def fourier(pos: torch.Tensor, spacing: torch.Tensor, octaves: int) -> torch.Tensor:
    """The positions `[..., c]` followed by sin and cos of 2π·pos/period for the periods of 2,
    4, …, 2^octaves token spacings (`spacing [c]`: the distance of neighbouring tokens on each
    axis): `[..., c·(1 + 2·octaves)]`. The first coordinates stay the positions themselves
    (a causal mixer reads time from the first)."""
    if octaves == 0:
        return pos
    periods = spacing[:, None] * 2.0 ** torch.arange(1, octaves + 1, dtype=pos.dtype,
                                                     device=pos.device)
    a = 2 * torch.pi * pos[..., None] / periods  # [..., c, octaves]
    return torch.cat([pos, a.sin().flatten(-2), a.cos().flatten(-2)], -1)


class ITNetOn(nn.Module):
    """ITNet on a task's raw input: images as pixel or patch tokens at their centres in
    [0, 1]², series as time steps at t ∈ [0, 1] with the mask of their lengths; the positions
    with their Fourier features where `config.octaves` asks for them."""

    def __init__(self, task: Task, config: Config):
        super().__init__()
        if config.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {config.encoder!r}; expected one of {ENCODERS}")
        if (task.kind == "image") != (config.encoder != "series"):
            raise ValueError(f"the {config.encoder} encoder does not fit {task.name}'s "
                             f"{task.kind}s")
        self.encoder, self.patch, self.window = config.encoder, config.patch, config.window
        channels = task.x_train.shape[1] if task.kind == "image" else task.x_train.shape[2]
        features = {"patches": channels * config.patch ** 2,
                    "pixels": channels * config.window ** 2,
                    "series": channels * config.window}[config.encoder]
        if config.encoder == "series":  # t/(T − 1): steps 1/(T − 1) apart
            spacing = [1 / (task.x_train.shape[1] - 1)]
        else:  # cell centres on [0, 1]²
            h, w = task.x_train.shape[2:]
            p = config.patch if config.encoder == "patches" else 1
            spacing = [p / h, p / w]
        self.register_buffer("spacing", torch.tensor(spacing), persistent=False)
        self.octaves = config.octaves
        coords = len(spacing) * (1 + 2 * config.octaves)
        self.net = itnn.ITNet(features, config.dim, config.depth, task.classes, config.ffn,
                              coords=coords, target=config.target, **config.mix)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        mask = None
        if self.encoder == "series":
            tokens, pos, mask = itnn.series(x, lengths, self.window)
        elif self.encoder == "pixels":
            tokens, pos = itnn.pixels(x, self.window)
        else:
            tokens, pos = itnn.patches(x, self.patch)
        return self.net(tokens, fourier(pos, self.spacing, self.octaves), mask)


def tokens(task: Task, config: Config) -> int:
    """How many tokens ITNet sees per example of `task`."""
    if config.encoder == "series":
        return task.x_train.shape[1]
    h, w = task.x_train.shape[2:]
    return h * w if config.encoder == "pixels" else (h // config.patch) * (w // config.patch)


def build(name: str, task: Task, config: Config) -> nn.Module:
    """The model `name` for `task`: ITNet of `config`, or the baseline of that name whose
    parameter count is closest to ITNet's (within 10 %). Initialised from torch's generator
    as it stands (seed it first); a baseline's is drawn as if ITNet had not been built."""
    if name == "itnet":
        return ITNetOn(task, config)
    with torch.random.fork_rng(devices=[]):
        budget = baselines.count_params(ITNetOn(task, config))
    return baselines.make(name, task, budget)
