"""A/B timing of one operator between an earlier commit and the working tree.

    python benchmarks/ab.py --base HEAD~1 --pairs 15          # gauss forward, n = m = 10^4
    python benchmarks/ab.py --base HEAD~1 --case conv         # also: attention, inn, ema

The earlier commit is checked out in a git worktree with a virtual environment of its own
(under `.ab/`, made once and kept); the working tree runs in this interpreter's environment.
Each measurement is a fresh process (median of `--calls` forward calls after a warm-up, the
kernels compiled beforehand into a cache of each side's own); A and B alternate, so load on
the machine hits both alike, and the verdict is the median of the paired ratios B/A.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AB = ROOT / ".ab"

# One measurement, run in a child process with the side's interpreter and code: the median
# of `calls` timed calls of `fn` after a warm-up. Each case uses the public API only (so the
# base commit runs it too).
CHILD = r"""
import json, statistics, sys, time, torch
import itdsl
case, examples = sys.argv[1], sys.argv[5]
n, C, calls = (int(a) for a in sys.argv[2:5])
g = torch.Generator().manual_seed(0)
if case == "gauss":  # the dense pair kernels, forward
    op = itdsl.compile_file(examples + "/gauss.it", target="cpu")["gauss_smooth"]
    X, Y = torch.rand(n, 3, generator=g), torch.rand(n, 3, generator=g)
    b = torch.randn(n, C, generator=g)
    def fn():
        with torch.no_grad():
            op(X=X, Y=Y, b=b)
elif case == "attention":  # the tiled online softmax (a position term), forward + backward
    src = ("operator alibi { domain T = index  input q : T -> R^64  input k : T -> R^64 "
           "input v : T -> R^64  param slope : R = 0.05 "
           "kernel a(t: T, s: T) = exp(dot(q(t), k(s)) / 8 - slope * abs(t - s)) "
           "output o(t: T) = integral(s: T) a(t, s) * v(s) / integral(s: T) a(t, s) }")
    op = itdsl.compile_source(src, target="cpu")["alibi"]
    q, k, v = (torch.randn(4, n // 4, 64, generator=g).requires_grad_() for _ in range(3))
    def fn():
        op(q=q, k=k, v=v).sum().backward()
elif case == "conv":  # bump_conv: sampled taps + depthwise conv1d, forward + backward
    op = itdsl.compile_file(examples + "/bump_conv.it", target="cpu")["bump_conv"]
    f = torch.randn(8, n, 8, generator=g).requires_grad_()
    def fn():
        op(f=f).sum().backward()
elif case == "inn":  # integral_linear: the sampled matrix and a GEMM, forward
    op = itdsl.compile_file(examples + "/inn_linear.it", target="cpu")["integral_linear"]
    f = torch.randn(64, n // 8, generator=g)
    def fn():
        with torch.no_grad():
            op(f=f, U=n // 8)
elif case == "ema":  # the exponential scan, forward + backward
    op = itdsl.compile_file(examples + "/ema.it", target="cpu")["ema"]
    f = torch.randn(4, n, 16, generator=g).requires_grad_()
    def fn():
        op(f=f).sum().backward()
fn()
times = []
for _ in range(calls):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
print(json.dumps(statistics.median(times)))
"""


def _run(cmd: list[str], **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def base_side(rev: str) -> tuple[str, Path]:
    """(python, source root) of `rev`: a worktree and a venv under .ab/, made once."""
    sha = _run(["git", "-C", str(ROOT), "rev-parse", "--short", rev]).strip()
    tree, venv = AB / sha, AB / f"venv-{sha}"
    if not tree.exists():
        _run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), sha])
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"making a venv for {sha} (once) ...", flush=True)
        _run([sys.executable, "-m", "venv", str(venv)])
        _run([str(py), "-m", "pip", "install", "--quiet", "torch==2.13.0"])
        _run([str(py), "-m", "pip", "install", "--quiet", "-e", str(tree)])
    return str(py), tree


def measure(py: str, tree: Path, cache: str, args) -> float:
    env = {**os.environ, "ITDSL_CACHE_DIR": cache, "PYTHONPATH": ""}
    out = _run([py, "-c", CHILD, args.case, str(args.n), str(args.channels), str(args.calls),
                str(tree / "examples")], env=env, cwd=str(tree))
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD~1", help="the earlier commit (A)")
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--case", default="gauss",
                    choices=("gauss", "attention", "conv", "inn", "ema"))
    ap.add_argument("--calls", type=int, default=9, help="forward calls per measurement")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--channels", type=int, default=16)
    args = ap.parse_args()
    a_py, a_tree = base_side(args.base)
    b_py, b_tree = sys.executable, ROOT
    caches = [tempfile.mkdtemp(prefix="itdsl-ab-a-"), tempfile.mkdtemp(prefix="itdsl-ab-b-")]
    ratios, times_a, times_b = [], [], []
    for k in range(args.pairs):
        order = [(0, a_py, a_tree), (1, b_py, b_tree)]
        if k % 2:  # alternate which side goes first
            order.reverse()
        got = {}
        for side, py, tree in order:
            got[side] = measure(py, tree, caches[side], args)
        times_a.append(got[0])
        times_b.append(got[1])
        ratios.append(got[1] / got[0])
        print(f"pair {k + 1:2d}: A {got[0] * 1e3:7.1f} ms  B {got[1] * 1e3:7.1f} ms  "
              f"B/A {ratios[-1]:.3f}", flush=True)
    q = statistics.quantiles(ratios, n=4)
    print(f"{args.case} n={args.n} C={args.channels}: A (base {args.base}) median "
          f"{statistics.median(times_a) * 1e3:.1f} ms, B (working tree) median "
          f"{statistics.median(times_b) * 1e3:.1f} ms; paired B/A median "
          f"{statistics.median(ratios):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f}, {args.pairs} pairs)")


if __name__ == "__main__":
    main()
