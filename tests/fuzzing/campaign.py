"""The differential fuzzer's campaign (`make fuzz`, `python -m fuzzing`).

Programs `seed .. seed+n-1` run through the torch paths (reference, Plan evaluator, the
automatic strategy when it runs in torch); `tvm` of them, spread evenly, through the TVM
kernels too, in float64 and float32. Worker processes run them (one thread each), one kernel
cache serves the whole run, a program that hangs or crashes its worker is reported as such.
Every failing program is saved under tests/fuzz_corpus/new/ (an inbox: shrink one by hand
and move it to tests/fuzz_corpus/ to have CI replay it).
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from pathlib import Path

from .corpus import save
from .paths import Failure, Report, run_case

RECYCLE = 400  # programs per worker process before a fresh one (custom ops pile up)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _worker(tasks, results, current, started, timeout: int) -> None:
    """Run programs from `tasks`; `current` (shared memory, so it survives a crash) holds the
    seed being run, -1 between programs."""
    os.environ["TVM_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    for _ in range(RECYCLE):
        item = tasks.get()
        if item is None:
            return
        seed, tvm = item
        current.value, started.value = seed, time.time()
        signal.alarm(timeout * (4 if tvm else 1))
        try:
            report = run_case(seed, tvm)
        except _Timeout:
            report = _crashed(seed, "timeout", f"over {timeout * (4 if tvm else 1)} s")
        except Exception as e:
            report = _crashed(seed, f"raised {type(e).__name__}", str(e)[:300])
        finally:
            signal.alarm(0)
        results.put(report)
        current.value = -1


def _crashed(seed: int, kind: str, detail: str) -> Report:
    from .generate import generate
    g = generate(seed)
    return Report(seed, g.family, g.text, g.name, failures=[Failure("harness", "forward",
                                                                     kind, detail)])


class Pool:
    """Worker processes fed seeds from one queue; a dead or hung worker is replaced and its
    program reported."""

    def __init__(self, jobs: int, timeout: int):
        self.ctx = mp.get_context("spawn")
        self.tasks, self.results = self.ctx.Queue(), self.ctx.Queue()
        self.timeout = timeout
        self.workers: list[tuple] = []  # (process, current seed, start time)
        self.deaths = 0  # workers that died before running anything
        for _ in range(jobs):
            self._spawn()

    def _spawn(self) -> None:
        current, started = self.ctx.Value("q", -1), self.ctx.Value("d", 0.0)
        p = self.ctx.Process(target=_worker, daemon=True,
                             args=(self.tasks, self.results, current, started, self.timeout))
        p.start()
        self.workers.append((p, current, started))

    def run(self, items: list[tuple[int, bool]]):
        """Yield one Report per item, in the order they finish."""
        self.tvm_of = dict(items)
        for item in items:
            self.tasks.put(item)
        left = len(items)
        while left:
            try:
                report = self.results.get(timeout=2)
            except queue.Empty:
                report = None
            if report is not None:
                left -= 1
                yield report
            for report in self._reap():
                left -= 1
                yield report
        for _ in self.workers:
            self.tasks.put(None)

    def _reap(self) -> list[Report]:
        """Replace workers that died (a crash, or recycled) or hang; report their program."""
        out = []
        for w in list(self.workers):
            p, current, started = w
            seed = current.value
            limit = self.timeout * (8 if self.tvm_of.get(seed) else 2)
            hung = seed >= 0 and time.time() - started.value > limit
            if p.is_alive() and not hung:
                continue
            if hung:
                p.kill()
            p.join()
            if seed >= 0:
                kind = "hung" if hung else f"worker died (exit code {p.exitcode})"
                out.append(_crashed(seed, kind, "the process running it stopped"))
            elif p.exitcode:
                self.deaths += 1
                if self.deaths > 3:
                    raise RuntimeError(f"fuzz workers die on start (exit code {p.exitcode})")
            self.workers.remove(w)
            self._spawn()
        return out


class Summary:
    """Counts, failure classes and times of a campaign."""

    def __init__(self):
        self.run = self.skipped = self.failed = 0
        self.classes: dict[str, list[int]] = collections.defaultdict(list)
        self.skips: collections.Counter = collections.Counter()
        self.seconds: collections.Counter = collections.Counter()
        self.by_kind: collections.Counter = collections.Counter()  # torch / tvm program time
        self.count: collections.Counter = collections.Counter()
        self.strategies: collections.Counter = collections.Counter()

    def add(self, report: Report, tvm: bool) -> None:
        if report.skipped:
            self.skipped += 1
            self.skips[report.skipped.split(":")[0]] += 1
            return
        self.run += 1
        kind = "tvm" if tvm else "torch"
        self.count[kind] += 1
        self.by_kind[kind] += report.seconds.get("total", 0.0)
        self.strategies[report.strategy] += 1
        for path, s in report.seconds.items():
            self.seconds[path] += s
        if report.failures:
            self.failed += 1
        for klass in sorted({f.klass for f in report.failures}):
            self.classes[klass].append(report.seed)

    def text(self, wall: float) -> str:
        lines = [f"programs run: {self.run} ({self.count['torch']} torch paths only, "
                 f"{self.count['tvm']} with the TVM kernels); skipped: {self.skipped} "
                 f"{dict(self.skips)}; failing: {self.failed}; wall time {wall:.0f} s"]
        for kind, per in (("torch", 1000), ("tvm", 100)):
            if self.count[kind]:
                lines.append(f"  cpu time per {per} {kind} programs: "
                             f"{self.by_kind[kind] / self.count[kind] * per:.0f} s")
        lines.append("  strategies: " + ", ".join(f"{s} {n}" for s, n in
                                                  self.strategies.most_common()))
        lines.append("  cpu time by path: " + ", ".join(
            f"{p} {s:.0f} s" for p, s in sorted(self.seconds.items()) if p != "total"))
        lines.append("failures by class (programs, first seeds):")
        for klass, seeds in sorted(self.classes.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  {len(seeds):5d}  {klass}  [{', '.join(map(str, seeds[:5]))}]")
        return "\n".join(lines)


def _progress(total: int):
    try:
        from tqdm import tqdm
        # not on a terminal (CI logs, `make fuzz > log`): a line a minute, not a redraw a second
        tty = sys.stderr.isatty()
        # (miniters=1: tqdm's adaptive count would otherwise wait for hundreds of programs
        # once the slow ones, through the kernels, begin)
        return tqdm(total=total, unit="prog", smoothing=0.05, mininterval=1 if tty else 60,
                    miniters=1)
    except ImportError:
        return None


def campaign(n: int, tvm: int, seed: int, jobs: int, timeout: int, out: Path) -> int:
    """Run the campaign; return the number of failing programs."""
    os.environ.setdefault("ITDSL_CACHE_DIR", str(Path.home() / ".cache" / "itdsl-fuzz"))
    tvm_seeds = {seed + k * n // tvm for k in range(tvm)} if tvm else set()
    items = [(s, s in tvm_seeds) for s in range(seed, seed + n)]
    summary, bar, t0 = Summary(), _progress(n), time.time()
    for done, report in enumerate(Pool(jobs, timeout).run(items), 1):
        tvm_run = report.seed in tvm_seeds
        summary.add(report, tvm_run)
        if report.failures:
            save(report, out, tvm_run)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(failing=summary.failed, refresh=False)
        elif done % 100 == 0:
            print(f"{done}/{n} programs, {summary.failed} failing", flush=True)
    if bar is not None:
        bar.close()
    print(summary.text(time.time() - t0))
    print(f"failing programs saved under {out}")
    return summary.failed
