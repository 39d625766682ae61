"""ITNet: blocks of x + Mix(LayerNorm x), then x + FFN(LayerNorm x), over tokens with positions;
small encoders that turn images and series into tokens; a classifier on top.

    tokens, pos = patches(images, 4)             # [B, 49, 16], [1, 49, 2] for 28×28 images
    net = ITNet(16, dim=32, depth=2, classes=10, kind="softmax")
    logits = net(tokens, pos)                   # [B, 10]
    tokens, pos, mask = series(x, lengths)      # [B, T, C] series: time as a 1-D position
    logits = ITNet(C, 32, 2, 9, coords=1, kind="causal")(tokens, pos, mask)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .mix import Mix


class ITNetBlock(nn.Module):
    """x + Mix(LN x), then x + FFN(LN x) (a GELU MLP of `ffn` hidden units)."""

    def __init__(self, dim: int, ffn: int | None = None, **mix):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mix = Mix(dim, **mix)
        hidden = ffn or 2 * dim
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, w: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        x = x + self.mix(self.norm1(x), pos, w, generator)
        return x + self.ffn(self.norm2(x))


class ITNet(nn.Module):
    """A classifier: a linear embedding of each token's `features` values, `depth` ITNet
    blocks, a LayerNorm, the mean over the valid tokens and a linear head. `mix` are the
    mixers' options (`kind`, `coords`, `keys`, `hidden`, `layers`, `rank`, `samples`, `target`)."""

    def __init__(self, features: int, dim: int, depth: int, classes: int, ffn: int | None = None,
                 **mix):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.blocks = nn.ModuleList(ITNetBlock(dim, ffn, **mix) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, pos, mask, generator)
        x = self.norm(x)
        if mask is None:
            return self.head(x.mean(1))
        m = mask.to(x.dtype)[..., None]
        return self.head((x * m).sum(1) / m.sum(1).clamp_min(1))


# ---- encoders: (tokens [B, n, features], positions [1 or B, n, coords], mask [B, n]?) ------


def _grid(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """The centres of an h × w grid of cells in [0, 1]², row-major: `[1, h·w, 2]`."""
    ys = (torch.arange(h, dtype=like.dtype, device=like.device) + 0.5) / h
    xs = (torch.arange(w, dtype=like.dtype, device=like.device) + 0.5) / w
    return torch.cartesian_prod(ys, xs)[None]


def pixels(images: torch.Tensor, window: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pixel a token: `[B, C, H, W]` -> the C values of the `window` × `window` pixels
    centred on it (an odd number; zeros outside the image) `[B, H·W, C·window²]`, at its
    centre in [0, 1]² `[1, H·W, 2]`."""
    B, C, H, W = images.shape
    _odd(window, "an image token's window")
    if window == 1:
        return images.flatten(2).transpose(1, 2), _grid(H, W, images)
    t = F.unfold(images, window, padding=window // 2)  # [B, C·window², H·W]
    return t.transpose(1, 2), _grid(H, W, images)


def _odd(window: int, what: str) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise InputError(f"{what} is an odd number of steps, not {window!r}")


def patches(images: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping `size` × `size` patches as tokens: `[B, C, H, W]` -> `[B, n, C·size²]`
    at the patch centres `[1, n, 2]` (H and W multiples of `size`)."""
    B, C, H, W = images.shape
    if H % size or W % size:
        raise InputError(f"{H}×{W} images do not split into {size}×{size} patches",
                         hint="pad or crop the images to a multiple of the patch size")
    t = F.unfold(images, size, stride=size)  # [B, C·size², n]
    return t.transpose(1, 2), _grid(H // size, W // size, images)


def series(x: torch.Tensor, lengths: torch.Tensor | None = None, window: int = 1
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Every time step a token: `[B, T, C]` -> the values of the `window` steps centred on it
    (an odd number; zeros before the start and past the end or the length) `[B, T, C·window]`,
    the time t/(T − 1) in [0, 1] as a 1-D position `[1, T, 1]`, and (with `lengths`) the
    mask of the valid steps `[B, T]`."""
    B, T, C = x.shape
    _odd(window, "a series token's window")
    t = torch.linspace(0, 1, T, dtype=x.dtype, device=x.device)[None, :, None]
    mask = None
    if lengths is not None:
        mask = torch.arange(T, device=x.device)[None, :] < lengths.to(x.device)[:, None]
    if window > 1:  # (padding zeroed first: what lies past a length never reaches a token)
        v = x if mask is None else x * mask[..., None].to(x.dtype)
        v = F.pad(v, (0, 0, window // 2, window // 2))
        x = v.unfold(1, window, 1).reshape(B, T, C * window)
    return x, t, mask
