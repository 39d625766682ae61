"""Plain-torch baselines for the ITNet tasks: an MLP, a CNN, a Transformer encoder and a GRU.

Each is built for a task's input layout (see `experiments.itnet.data`: images `[N, 1, H, W]`,
sequences `[N, T, C]`), has one width knob, and maps the raw `x` (plus, for variable-length
sequences, the optional int64 `lengths` `[N]`) to logits `[N, classes]`. With `lengths`, the steps
past each length do not change the output, whatever they hold. `make` picks the width that meets
a parameter budget, so that the baselines and ITNet compare at equal size.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from .data import Task


def _valid(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """`[N, steps]` bool: True at the steps before each length."""
    return torch.arange(steps, device=lengths.device) < lengths[:, None]


def _masked_mean(h: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The mean of `h` `[N, T, D]` over its valid steps (all steps when `valid` is None)."""
    if valid is None:
        return h.mean(1)
    w = valid.to(h.dtype)[:, :, None]
    return (h * w).sum(1) / w.sum(1).clamp_min(1)


def _is_image(in_shape: tuple[int, ...]) -> bool:
    """`[C, H, W]` is an image, `[T, C]` a sequence."""
    if len(in_shape) not in (2, 3):
        raise ValueError(f"expected an input shape [C, H, W] or [T, C], got {list(in_shape)}")
    return len(in_shape) == 3


class MLP(nn.Module):
    """The flattened input, two hidden layers of `width` units with GELU, a linear head. For
    sequences with lengths, the steps past each length are zeroed first (so a series looks
    zero-padded, whatever its padding held)."""

    def __init__(self, in_shape: tuple[int, ...], classes: int, width: int = 64):
        super().__init__()
        self.width = width  # the knob `make` searches
        self.image = _is_image(in_shape)
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(in_shape), width), nn.GELU(),
            nn.Linear(width, width), nn.GELU(),
            nn.Linear(width, classes))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is not None and not self.image:
            x = x * _valid(lengths, x.shape[1])[:, :, None].to(x.dtype)
        return self.net(x)


class CNN(nn.Module):
    """Three conv + ReLU layers of `width`, 2·`width`, 2·`width` channels, global average
    pooling and a linear head. Images: 3×3 convs, 2×2 max pooling after the first two. Sequences:
    1-D convs of kernel 5 over time ("same" padding) and no pooling, so that the mask stays one
    per step; the steps past each length are zeroed before every conv (a series then sees the
    same zeros past its end as at its start), and the pooling averages the valid steps only."""

    def __init__(self, in_shape: tuple[int, ...], classes: int, width: int = 16):
        super().__init__()
        self.width = width  # the knob `make` searches
        self.image = _is_image(in_shape)
        conv, k = (nn.Conv2d, 3) if self.image else (nn.Conv1d, 5)
        channels = [in_shape[0] if self.image else in_shape[1], width, 2 * width, 2 * width]
        self.convs = nn.ModuleList(conv(a, b, k, padding=k // 2)
                                   for a, b in itertools.pairwise(channels))
        self.fc = nn.Linear(channels[-1], classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if self.image:
            for i, conv in enumerate(self.convs):
                x = F.relu(conv(x))
                if i < 2:
                    x = F.max_pool2d(x, 2)
            return self.fc(x.mean((2, 3)))
        x = x.transpose(1, 2)  # [N, C, T]
        valid = None if lengths is None else _valid(lengths, x.shape[2])
        for conv in self.convs:
            if valid is not None:
                x = x * valid[:, None, :].to(x.dtype)
            x = F.relu(conv(x))
        return self.fc(_masked_mean(x.transpose(1, 2), valid))


class Transformer(nn.Module):
    """A small pre-norm `nn.TransformerEncoder` (`layers` layers of width `width`, `heads` heads,
    feed-forward 2·`width`, GELU) over tokens: for images, non-overlapping p×p patches with
    p = 4 where both sides are at least 16 (28×28: 49 tokens of 16 pixels), else single pixels
    (8×8: 64 tokens); for sequences, the time steps (C values each). A linear token embedding
    plus a learned positional embedding, a key padding mask from the lengths, a final LayerNorm,
    the mean over the valid tokens and a linear head."""

    def __init__(self, in_shape: tuple[int, ...], classes: int, width: int = 32, heads: int = 2,
                 layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.width = width  # the knob `make` searches
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of the {heads} heads")
        self.image = _is_image(in_shape)
        if self.image:
            c, h, w = in_shape
            self.patch = 4 if min(h, w) >= 16 else 1
            if h % self.patch or w % self.patch:
                raise ValueError(f"{h}×{w} images do not split into {self.patch}² patches")
            tokens, token_size = (h // self.patch) * (w // self.patch), c * self.patch ** 2
        else:
            tokens, token_size = in_shape
        self.embed = nn.Linear(token_size, width)
        self.pos = nn.Parameter(0.02 * torch.randn(tokens, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(width),
                                             enable_nested_tensor=False)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if self.image:
            x = F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)  # [N, tokens, c·p²]
        valid = None if lengths is None or self.image else _valid(lengths, x.shape[1])
        h = self.embed(x) + self.pos[:x.shape[1]]
        h = self.encoder(h, src_key_padding_mask=None if valid is None else ~valid)
        return self.fc(_masked_mean(h, valid))


class GRU(nn.Module):
    """One GRU layer of `width` units and a linear head on its last hidden state. Images are read
    row by row (H steps of C·W pixels); sequences as given, packed by their lengths
    (`pack_padded_sequence`), so the last hidden state is that of each series' last valid step."""

    def __init__(self, in_shape: tuple[int, ...], classes: int, width: int = 64):
        super().__init__()
        self.width = width  # the knob `make` searches
        self.image = _is_image(in_shape)
        features = in_shape[0] * in_shape[2] if self.image else in_shape[1]
        self.rnn = nn.GRU(features, width, batch_first=True)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if self.image:
            n, c, h, w = x.shape
            x = x.permute(0, 2, 1, 3).reshape(n, h, c * w)
        elif lengths is not None:
            x = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, last = self.rnn(x)
        return self.fc(last[-1])


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN, "transformer": Transformer,
                                      "gru": GRU}
WIDTH_STEP = {"transformer": 2}  # the Transformer's width is a multiple of its 2 heads (a step
# of 4 left budgets of 17–18k between two widths 29 % apart, out of the ±10 % of `make`)


def count_params(model: nn.Module) -> int:
    """The number of parameters (every tensor in `model.parameters()`)."""
    return sum(p.numel() for p in model.parameters())


def make(kind: str, task: Task, target_params: int, tolerance: float = 0.1) -> nn.Module:
    """The baseline `kind` ("mlp", "cnn", "transformer", "gru") for `task`, of the width whose
    parameter count is closest to `target_params`; a ValueError naming the closest count when
    that is off by more than `tolerance` (relative). The search restores torch's generator after
    each candidate, so the returned model's initialisation draws from it exactly as a direct
    constructor call would."""
    if kind not in MODELS:
        raise ValueError(f"unknown baseline {kind!r}; expected one of {sorted(MODELS)}")
    cls, step = MODELS[kind], WIDTH_STEP.get(kind, 1)
    in_shape = tuple(task.x_train.shape[1:])
    counts: dict[int, int] = {}

    def count(units: int) -> int:  # the count grows with the width
        if units not in counts:
            with torch.random.fork_rng(devices=[]):  # leaves the generator where it was
                counts[units] = count_params(cls(in_shape, task.classes, width=units * step))
        return counts[units]

    hi = 1
    while count(hi) < target_params and hi < 2 ** 16:
        hi *= 2
    lo = hi // 2  # below the target (or 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < target_params else (lo, mid)
    best = min((u for u in (lo, hi) if u >= 1), key=lambda u: abs(count(u) - target_params))
    if abs(count(best) - target_params) > tolerance * target_params:
        raise ValueError(f"no width of {kind} for {task.name} has {target_params} parameters "
                         f"within ±{tolerance:.0%}: the closest is {count(best)} "
                         f"(width {best * step})")
    return cls(in_shape, task.classes, width=best * step)
