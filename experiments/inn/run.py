"""Runs the whole experiment: for each model × data set × seed, train a discrete network, prune
it with every arm at every rate (no fine-tuning), check that conversion is exact, time the
pruned models; writes results/results.csv, checks.csv, timing.csv, table.md, pruning.png and
prints the table.

    python -m experiments.inn.run            # full: 3 seeds, rates 0, 0.1, …, 0.8
    python -m experiments.inn.run --quick    # smoke run: 1 seed, 4 rates, 1 epoch

Each seed of each model on each data set is a job in a process of its own (--jobs at a
time, one per core by default); the timings run afterwards, alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from itdsl import inn

from ..common import add_job_arguments, run_jobs, write_csv
from . import data as datasets
from . import models, prune, train

RESULTS = Path(__file__).parent / "results"
EPOCHS = {"digits": 20, "mnist": 8}  # a few minutes in all on 2 CPU cores
TIMING_RATES = (0.3, 0.5)
TIMING_BATCH = 256
TIMING_REPEATS = 15


def seed_rows(model_name: str, ds_name: str, seed: int, rates: list[float], epochs: int,
              threads: int) -> tuple[list[dict], list[dict], dict, float]:
    """One seed of one model on one data set (a job of its own, in a process of its own):
    the accuracy of every arm at every rate, the exactness checks, the trained model's
    state_dict (for the timings) and the job's wall time."""
    start = time.perf_counter()
    torch.set_num_threads(threads)
    split = datasets.DATASETS[ds_name]()
    rows, checks = [], []
    x, y = split.x_test, split.y_test
    torch.manual_seed(seed)
    model = train.train(models.MODELS[model_name](), split, epochs, seed,
                        desc=f"{model_name}/{ds_name}/seed {seed}")
    groups, _ = prune.layer_groups(model, x[:2])
    run = prune.Run(models.MODELS[model_name], epochs, seed)
    for arm, (_, prepare) in prune.ARMS.items():
        pruner = prepare(model, split, run)
        for r in rates:
            rows.append({"model": model_name, "dataset": ds_name, "seed": seed, "arm": arm,
                         "rate": r, "accuracy": train.accuracy(pruner(r), x, y),
                         "channels": sum(prune.widths(groups, r).values())})
    found = {f"convert(permute={p}) vs model, full size":
             prune.conversion_error(model, split, p) for p in (False, True)}
    net = inn.convert(model, x[:2])
    found |= {f"export() vs IntegralNet, r = {r}": prune.export_error(net.resample(1 - r), split)
              for r in TIMING_RATES}
    checks += [{"model": model_name, "dataset": ds_name, "seed": seed, "check": k,
                "max_abs_diff": diff, "max_abs_logit": scale}
               for k, (diff, scale) in found.items()]
    return rows, checks, model.state_dict(), time.perf_counter() - start


def timing_rows(model_name: str, ds_name: str, model: torch.nn.Module,
                split: datasets.Split) -> list[dict]:
    """Parameters and median forward time of the L1-pruned and exported INN models."""
    out = []
    x = split.x_test[:TIMING_BATCH]
    for r in TIMING_RATES:
        variants = prune.timing_variants(model, split, r)
        ms = prune.timings(variants, x, TIMING_REPEATS)
        out += [{"model": model_name, "dataset": ds_name, "rate": r, "variant": k,
                 "params": prune.params(m), "ms_median": ms[k]} for k, m in variants.items()]
    return out


def _cell(values: list[float]) -> str:
    """Median over seeds in %, with the min–max range where there are several seeds."""
    med = f"{100 * statistics.median(values):.1f}"
    if len(values) == 1:
        return med
    return f"{med} ({100 * min(values):.1f}–{100 * max(values):.1f})"


def table(rows: list[dict], checks: list[dict], timing: list[dict], rates: list[float],
          seeds: list[int], wall: float, jobs: int = 1) -> str:
    """The results as Markdown: accuracy per arm and rate, the checks, the timings."""
    lines = [f"Test accuracy (%) without fine-tuning, median over seeds {seeds}"
             + (" (min–max)" if len(seeds) > 1 else "") + "; columns: % of every channel "
             "group removed.", "",
             "| model | data | arm | " + " | ".join(f"{round(100 * r)} %" for r in rates) + " |",
             "|---|---|---|" + "---|" * len(rates)]
    for m in models.MODELS:
        for d in datasets.DATASETS:
            for arm, (label, _) in prune.ARMS.items():
                cells = [_cell([w["accuracy"] for w in rows if (w["model"], w["dataset"],
                                w["arm"], w["rate"]) == (m, d, arm, r)]) for r in rates]
                lines.append(f"| {m} | {d} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "Exactness (float32; max |Δlogits| on the test split, the worst over seeds, "
              "and the largest |logit| for scale):", "",
              "| model | data | check | max abs diff | max abs logit |", "|---|---|---|---|---|"]
    seen = dict.fromkeys((c["model"], c["dataset"], c["check"]) for c in checks)
    for key in seen:
        sel = [c for c in checks if (c["model"], c["dataset"], c["check"]) == key]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | "
                     f"{max(c['max_abs_diff'] for c in sel):.2e} | "
                     f"{max(c['max_abs_logit'] for c in sel):.1f} |")
    lines += ["", f"Pruned models, seed {seeds[0]}: parameters and median forward time of a "
              f"batch of {TIMING_BATCH} test images ({TIMING_REPEATS} interleaved rounds, "
              f"{torch.get_num_threads()} thread(s)):", "",
              "| model | data | removed | variant | params | ms |", "|---|---|---|---|---|---|"]
    for t in timing:
        lines.append(f"| {t['model']} | {t['dataset']} | {round(100 * t['rate'])} % | "
                     f"{t['variant']} | {t['params']:,} | {t['ms_median']:.2f} |")
    lines += ["", f"Wall time: {wall:.0f} s ({jobs} job(s) at a time, 1 process each)."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against % channels removed, a panel per model × data set, a line per arm
    (the median over seeds) with a band from the min to the max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ms, ds = list(models.MODELS), list(datasets.DATASETS)
    fig, axes = plt.subplots(len(ms), len(ds), figsize=(5 * len(ds), 3.6 * len(ms)),
                             squeeze=False, sharey=True)
    for i, m in enumerate(ms):
        for j, d in enumerate(ds):
            ax = axes[i][j]
            for arm, (label, _) in prune.ARMS.items():
                sel = [w for w in rows if (w["model"], w["dataset"], w["arm"]) == (m, d, arm)]
                rates = sorted({w["rate"] for w in sel})
                acc = [[100 * w["accuracy"] for w in sel if w["rate"] == r] for r in rates]
                xs = [100 * r for r in rates]
                (line,) = ax.plot(xs, [statistics.median(a) for a in acc], marker="o",
                                  label=label)
                ax.fill_between(xs, [min(a) for a in acc], [max(a) for a in acc],
                                color=line.get_color(), alpha=0.2)
            ax.set_title(f"{m}, {d}")
            ax.set_xlabel("% of channels removed (no fine-tuning)")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1 seed, rates 0/0.3/0.5/0.8, 1 epoch")
    add_job_arguments(p, RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [0] if args.quick else [0, 1, 2]
    rates = [0.0, 0.3, 0.5, 0.8] if args.quick else [i / 10 for i in range(9)]
    start = time.perf_counter()
    rows, checks, timing, states = [], [], [], {}
    # one process per (model, data set, seed), `--jobs` at a time, the longest first
    todo = [(m, d, seed, rates, 1 if args.quick else EPOCHS[d], args.threads)
            for d in reversed(list(datasets.DATASETS)) for m in reversed(list(models.MODELS))
            for seed in seeds]
    for (m, d, seed, *_), (r, c, state, secs) in run_jobs(seed_rows, todo, args.jobs):
        rows += r
        checks += c
        states[m, d, seed] = state
        print(f"{m}/{d}/seed {seed}: {secs:.0f} s", flush=True)
    # the timings in this process alone, after every job (the trained model of the first seed)
    torch.set_num_threads(args.threads)
    for d, load in datasets.DATASETS.items():
        split = load()
        for m in models.MODELS:
            model = models.MODELS[m]()
            model.load_state_dict(states[m, d, seeds[0]])
            timing += timing_rows(m, d, model.eval(), split)
    def order(w: dict) -> tuple:
        return (list(models.MODELS).index(w["model"]),
                list(datasets.DATASETS).index(w["dataset"]), w["seed"])
    rows.sort(key=order)
    checks.sort(key=order)
    wall = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "results.csv", rows)
    write_csv(args.out / "checks.csv", checks)
    write_csv(args.out / "timing.csv", timing)
    md = table(rows, checks, timing, rates, seeds, wall, args.jobs)
    (args.out / "table.md").write_text(md)
    plot(rows, args.out / "pruning.png")
    print(md)


if __name__ == "__main__":
    main()
