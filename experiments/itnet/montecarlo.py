"""Monte Carlo and low rank in training.

1. Monte Carlo error: for the first mixer of an ITNet trained with the exact "mlp" kernel,
   the relative error of its Monte Carlo estimate (the kind "montecarlo", the same params)
   against the exact integral, for S ∈ {8, 16, 32} draws, uniform over all tokens, uniform
   over the valid tokens (∝ w), and importance ∝ w(y)·(‖v(y)‖ + ε); RMS over draws and the
   held-out examples.
2. Low rank: the test accuracy of ITNet with the "lowrank" kernel ⟨A(x, a(x)), B(y, a(y))⟩
   at rank r ∈ {4, 8, 16, 32}.

    python -m experiments.itnet.montecarlo [--quick]
"""

from __future__ import annotations

import torch

from itdsl import nn as itnn

SAMPLES = (8, 16, 32)
IMPORTANCE = ("uniform", "weights", "values")


def first_mixer_inputs(model: torch.nn.Module, *args) -> tuple[itnn.Mix, tuple]:
    """The first mixer of the ITNet in `model` and the (h, pos, w) it is called with on the
    model's input `args`."""
    mix = next(m for m in model.modules() if isinstance(m, itnn.Mix))
    seen = []
    hook = mix.register_forward_pre_hook(lambda m, a: seen.append(a[:3]))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        hook.remove()
    return mix, seen[0]


def estimator(mix: itnn.Mix, samples: int, importance: str) -> itnn.Mix:
    """The Monte Carlo form of the "mlp" mixer `mix`, with its params."""
    mc = itnn.Mix(mix.keys.in_features, kind="montecarlo", coords=mix.coords,
                  keys=mix.keys.out_features, hidden=mix.hidden, layers=mix.layers,
                  width=mix.values.out_features, samples=samples, importance=importance,
                  causal=mix.causal)
    mc.load_state_dict(mix.state_dict())
    return mc.to(next(mix.parameters()).dtype)


def mc_error(mix: itnn.Mix, h, pos, w, samples: int, importance: str, draws: int,
             seed: int = 0) -> float:
    """RMS over `draws` calls of ‖ĝ − g‖ / ‖g‖, g the exact mixer's integral (its output less
    the last linear map's bias), over the examples of the batch together."""
    mc = estimator(mix, samples, importance)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        exact = mix(h, pos, w) - mix.out.bias
        num = sum((mc(h, pos, w, generator=gen) - mix.out.bias - exact).square().sum()
                  for _ in range(draws))
    return (num / draws / exact.square().sum()).sqrt().item()
