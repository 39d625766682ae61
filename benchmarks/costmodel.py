"""Fit the small-call cost model (`itdsl/symbolic/costmodel.py`) on this machine.

    python benchmarks/costmodel.py              # measure (about 10 minutes on 2 cores), fit
    python benchmarks/costmodel.py --quick      # fewer sizes and operators

Times forward and training calls of a few operators (Gaussian sums, ITNet mixers with MLP
kernels, plain and normalised) on both paths, taking turns — the compiled kernels
(`set_small_pairs(0)`) and the materialised Plan evaluator (every call small) — at 4·10³ to
2.6·10⁵ pairs, batch 1 and 16; fits the model's constants by least squares of log times;
prints them (to paste into `costmodel.py`) and how well the model's pick does against
always-kernels and always-torch:
the mean of (time of the path picked) / (time of the faster path) over the calls measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itdsl
from itdsl.bench import GAUSS, median_times
from itdsl.nn import Mix
from itdsl.settings import small_pairs_set
from itdsl.symbolic import costmodel as C

NEVER = 1 << 62


def gauss(channels: int):
    src = GAUSS.replace("R^16", "R" if channels == 1 else f"R^{channels}")
    op = itdsl.compile_source(src, target="cpu")["gauss"]

    def make(n: int, batch: int, grad: bool):
        x, y = torch.rand(n, 3), torch.rand(n, 3)
        b = torch.randn(batch, n, channels) if channels > 1 else torch.randn(batch, n)
        b.requires_grad_(grad)

        def fn():
            if grad:
                op(X=x, Y=y, b=b).square().sum().backward()
            else:
                with torch.no_grad():
                    op(X=x, Y=y, b=b)
        return fn
    return op, make


def mix(kind: str, hidden: int, layers: int = 2):
    torch.manual_seed(0)
    m = Mix(32, kind=kind, coords=1, hidden=hidden, layers=layers)

    def make(n: int, batch: int, grad: bool):
        pos, h = torch.rand(1, n, 1), torch.randn(batch, n, 32, requires_grad=grad)

        def fn():
            if grad:
                m(h, pos).square().sum().backward()
            else:
                with torch.no_grad():
                    m(h, pos)
        return fn
    return m.op, make


def measure(quick: bool) -> list[dict]:
    cases = {"gauss C=16": lambda: gauss(16), "gauss C=1": lambda: gauss(1),
             "mlp 32x2": lambda: mix("mlp", 32), "softmax 32x2": lambda: mix("softmax", 32)}
    if not quick:
        cases |= {"mlp 64x2": lambda: mix("mlp", 64), "mlp 16x1": lambda: mix("mlp", 16, 1)}
    rows = []
    for name, build in cases.items():
        op, make = build()
        work = C.pair_work(op.plan)
        if name.startswith("gauss"):
            shapes = [(64, 1), (128, 1), (256, 1), (512, 1), (1024, 1), (32, 16), (128, 16)]
        else:
            shapes = [(16, 16), (32, 16), (64, 16), (128, 16), (256, 1), (512, 1)]
        if quick:
            shapes = shapes[::2]
        for n, batch in shapes:
            for grad in (False, True):
                fn = make(n, batch, grad)

                def on(setting, fn=fn):
                    def call():
                        with small_pairs_set(setting):
                            fn()
                    return call
                got = median_times({"kernels": on(0), "torch": on(NEVER)},
                                   5 if n * n * batch < 300_000 else 3)
                rows.append({"case": name, "work": work, "pairs": n * n * batch, "train": grad,
                             **got})
                print(f"  {name}, n={n}, batch {batch}, {'training' if grad else 'forward'}: "
                      f"kernels {got['kernels'] * 1e3:.2f} ms, torch {got['torch'] * 1e3:.2f} ms",
                      flush=True)
    return rows


def fit(rows: list[dict]) -> dict:
    from scipy.optimize import least_squares
    ops_f = np.array([r["work"].ops_forward for r in rows], float)
    ops_b = np.array([r["work"].ops_backward for r in rows], float)
    vals = np.array([r["work"].values for r in rows], float)
    gemm = np.array([r["work"].gemm for r in rows], float)
    P = np.array([r["pairs"] for r in rows], float)
    g = np.array([r["train"] for r in rows], int)
    tk = np.array([r["kernels"] for r in rows]) * 1e9
    tm = np.array([r["torch"] for r in rows]) * 1e9
    ops = ops_f + g * ops_b

    def model(th):
        a, b = np.exp(th[:8].reshape(2, 4)), th[8:]
        kern = a[g, 0] + a[g, 1] * ops + (a[g, 2] + a[g, 3] * ops) * P
        tor = np.exp(b[0] + g * b[1]) + (np.exp(b[2]) + np.exp(b[3]) * vals
                                         + np.exp(b[4]) * gemm) * np.exp(g * b[5]) * P
        return kern, tor

    def residuals(th):
        k, t = model(th)
        return np.concatenate([np.log(k / tk), np.log(t / tm)])
    th0 = np.log([1e6, 1e3, 2, 0.03, 3e6, 400, 4, 0.0125, 0.9e6, 2, 3, 0.6, 0.008, 2])
    th0[9], th0[13] = np.log(2), np.log(2)
    th = least_squares(residuals, th0).x
    a, b = np.exp(th[:8].reshape(2, 4)), th[8:]
    return {"_KERNEL_FIXED": tuple(a[:, 0]), "_KERNEL_FIXED_PER_OP": tuple(a[:, 1]),
            "_KERNEL_PAIR": tuple(a[:, 2]), "_KERNEL_OP": tuple(a[:, 3]),
            "_TORCH_FIXED": (np.exp(b[0]), np.exp(b[0] + b[1])), "_TORCH_PAIR": np.exp(b[2]),
            "_TORCH_VALUE": np.exp(b[3]), "_TORCH_GEMM": np.exp(b[4]),
            "_TORCH_TRAIN": np.exp(b[5])}


def score(rows: list[dict]) -> tuple[float, float]:
    """Mean and worst (time of the path the model picks) / (time of the faster path)."""
    q = []
    for r in rows:
        limit = C.crossover(r["work"], r["train"], 4, itdsl.settings.memory_budget()).pairs
        picked = r["torch"] if r["pairs"] <= limit else r["kernels"]
        q.append(picked / min(r["kernels"], r["torch"]))
    return float(np.mean(q)), float(np.max(q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print("measuring (float32; kernels and torch take turns per size):")
    rows = measure(args.quick)
    always_k = np.mean([r["kernels"] / min(r["kernels"], r["torch"]) for r in rows])
    always_t = np.mean([r["torch"] / min(r["kernels"], r["torch"]) for r in rows])
    mean, worst = score(rows)
    print(f"\nthe model as it stands: {mean:.3f}× the faster path on average (worst {worst:.2f}×)"
          f"; always the kernels {always_k:.3f}×, always torch {always_t:.3f}×")
    constants = fit(rows)
    saved = {k: getattr(C, k) for k in constants}
    for k, v in constants.items():
        setattr(C, k, v)
    mean, worst = score(rows)
    for k, v in saved.items():
        setattr(C, k, v)
    print(f"refitted here: {mean:.3f}× on average (worst {worst:.2f}×); its constants:")
    for k, v in constants.items():
        text = f"({v[0]:.3g}, {v[1]:.3g})" if isinstance(v, tuple) else f"{v:.3g}"
        print(f"  {k} = {text}")


if __name__ == "__main__":
    main()
