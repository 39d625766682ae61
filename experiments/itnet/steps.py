"""ITNet's time per training step on each task, by how its mixers run: as itdsl decides per
call (its cost model picks the compiled kernels or a materialised evaluation in torch), the
compiled kernels always, and the reference target (every pair materialised, autograd). A
step is forward, backward and AdamW on one batch of the task's recipe; the median over
interleaved rounds, after a warm-up (the kernels built or loaded from the cache).

    python -m experiments.itnet.steps [--tasks mnist digits] [--kind softmax] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from itdsl.settings import small_pairs_set

from . import data
from .models import build, tokens
from .run import CONFIGS

# (label, compile target, the small-call setting: None = the cost model, 0 = never)
WAYS = (("itdsl", None, None), ("kernels", None, 0), ("reference", "reference", None))


def step_ms(name: str, kind: str | None = None, rounds: int = 10,
            warmup: int = 2) -> tuple[dict[str, float], set[str]]:
    """The median ms per training step of the task's ITNet run each way, and what its
    mixers ran as itdsl decided ("materialised", "kernels")."""
    task = data.TASKS[name]()
    config = CONFIGS[name].with_kind(kind) if kind else CONFIGS[name]
    b = config.recipe.batch
    x, y = task.x_train[:b], task.y_train[:b]
    lengths = None if task.len_train is None else task.len_train[:b]
    runs = {}
    for label, target, small in WAYS:
        torch.manual_seed(0)
        model = build("itnet", task, replace(config, target=target))
        runs[label] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3), small)
    times: dict[str, list[float]] = {label: [] for label in runs}
    for r in range(warmup + rounds):
        for label, (model, opt, small) in runs.items():  # interleaved: the same load
            with small_pairs_set(small):
                start = time.perf_counter()
                loss = F.cross_entropy(model(x, lengths), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            if r >= warmup:
                times[label].append(time.perf_counter() - start)
    ran = {m.last_run for m in runs["itdsl"][0].modules() if hasattr(m, "last_run")} - {None}
    return {label: 1000 * statistics.median(ts) for label, ts in times.items()}, ran


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--kind", default=None, help="the mixer kind (default: each task's config)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| task | tokens | batch | pairs per call | itdsl (its choice) | kernels | reference |")
    print("|---|---|---|---|---|---|---|")
    for name in args.tasks:
        ms, ran = step_ms(name, args.kind, args.rounds)
        n, b = tokens(data.TASKS[name](), CONFIGS[name]), CONFIGS[name].recipe.batch
        print(f"| {name} | {n} | {b} | {b * n * n:,} | {ms['itdsl']:.0f} ms "
              f"({', '.join(sorted(ran))}) | {ms['kernels']:.0f} ms | "
              f"{ms['reference']:.0f} ms |", flush=True)


if __name__ == "__main__":
    main()
