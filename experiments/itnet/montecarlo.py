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

from dataclasses import replace

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


def _train(task_name: str, config, seed: int, quick: bool, desc: str):
    from . import models, run, train
    task = run.load(task_name, quick)
    if quick:
        config = replace(config, recipe=replace(config.recipe, epochs=run.QUICK_EPOCHS))
    torch.manual_seed(seed)
    model = models.build("itnet", task, config)
    hist = train.fit(model, task, config.recipe, seed, desc=desc)
    return task, model, hist


def main() -> None:
    import argparse

    from . import run
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="japanese_vowels", choices=list(run.CONFIGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16, 32])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    config = run.CONFIGS[args.task]
    task, model, hist = _train(args.task, config, args.seed, args.quick, "exact mlp")
    n = 256
    lengths = None if task.len_test is None else task.len_test[:n]
    mix, (h, pos, w) = first_mixer_inputs(model, task.x_test[:n], lengths)
    print(f"ITNet ({config.mix['kind']}) on {args.task}, seed {args.seed}: "
          f"{100 * hist.accuracy[-1]:.1f} % test accuracy. Relative error of the first mixer's "
          f"Monte Carlo estimate (RMS over {args.draws} draws, {n} held-out examples):\n")
    print("| S | uniform over all tokens | uniform over the valid tokens (∝ w) | "
          "∝ w·(‖v‖ + ε) |")
    print("|---|---|---|---|")
    for S in SAMPLES:
        errs = [mc_error(mix, h, pos, w, S, imp, args.draws) for imp in IMPORTANCE]
        print(f"| {S} | " + " | ".join(f"{e:.3f}" for e in errs) + " |", flush=True)
    print("\nTrained with the kind instead of the exact kernel (test accuracy):\n")
    print("| mixer | test accuracy | ms per step |")
    print("|---|---|---|")
    print(f"| mlp (exact) | {100 * hist.accuracy[-1]:.1f} % | {hist.step_ms:.0f} |")
    mc = replace(config, mix={**config.mix, "kind": "montecarlo", "samples": 16})
    _, _, hmc = _train(args.task, mc, args.seed, args.quick, "montecarlo 16")
    print(f"| montecarlo, S = 16, ∝ w·(‖v‖ + ε) | {100 * hmc.accuracy[-1]:.1f} % | "
          f"{hmc.step_ms:.0f} |", flush=True)
    for r in args.ranks:
        lr = replace(config, mix={**config.mix, "kind": "lowrank", "rank": r})
        _, _, hr = _train(args.task, lr, args.seed, args.quick, f"lowrank {r}")
        print(f"| lowrank, r = {r} | {100 * hr.accuracy[-1]:.1f} % | {hr.step_ms:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
