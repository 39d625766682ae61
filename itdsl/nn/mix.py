"""The token mixers of an ITNet block: one `.it` integral operator each, out(x) = ∫ K(x, y)
v(y) dμ(y), with K a learnable function of the two positions and of the two tokens' keys.

| kind | the operator (a = keys, v = values, w = the tokens' weights) | strategy |
|---|---|---|
| "mlp" | ∫ φ(x, y, a(x), a(y)) ⊙ v(y) w(y) dy, φ an MLP to R^C | dense (tiled pair kernel) |
| "softmax" | ∫ e^{s(x,y)} v(y) w(y) / ∫ e^{s(x,y)} w(y), s = φ(x, y, a(x), a(y)) ∈ R | dense |
| "causal" | "softmax" with the bracket [y₀ ≤ x₀] (time is the first coordinate) | dense |
| "lowrank" | ∫ ⟨A(x, a(x)), B(y, a(y))⟩ v(y) w(y) dy, A and B MLPs to R^r | lowrank (O(n·r)) |
| "montecarlo" | "mlp" by S draws of y per call, ∝ w(y)·(‖v(y)‖ + ε) | dense, on the draws |

The positions are points in R^D (pixels, patches, time steps scaled to [0, 1]); `w` is a
weight per token: the mean over a sequence's valid tokens (1/len, 0 on padding) for the
integrals, a 0/1 mask for the normalised ones. The keys and values are linear maps of the
block's (normalised) tokens, made in torch; the output goes through a last linear map.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError

KINDS = ("mlp", "softmax", "causal", "lowrank", "montecarlo")
IMPORTANCE_FLOOR = 1e-3  # so that a token with a zero value can still be drawn
# how the kind "montecarlo" draws its S points y: ∝ w(y)·(‖v(y)‖ + floor) ("values"), ∝ w(y)
# (uniformly over the valid tokens: "weights"), or uniformly over all n ("uniform")
# (a masked token keeps an importance of MASKED_WEIGHT, so that a sequence whose every token
# is masked draws some, each worth w = 0: its output is 0, as the dense kinds give)
MASKED_WEIGHT = 1e-30  # a masked token's weight in a normalised mixer (see `Mix.forward`)
IMPORTANCE = {"values": f", importance = (w(y) + {MASKED_WEIGHT}) * (norm(v(y)) + "
                        f"{IMPORTANCE_FLOOR})",
              "weights": f", importance = w(y) + {MASKED_WEIGHT}", "uniform": ""}


def mix_source(kind: str, coords: int, keys: int, width: int, hidden: int, rank: int = 8,
               samples: int = 32, causal: bool = False, act: str = "gelu",
               layers: int = 2, importance: str = "values") -> str:
    """The `.it` text of a mixer `mix` of `kind` on `points(coords)`: keys `a : P -> R^keys`,
    values `v : P -> R^width`, weights `w : P -> R`; `causal` multiplies the kernel by
    [y₀ ≤ x₀] (the kind "causal" is "softmax" with it). The kernel MLPs have `layers`
    hidden layers of `hidden` units. `importance`: how "montecarlo" draws y (`IMPORTANCE`)."""
    if kind not in KINDS:
        raise InputError(f"no mixer kind {kind!r}; the kinds are {', '.join(KINDS)}")
    if importance not in IMPORTANCE:
        raise InputError(f"no importance {importance!r} for a Monte Carlo mixer; choose "
                         f"{', '.join(IMPORTANCE)}")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise InputError(f"a mixer's kernel MLP needs at least one hidden layer, not "
                         f"layers={layers!r}")
    hid = " -> ".join([str(hidden)] * layers)
    if kind == "causal":
        kind, causal = "softmax", True
    pair = 2 * (coords + keys)
    bracket = "[y[0] <= x[0]] * " if causal else ""
    # the Monte Carlo kind integrates over the points as a domain Q of their own (the same
    # tensors): then the kernels run on the S points drawn only (a domain that the output
    # also ranges over would be run over whole, at weight 0 where not drawn)
    mc = kind == "montecarlo"
    Y, ax = ("Q", "ax") if mc else ("P", "a")
    lines = ["operator mix {", f"    domain P = points({coords})"]
    if mc:
        lines += [f"    domain Q = points({coords})", f"    input  ax : P -> R^{keys}"]
    lines += [f"    input  a : {Y} -> R^{keys}", f"    input  v : {Y} -> R^{width}",
              f"    input  w : {Y} -> R"]
    if kind in ("mlp", "montecarlo"):
        lines.append(f"    param  phi : mlp({pair} -> {hid} -> {width}, act = {act})")
        rule = (f"* w(y) with montecarlo({samples}{IMPORTANCE[importance]})" if mc
                else "with weights(w)")
        lines.append(f"    output g(x: P) = integral(y: {Y}) {bracket}phi(x, y, {ax}(x), a(y)) "
                     f"* v(y) {rule}")
    elif kind == "softmax":
        lines.append(f"    param  phi : mlp({pair} -> {hid} -> 1, act = {act})")
        k = bracket + "exp(phi(x, y, a(x), a(y)))"
        lines.append(f"    output g(x: P) = integral(y: P) {k} * w(y) * v(y)"
                     f" / integral(y: P) {k} * w(y)")
    else:
        for name in ("A", "B"):
            lines.append(f"    param  {name} : mlp({coords + keys} -> {hid} -> {rank}, "
                         f"act = {act})")
        lines.append(f"    output g(x: P) = integral(y: P) {bracket}dot(A(x, a(x)), B(y, a(y)))"
                     " * v(y) with weights(w)")
    return "\n".join(lines + ["}"]) + "\n"


class Mix(nn.Module):
    """A learnable integral operator over a set of tokens: `mix(h, pos, w)` with tokens
    `h [B, n, dim]`, positions `pos [B or 1, n, coords]` and token weights `w [B, n]` (None:
    every token, the mean) gives `[B, n, dim]`. The values have `width` channels (default
    `dim`), each with its own kernel; the kernel MLPs have `layers` hidden layers of
    `hidden` units; `importance` is how "montecarlo" draws (see `IMPORTANCE`: its kernels
    run on the points drawn, O(n·S)). `target`: as `itdsl.compile_source` (None: the
    tensors' device; "reference": every pair materialised in torch)."""

    def __init__(self, dim: int, kind: str = "mlp", coords: int = 2, keys: int = 8,
                 hidden: int = 32, rank: int = 8, samples: int = 32, width: int | None = None,
                 causal: bool = False, layers: int = 2, importance: str = "values",
                 target: str | None = None):
        super().__init__()
        from ..api import compile_source
        width = width or dim
        self.kind, self.coords, self.causal = kind, coords, causal or kind == "causal"
        self.hidden, self.layers, self.rank, self.samples = hidden, layers, rank, samples
        self.normalised = kind in ("softmax", "causal")  # a ratio: w masks, need not sum to 1
        self.source = mix_source(kind, coords, keys, width, hidden, rank, samples, causal,
                                 layers=layers, importance=importance)
        self.op = compile_source(self.source, target=target)["mix"]
        self.keys = nn.Linear(dim, keys)
        self.values = nn.Linear(dim, width)
        self.out = nn.Linear(width, dim)

    def forward(self, h: torch.Tensor, pos: torch.Tensor, w: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        dim = self.keys.in_features
        for name, t in (("positions", pos), ("token weights (the mask)", w)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise InputError(f"{name} should be a tensor, got {type(t).__name__}")
        if not isinstance(h, torch.Tensor) or h.dim() != 3 or h.shape[-1] != dim \
                or not h.is_floating_point():
            got = (f"{list(h.shape)} {str(h.dtype).replace('torch.', '')}"
                   if isinstance(h, torch.Tensor) else type(h).__name__)
            raise InputError(f"tokens should be a floating-point tensor [B, n, {dim}], got {got}",
                             hint="a single sequence is h[None]")
        if h.dtype != self.keys.weight.dtype and not torch.is_autocast_enabled(h.device.type):
            raise InputError(f"tokens of dtype {str(h.dtype).replace('torch.', '')} into a "
                             f"mixer of {str(self.keys.weight.dtype).replace('torch.', '')}",
                             hint="convert one to the other (mix.to(h.dtype) or h.to(...))")
        B, n, _ = h.shape
        if n == 0:
            raise InputError("no tokens to mix (n = 0)", hint="every sequence needs a token; "
                             "pad short ones and mask the padding with w")
        if pos.dim() != 3 or pos.shape[0] not in (1, B) or pos.shape[-1] != self.coords \
                or pos.shape[-2] != n:
            raise InputError(f"positions should be [B, {n}, {self.coords}] (or [1, {n}, "
                             f"{self.coords}]) for {B} sequences of {n} tokens in "
                             f"R^{self.coords}, got {list(pos.shape)}")
        if w is None:
            w = h.new_full((1, n), 1.0 if self.normalised else 1.0 / n)
        else:
            if w.dim() not in (1, 2) or w.shape[-1] != n or (w.dim() == 2
                                                             and w.shape[0] not in (1, B)):
                raise InputError(f"token weights (the mask) should be [B, n] = [{B}, {n}] (or "
                                 f"[1, {n}]), got {list(w.shape)}",
                                 hint="a mask of shape [B, n, 1] is w[..., 0]")
            if self.kind == "montecarlo" and bool((w < 0).any()):
                raise InputError("a Monte Carlo mixer's token weights (the mask) are >= 0: "
                                 "they weigh its draws", hint="mask with 0 and 1")
            w = w.to(h.dtype)
            if not self.normalised:  # the mean over the valid tokens
                w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
        if self.kind == "montecarlo":  # (its rule estimates the mean over the n points)
            w = w * n
        if self.normalised:  # a query that sees no valid token (padding
            # before the first one) averages the masked ones at a weight of 1e-30 instead of
            # giving 0/0, whose NaN the next block would spread (0 · NaN) to every token
            w = w + (w == 0).to(w.dtype) * MASKED_WEIGHT
        kw = {} if generator is None else {"generator": generator}
        pos, a = pos.to(h.dtype), self.keys(h)
        if self.kind == "montecarlo":  # (the same points as a domain of their own, Q)
            kw.update(Q=pos, ax=a)
        g = self.op(P=pos, a=a, v=self.values(h), w=w.expand(B, n), **kw)
        return self.out(g)
