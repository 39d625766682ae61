"""What the experiments' harnesses share: seeded shuffled batches, jobs in spawned processes,
CSV files."""

from __future__ import annotations

import csv
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch


class Shuffled:
    """Batches of `batch` rows of every tensor in `tensors` (the same rows of each; a None
    stays None), in a new order on every pass, drawn from a generator seeded with `seed`."""

    def __init__(self, tensors: Sequence[torch.Tensor | None], batch: int, seed: int):
        self.tensors = tuple(tensors)
        self.n = len(next(t for t in self.tensors if t is not None))
        self.batch = batch
        self.g = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.n // self.batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, ...]]:
        order = torch.randperm(self.n, generator=self.g)
        for i in range(0, self.n, self.batch):
            idx = order[i:i + self.batch]
            yield tuple(None if t is None else t[idx] for t in self.tensors)


def add_job_arguments(parser, results: Path) -> None:
    """A harness's `--threads`, `--jobs` (for `run_jobs`) and `--out` options."""
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per job (1: on a shared machine, 2 OpenMP threads "
                             "ran up to 100× slower than 1)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="jobs at a time, each in a process of its own (default: one per "
                             "core; 0: in this process)")
    parser.add_argument("--out", type=Path, default=results)


def run_jobs(fn: Callable, jobs: Sequence[tuple], workers: int) -> Iterator[tuple[tuple, object]]:
    """`(job, fn(*job))` for every job, as each finishes: `workers` spawned processes at a time
    (fresh interpreters: no torch state inherited from this one), or in this process, in order,
    with `workers == 0` (for tests and debugging)."""
    if workers == 0:
        for job in jobs:
            yield job, fn(*job)
        return
    with ProcessPoolExecutor(max_workers=workers,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        running = {pool.submit(fn, *job): job for job in jobs}
        for done in as_completed(running):
            yield running[done], done.result()


def write_csv(path: Path, rows: list[dict]) -> None:
    """`rows` (dicts with the same keys, in order) as a CSV file with a header."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
