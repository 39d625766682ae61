"""Runs the whole experiment: ITNet against plain-torch baselines of the same parameter count
(±10 %) on every task, every seed, the same data and training recipe; writes
results/results.csv (a row per run), epochs.csv (a row per run and epoch), table.md and
curves.png, and prints the table.

    python -m experiments.itnet.run                  # full: 3 seeds, every task and model
    python -m experiments.itnet.run --quick          # smoke run: 1 seed, 2 epochs, subsets
    python -m experiments.itnet.run --kind softmax   # another mixer in every ITNet block

Each seed of each model on each task is a job in a process of its own (--jobs at a time, one
per core by default). A run's result is the test accuracy after its last epoch.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..common import add_job_arguments, run_jobs, write_csv
from . import baselines, data, train
from .models import MODELS, Config, build
from .train import Recipe

RESULTS = Path(__file__).parent / "results"

# ITNet on each task, and the recipe every model trains with there (see the README's ITNet
# experiment for how these were chosen). The mixer is the MLP kernel of the two positions and
# the two tokens' keys ("mlp") unless --kind says otherwise.
CONFIGS: dict[str, Config] = {
    # 8×8 images, every pixel a token (its 3×3 neighbourhood): 64 tokens in [0, 1]²
    "digits": Config("pixels", dim=32, depth=2, octaves=3, window=3,
                     recipe=Recipe(epochs=10, batch=64, lr=1e-2)),
    # 28×28 images as 7×7 patches: 16 tokens of 49 pixels, each with 16 keys
    "mnist": Config("patches", dim=32, depth=2, octaves=3, patch=7,
                    mix={"kind": "mlp", "keys": 16}, recipe=Recipe(epochs=8, batch=64, lr=1e-2)),
    # 40 steps of 1 channel at t ∈ [0, 1], each token a window of 5 steps
    "mnist1d": Config("series", dim=32, depth=2, octaves=6, window=5,
                      recipe=Recipe(epochs=12, batch=64, lr=1e-2)),
    # the same steps permuted: a window of neighbours means nothing there, a token is a step
    "mnist1d_shuffled": Config("series", dim=32, depth=2, octaves=6, window=1,
                               recipe=Recipe(epochs=12, batch=64, lr=1e-2)),
    # 150 steps of 1 channel; 50 training series; each token a window of 15 steps
    "gunpoint": Config("series", dim=32, depth=2, octaves=8, window=15,
                       recipe=Recipe(epochs=40, batch=10, lr=3e-3)),
    # 7–29 steps of 12 channels, the padding masked; each token a step
    "japanese_vowels": Config("series", dim=32, depth=2, octaves=5, window=1,
                              recipe=Recipe(epochs=30, batch=32, lr=1e-2)),
}
QUICK_EPOCHS, QUICK_TRAIN, QUICK_TEST = 2, 256, 256

# Published accuracies (%) of their own models, sizes and schedules: MNIST-1D (Greydanus and
# Kobak, "Scaling down deep learning with MNIST-1D", 2020/2024).
PUBLISHED = {"mnist1d": {"mlp": 68, "cnn": 94, "gru": 91},
             "mnist1d_shuffled": {"cnn": 56, "gru": 57}}


@functools.cache
def load(name: str, quick: bool) -> data.Task:
    """A task (loaded once per process); with `quick`, its first QUICK_TRAIN training and
    QUICK_TEST test examples."""
    task = data.TASKS[name]()
    if not quick:
        return task
    tr, te = slice(QUICK_TRAIN), slice(QUICK_TEST)
    return task._replace(
        x_train=task.x_train[tr], y_train=task.y_train[tr], x_test=task.x_test[te],
        y_test=task.y_test[te], len_train=None if task.len_train is None else task.len_train[tr],
        len_test=None if task.len_test is None else task.len_test[te])


def job(task_name: str, model_name: str, seed: int, config: Config, quick: bool,
        threads: int) -> tuple[dict, list[dict]]:
    """One seed of one model on one task (a job of its own, in a process of its own): its row
    of results.csv and its rows of epochs.csv."""
    start = time.perf_counter()
    torch.set_num_threads(threads)
    task = load(task_name, quick)
    torch.manual_seed(seed)
    model = build(model_name, task, config)
    hist = train.fit(model, task, config.recipe, seed, desc=f"{model_name}/{task_name}/{seed}")
    kind = config.mix["kind"] if model_name == "itnet" else ""
    row = {"task": task_name, "model": model_name, "kind": kind, "seed": seed,
           "params": baselines.count_params(model), "epochs": config.recipe.epochs,
           "accuracy": hist.accuracy[-1], "loss": hist.loss[-1],
           "train_s": round(hist.train_seconds, 2), "step_ms": round(hist.step_ms, 2),
           "wall_s": round(time.perf_counter() - start, 2)}
    epochs = [{"task": task_name, "model": model_name, "seed": seed, "epoch": e + 1,
               "loss": loss, "accuracy": acc}
              for e, (loss, acc) in enumerate(zip(hist.loss, hist.accuracy, strict=True))]
    return row, epochs


def experiment(tasks: list[str], models: list[str], seeds: list[int],
               configs: dict[str, Config], quick: bool = False, jobs: int = 1,
               threads: int = 1, out: Path = RESULTS) -> str:
    """Every job, `jobs` at a time (0: in this process); writes the results under `out` and
    returns the table."""
    start = time.perf_counter()
    # the ITNets first (the longest jobs), then the baselines
    todo = [(t, m, s, configs[t], quick, threads) for m in models for t in tasks for s in seeds]
    rows, epochs = [], []
    for (t, m, s, *_), (row, curve) in run_jobs(job, todo, jobs):
        rows.append(row)
        epochs += curve
        print(f"{m}/{t}/seed {s}: {row['params']:,} params, {100 * row['accuracy']:.1f} %, "
              f"{row['step_ms']:.0f} ms/step, {row['wall_s']:.0f} s", flush=True)

    def order(r: dict) -> tuple:
        return tasks.index(r["task"]), models.index(r["model"]), r["seed"]

    rows.sort(key=order)
    epochs.sort(key=lambda r: (*order(r), r["epoch"]))
    wall = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)
    write_csv(out / "epochs.csv", epochs)
    md = table(rows, configs, seeds, wall, jobs, threads)
    (out / "table.md").write_text(md)
    plot(epochs, out / "curves.png")
    return md


def _mean_std(values: list[float]) -> str:
    """Mean ± std (sample) in %; the mean alone for one value."""
    mean = f"{100 * statistics.mean(values):.1f}"
    return mean if len(values) == 1 else f"{mean} ± {100 * statistics.stdev(values):.1f}"


def table(rows: list[dict], configs: dict[str, Config], seeds: list[int], wall: float,
          jobs: int, threads: int) -> str:
    """The results as Markdown: accuracy per task and model, the best baseline and ITNet's gap
    to it, published reference points; then the sizes and costs."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    base = [m for m in models if m != "itnet"]
    kinds = sorted({r["kind"] for r in rows if r["kind"]})

    def sel(t: str, m: str) -> list[dict]:
        return [r for r in rows if (r["task"], r["model"]) == (t, m)]

    def mean_acc(t: str, m: str) -> float:
        return statistics.mean(r["accuracy"] for r in sel(t, m))

    head = [*models] + (["best baseline", "ITNet − best"] if base and "itnet" in models else [])
    lines = [f"Test accuracy (%) after the last epoch, mean ± std over seeds {seeds}"
             + (f"; ITNet's mixer: {', '.join(kinds)}" if kinds else "") + ".", "",
             "| task | " + " | ".join(head) + " | published |",
             "|---|" + "---|" * (len(head) + 1)]
    for t in tasks:
        cells = [_mean_std([r["accuracy"] for r in sel(t, m)]) if sel(t, m) else ""
                 for m in models]
        if base and "itnet" in models:
            best = max(base, key=lambda m: mean_acc(t, m))
            cells += [f"{best} {100 * mean_acc(t, best):.1f}",
                      f"{100 * (mean_acc(t, 'itnet') - mean_acc(t, best)):+.1f}"]
        pub = ", ".join(f"{m.upper()} {a}" for m, a in PUBLISHED.get(t, {}).items())
        lines.append(f"| {t} | " + " | ".join(cells) + f" | {pub} |")
    lines += ["", "Published: MNIST-1D (Greydanus & Kobak, *Scaling down deep learning with "
              "MNIST-1D*), their models, sizes and schedules, not ours.", "",
              "Parameters, and the mean seconds of training per run (ms per step); every model "
              "of a task trains with its recipe:", "",
              "| task | ITNet | epochs | batch | lr | " + " | ".join(models) + " |",
              "|---|---|---|---|---|" + "---|" * len(models)]
    for t in tasks:
        c = configs[t]
        net = (f"{c.encoder}" + (f" (window {c.window})" if c.window > 1 else "")
               + f", {c.octaves} octaves, dim {c.dim}, depth {c.depth}, "
               + ", ".join(f"{k} {v}" for k, v in c.mix.items())
               + (f", target {c.target}" if c.target else ""))
        cells = []
        for m in models:
            rs = sel(t, m)
            if rs:
                cells.append(f"{rs[0]['params']:,}: "
                             f"{statistics.mean(r['train_s'] for r in rs):.0f} s "
                             f"({statistics.mean(r['step_ms'] for r in rs):.0f} ms)")
            else:
                cells.append("")
        r = c.recipe
        lines.append(f"| {t} | {net} | {r.epochs} | {r.batch} | {r.lr:g} | "
                     + " | ".join(cells) + " |")
    at = "in one process" if jobs == 0 else f"{jobs} job(s) at a time"
    lines += ["", f"Wall time: {wall:.0f} s ({at}, {threads} thread(s) each)."]
    return "\n".join(lines) + "\n"


def plot(epochs: list[dict], path: Path) -> None:
    """Test accuracy against epoch, a panel per task, a line per model (the mean over seeds)
    with a band from the min to the max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(dict.fromkeys(r["task"] for r in epochs))
    models = list(dict.fromkeys(r["model"] for r in epochs))
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, t in zip(axes.flat, tasks, strict=False):
        for m in models:
            sel = [r for r in epochs if (r["task"], r["model"]) == (t, m)]
            xs = sorted({r["epoch"] for r in sel})
            acc = [[100 * r["accuracy"] for r in sel if r["epoch"] == e] for e in xs]
            (line,) = ax.plot(xs, [statistics.mean(a) for a in acc], label=m)
            ax.fill_between(xs, [min(a) for a in acc], [max(a) for a in acc],
                            color=line.get_color(), alpha=0.2)
        ax.set_title(t)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--kind", default=None,
                   help="ITNet's mixer kind in every block (mlp, softmax, causal, lowrank, "
                        "montecarlo; default: each task's config, mlp)")
    p.add_argument("--target", default=None,
                   help='the mixers\' compile target (default: the tensors\' device; '
                        '"reference": every pair materialised in torch)')
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: seed 0, {QUICK_EPOCHS} epochs, the first {QUICK_TRAIN} "
                        f"training and {QUICK_TEST} test examples")
    add_job_arguments(p, RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    configs = {}
    for t, c in CONFIGS.items():
        if args.kind:
            c = c.with_kind(args.kind)
        if args.target:
            c = replace(c, target=args.target)
        if args.quick:
            c = replace(c, recipe=replace(c.recipe, epochs=QUICK_EPOCHS))
        configs[t] = c
    seeds = [0] if args.quick else args.seeds
    print(experiment(args.tasks, args.models, seeds, configs, args.quick, args.jobs,
                     args.threads, args.out))


if __name__ == "__main__":
    main()
