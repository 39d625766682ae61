"""ITNet's time per training step on each task, by compile target: the mixers' kernels for the
tensors' device (target None) against every pair materialised in torch ("reference"). A step
is forward, backward and AdamW on one batch of the task's recipe; the median over interleaved
rounds, after a warm-up (the kernels built or loaded from the cache).

    python -m experiments.itnet.steps [--tasks mnist digits] [--kind softmax] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from . import data
from .models import build, tokens
from .run import CONFIGS

TARGETS = (None, "reference")


def step_ms(name: str, kind: str | None = None, rounds: int = 10,
            warmup: int = 2) -> dict[str | None, float]:
    """The median ms per training step of the task's ITNet under each target."""
    task = data.TASKS[name]()
    config = CONFIGS[name].with_kind(kind) if kind else CONFIGS[name]
    b = config.recipe.batch
    x, y = task.x_train[:b], task.y_train[:b]
    lengths = None if task.len_train is None else task.len_train[:b]
    runs = {}
    for target in TARGETS:
        torch.manual_seed(0)
        model = build("itnet", task, replace(config, target=target))
        runs[target] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    times: dict[str | None, list[float]] = {t: [] for t in TARGETS}
    for r in range(warmup + rounds):
        for target, (model, opt) in runs.items():  # interleaved: both see the same load
            start = time.perf_counter()
            loss = F.cross_entropy(model(x, lengths), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if r >= warmup:
                times[target].append(time.perf_counter() - start)
    return {t: 1000 * statistics.median(ts) for t, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--kind", default=None, help="the mixer kind (default: each task's config)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| task | tokens | batch | compiled (target None) | reference | compiled / reference |")
    print("|---|---|---|---|---|---|")
    for name in args.tasks:
        ms = step_ms(name, args.kind, args.rounds)
        c, r = ms[None], ms["reference"]
        print(f"| {name} | {tokens(data.TASKS[name](), CONFIGS[name])} | "
              f"{CONFIGS[name].recipe.batch} | {c:.0f} ms | {r:.0f} ms | {c / r:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
