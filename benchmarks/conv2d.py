"""lattice_conv against the library calls it stands for, side by side in one process.

    python benchmarks/conv2d.py [--repeats 7] [--quick]

Each case times the itdsl operator and its torch counterpart, interleaved (a, b, a, b, ...),
and prints the medians and their ratio (itdsl / torch). The stencil cases run in inference
(torch.no_grad(): the sampled weights are kept per param version), float32, the shapes of a
ResNet stage (56×56, batch 32, 64 channels); a "train" row times forward + backward with
autograd recording (the weights sampled on every call). The global kernel of p − q (FFT)
is timed against the generated dense kernels and the Plan evaluator of the same Plan (the
bar: 20× faster than the dense kernels, a ratio ≤ 0.05). Unless --system-malloc, glibc's
malloc keeps freed memory (`itdsl.tune_malloc()`), as it would for a training loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import itdsl  # noqa: E402
from itdsl.runtime.binding import bind  # noqa: E402
from itdsl.runtime.plan_eval import evaluate_plan  # noqa: E402


def depthwise(k: int, c: int) -> str:
    return f"""operator blur {{
    domain P = index(2)
    domain T = stencil({k}, {k})
    input  f : P -> R^{c}
    param  w : R^{c} = 1.0
    output g(p: P) = integral(t: T) exp(-sqnorm(t) / (2 * w^2)) * f(p + t)
}}"""


def inn(read: str = "p + t", out: str = "P") -> str:
    """The INN convolution layer of examples/integral_conv3x3.it (stride 2: read at 2q + t)."""
    return f"""operator inn {{
    domain U = grid(0, 1)
    domain V = grid(0, 1)
    domain P = index(2)
    domain Q = index(2)
    domain T = stencil(3, 3)
    input  f : V * P -> R
    param  W : spline(16, 16, per = T)
    param  c : spline(16)
    output g(u: U, p: {out}) = c(u) + integral(v: V, t: T) W(u, v, t) * f(v, {read})
        with (trapezoid, sum)
}}"""


GLOBAL = """operator glob {
    domain P = index(2)
    input f : P -> R^4
    param s : R = 4.0
    output g(p: P) = integral(q: P) exp(-sqnorm(p - q) / s) * f(q)
}"""


def timed(fn, repeats: int, *others) -> list[list[float]]:
    """Interleaved timings of `fn` and `others` (seconds), after three warm-up calls each
    (the first calls of a shape build torch's FFT plans, and its allocator's free lists)."""
    fns = (fn, *others)
    for _ in range(3):
        for f in fns:
            f()
    out = [[] for _ in fns]
    for _ in range(repeats):
        for f, ts in zip(fns, out):
            t0 = time.perf_counter()
            f()
            out[fns.index(f)].append(time.perf_counter() - t0)
    return out


def row(name: str, ours: list[float], theirs: list[float], what: str, bar: float | None) -> str:
    a, b = statistics.median(ours), statistics.median(theirs)
    ok = "" if bar is None else ("  ok" if a / b <= bar else f"  OVER the {bar}× bar")
    ratio = f"{a / b:6.2f}×" if a / b >= 0.1 else f"1/{b / a:<4.1f}"  # (1/20: 20× faster)
    return (f"| {name:<44} | {a * 1e3:9.2f} | {b * 1e3:9.2f} | {ratio:>7} | {what:<30} |"
            f"{ok}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="smaller shapes (a smoke test)")
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc's malloc as it is (else `itdsl.tune_malloc()`)")
    args = ap.parse_args()
    tuned = not args.system_malloc and itdsl.tune_malloc()
    torch.manual_seed(0)
    B, C, H = (4, 16, 24) if args.quick else (32, 64, 56)
    reps = args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"batch {B}, {C} channels, {H}×{H}; medians of {reps} interleaved runs (ms); malloc "
          f"{'tuned (itdsl.tune_malloc())' if tuned else 'as the system has it'}\n")
    print(f"| {'case':<44} | {'itdsl':>9} | {'torch':>9} | {'ratio':>7} | "
          f"{'torch counterpart':<30} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 11}|{'-' * 9}|{'-' * 32}|")
    lines = []

    # ---- depthwise (blur2d-style): [B, H, W, C] channels last, as the language lays fields out
    for k in (3, 5):
        op = itdsl.compile_source(depthwise(k, C), target="cpu")["blur"]
        with torch.no_grad():
            op.w.copy_(0.5 + torch.rand(C))
        x = torch.randn(B, H, H, C)
        xc = x.permute(0, 3, 1, 2).contiguous()  # torch's own NCHW
        t = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
        sq = t[:, None] ** 2 + t[None, :] ** 2
        w = torch.exp(-sq / (2 * op.w.detach()[:, None, None] ** 2))[:, None].contiguous()
        with torch.no_grad():
            got = op(f=x)
            want = F.conv2d(xc, w, padding=k // 2, groups=C).permute(0, 2, 3, 1)
            assert op.last_run == "lattice_conv"
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            ours, theirs = timed(lambda: op(f=x), reps,
                                 lambda: F.conv2d(xc, w, padding=k // 2, groups=C))
        lines.append(row(f"depthwise {k}×{k}, inference", ours, theirs,
                         f"F.conv2d(groups={C}), NCHW", 1.5))
        print(lines[-1], flush=True)
        with torch.no_grad():  # the same layout for torch: its channels-last view
            xv = x.permute(0, 3, 1, 2)
            ours, theirs = timed(lambda: op(f=x), reps,
                                 lambda: F.conv2d(xv, w, padding=k // 2, groups=C))
        lines.append(row(f"depthwise {k}×{k}, inference", ours, theirs,
                         "the same on NHWC (a view)", 1.5))
        print(lines[-1], flush=True)
        xg = x.clone().requires_grad_(True)
        wp = op.w.detach().clone().requires_grad_(True)

        def torch_train():  # (NCHW-contiguous depthwise backward is far slower here)
            ww = torch.exp(-sq / (2 * wp[:, None, None] ** 2))
            F.conv2d(xg.permute(0, 3, 1, 2), ww[:, None], padding=k // 2,
                     groups=C).sum().backward()

        ours, theirs = timed(lambda: op(f=xg).sum().backward(), max(3, reps // 2), torch_train)
        lines.append(row(f"depthwise {k}×{k}, train (fwd + bwd)", ours, theirs,
                         "NHWC view, weights from w", 1.5))
        print(lines[-1], flush=True)

    # ---- the INN layer: 64 -> 64 channels, stride 1 and 2
    for stride in (1, 2):
        src = inn() if stride == 1 else inn("2*p + t", "Q")
        op = itdsl.compile_source(src, target="cpu")["inn"]
        x = torch.randn(B, C, H, H)
        conv = torch.nn.Conv2d(C, C, 3, stride=stride, padding=1)
        size = {"U": C} if stride == 1 else {"U": C, "Q": (H // 2, H // 2)}
        with torch.no_grad():
            op(f=x, **size)
            assert op.last_run == "lattice_conv"
            ours, theirs = timed(lambda: op(f=x, **size), reps, lambda: conv(x))
        lines.append(row(f"INN conv3x3 {C}→{C}, stride {stride}, inference", ours, theirs,
                         f"nn.Conv2d({C}, {C}, 3, stride={stride})", 1.5))
        print(lines[-1], flush=True)
    xg = torch.randn(B, C, H, H, requires_grad=True)
    op = itdsl.compile_source(inn(), target="cpu")["inn"]
    conv = torch.nn.Conv2d(C, C, 3, padding=1)
    ours, theirs = timed(lambda: op(f=xg, U=C).sum().backward(), max(3, reps // 2),
                         lambda: conv(xg).sum().backward())
    lines.append(row(f"INN conv3x3 {C}→{C}, train (fwd + bwd)", ours, theirs,
                     "nn.Conv2d (its weights direct)", None))
    print(lines[-1], flush=True)

    # ---- the stencils against the generated dense kernels of the same Plan (batch 4: the
    # pair loop is slow); absent where reads at computed points have no TVM lowering yet
    Bd = min(B, 4)
    for name, src, kw in (
            ("depthwise 3×3", depthwise(3, C), {"f": torch.randn(Bd, H, H, C)}),
            (f"INN conv3x3 {C}→{C}", inn(), {"f": torch.randn(Bd, C, H, H), "U": C})):
        opname = "blur" if "blur" in src else "inn"
        op = itdsl.compile_source(src, target="cpu")[opname]
        dense = itdsl.compile_source(src, target="cpu", strategy="dense")[opname]
        dense.load_state_dict(op.state_dict())
        label = f"{name}, batch {Bd}, inference"
        try:
            with torch.no_grad():
                torch.testing.assert_close(op(**kw), dense(**kw), rtol=1e-3, atol=1e-3)
                ours, theirs = timed(lambda: op(**kw), 3, lambda: dense(**kw))
        except itdsl.ItdslError as e:
            lines.append(f"| {label:<44} | {'':>9} | {'n/a':>9} | {'':>7} | "
                         f"{'dense kernels: ' + str(e).split(':')[-1].strip():<30} |")
        else:
            lines.append(row(label, ours, theirs, "the dense TVM kernels", None))
        print(lines[-1], flush=True)

    # ---- a global kernel of p − q: FFT against the dense kernels and the Plan evaluator
    n = 24 if args.quick else 64
    for b, c in ((4, 4), (1, 1)):
        src = GLOBAL.replace("R^4", f"R^{c}")
        op = itdsl.compile_source(src, target="cpu")["glob"]
        dense = itdsl.compile_source(src, target="cpu", strategy="dense")["glob"]
        dense.load_state_dict(op.state_dict())
        f = torch.randn(b, n, n, c)
        label = f"global exp(-|p−q|²/s), {n}×{n}, batch {b}, R^{c}"
        with torch.no_grad():
            x, y = op(f=f), dense(f=f)
            assert op.last_run == "lattice_conv" and dense.last_run == "kernels"
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-3)
            ours, theirs = timed(lambda: op(f=f), reps, lambda: dense(f=f))
            lines.append(row(label, ours, theirs, "the dense TVM kernels",
                             None if args.quick else 1 / 20))
            print(lines[-1], flush=True)
            if b == 1:
                continue
            params = dict(op.named_parameters())
            bound = bind(op.ir, {"f": f})
            ours, theirs = timed(lambda: op(f=f), 3,
                                 lambda: evaluate_plan(op.plan, params, bound))
            lines.append(row(label, ours, theirs, "the Plan evaluator (torch)", None))
            print(lines[-1], flush=True)

if __name__ == "__main__":
    main()
