"""The Gaussian kernel sum sharded over processes (itdsl.distributed, gloo) against one process.

    python benchmarks/distributed.py            # n = m = 8,000 points, 16 channels, float32
    python benchmarks/distributed.py --n 2000   # smaller

Runs the same forward and forward+backward (gradients of Y's field b and coordinates) as
  - one process with 1 thread, and with as many threads as the processes below have in all;
  - W processes of 1 thread each (gloo on this machine), each with 1/W of the output points
    and 1/W of Y, sharded over Y: the slices all-gathered, the gradients all-reduced.
Times are medians of repeated calls, the slowest rank's (a barrier closes each call). The
efficiency is T(1 process, 1 thread) / (W · T(W processes)): 100 % is a perfect split.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(n: int, channels: int, reps: int) -> None:
    """One rank (RANK, WORLD_SIZE, MASTER_* in the environment; one process: no group)."""
    import torch
    import torch.distributed as dist

    import itdsl
    from itdsl import distributed as itdist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    op = itdsl.compile_file(ROOT / "examples" / "gauss.it", target="cpu")["gauss_smooth"]
    g = torch.Generator().manual_seed(0)
    X, Y, b = (torch.rand(n, 3, generator=g), torch.rand(n, 3, generator=g),
               torch.randn(n, channels, generator=g))
    if world > 1:
        mine = torch.tensor_split(torch.arange(n), world)[rank]
        X, Y, b = X[mine], Y[mine], b[mine]
        op = itdist.shard(op, over="Y")
    Y.requires_grad_()
    b.requires_grad_()

    def sync():
        if world > 1:
            dist.barrier()

    def fwd():
        with torch.no_grad():
            op(X=X, Y=Y, b=b)

    def fwd_bwd():
        op(X=X, Y=Y, b=b).square().sum().backward()

    times = {}
    for name, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
        fn()  # warm-up (the kernels compiled, or loaded from the cache)
        runs = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            runs.append(time.perf_counter() - t0)
        times[name] = 1e3 * statistics.median(runs)
    if rank == 0:
        print(json.dumps(times), flush=True)
    if world > 1:
        dist.destroy_process_group()


def launch(world: int, threads: int, n: int, channels: int, reps: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": str(threads), "TVM_NUM_THREADS": str(threads),
               "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", "--n", str(n), "--channels", str(channels),
             "--reps", str(reps)], env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank failed (world {world})")
    return json.loads(outs[0].strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8000, help="points of X and of Y")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--world", type=int, default=2, help="processes of the sharded run")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.n, a.channels, a.reps)
        return
    w = a.world
    runs = [("1 process, 1 thread", 1, launch(1, 1, a.n, a.channels, a.reps)),
            (f"1 process, {w} threads", w, launch(1, w, a.n, a.channels, a.reps)),
            (f"{w} processes (gloo), 1 thread each", w, launch(w, 1, a.n, a.channels, a.reps))]
    one = runs[0][2]
    print(f"Gaussian kernel sum, n = m = {a.n:,}, {a.channels} channels, float32, "
          f"{os.cpu_count()} cores; medians of {a.reps} calls (ms)\n")
    print("| run | forward | forward+backward | efficiency (fwd / fwd+bwd) |")
    print("|---|---|---|---|")
    for name, cores, t in runs:
        eff = " / ".join(f"{100 * one[k] / (cores * t[k]):.0f} %" for k in t)
        print(f"| {name} | {t['forward']:.0f} | {t['forward+backward']:.0f} | {eff} |")


if __name__ == "__main__":
    main()
