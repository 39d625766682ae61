"""`itdsl bench`: time against size for itdsl and its peers, measured side by side in one
process, written as a markdown table and a PNG plot.

    itdsl bench                    # a few minutes on 2 cores
    itdsl bench --quick            # smaller sizes, fewer repeats (a smoke run)
    itdsl bench --out results/     # where bench.md and bench.png go (default: itdsl-bench/)

The cases: a Gaussian kernel sum Σ_y exp(−|x − y|²/2s²) b(y) over 3-D points with 16
channels, forward and forward + backward (gradients of the points and the values), against
torch in row chunks (so its n×m matrix fits) and pykeops where it is installed; and a
training step of an ITNet-style kernel MLP at the sizes small models run at, where itdsl's
cost model chooses between its kernels and a materialised evaluation in torch, against both
forced and the reference (every pair materialised); the table names the path itdsl took.
Each size's methods take turns, so load on the machine hits them alike; the time is the
median. (With $ITDSL_SMALL_PAIRS set, itdsl follows it instead of its cost model.)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from .errors import InputError
from .settings import small_pairs, small_pairs_set

GAUSS = """operator gauss {
    domain X = points(3)
    domain Y = points(3)
    input  b : Y -> R^16
    param  s : R = 0.5
    output u(x: X) = integral(y: Y) exp(-sqnorm(x - y) / (2 * s^2)) * b(y) with sum
}
"""

MIX = """operator mix {
    domain P = points(1)
    input  a : P -> R^4
    input  v : P -> R^4
    param  phi : mlp(10 -> 64 -> 64 -> 4, act = gelu)
    output g(x: P) = integral(y: P) phi(x, y, a(x), a(y)) * v(y)
}
"""


def median_times(fns: dict, repeats: int) -> dict:
    """Median seconds per method (an exception where one failed); the methods take turns
    after one warm-up call each (compiles, caches), so drifting load hits them alike."""
    times: dict = {}
    for method, fn in fns.items():
        try:
            fn()
            times[method] = []
        except Exception as e:  # a peer that cannot run this case: reported, not fatal
            times[method] = e
    for _ in range(repeats):
        for method, fn in fns.items():
            if isinstance(times[method], Exception):
                continue
            t = time.perf_counter()
            fn()
            times[method].append(time.perf_counter() - t)
    return {m: t if isinstance(t, Exception) else statistics.median(t) for m, t in times.items()}


def _has_keops() -> bool:
    try:
        import pykeops  # noqa: F401
    except ImportError:
        return False
    return True


def gauss_methods(n: int, channels: int = 16, backward: bool = False) -> dict:
    """The Gaussian sum at n = m points: itdsl, torch in chunks of 1,024 rows, pykeops (if
    installed). With `backward`: forward and the gradients of X and b."""
    import itdsl
    src = GAUSS.replace("R^16", "R" if channels == 1 else f"R^{channels}")
    op = itdsl.compile_source(src, target="cpu")["gauss"]
    g = torch.Generator().manual_seed(0)
    x0, y, b0 = torch.rand(n, 3, generator=g), torch.rand(n, 3, generator=g), \
        torch.randn(n, channels, generator=g)
    if channels == 1:
        b0 = b0[:, 0]
    s = float(op.s.detach())

    def call(fn):
        if not backward:
            with torch.no_grad():
                return fn(x0, b0)
        x, b = x0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        out = fn(x, b)
        out.square().mean().backward()
        return out.detach()

    def chunked(x, b, rows: int = 1024):
        bb = b if b.dim() == 2 else b[:, None]
        out = torch.cat([torch.exp(-torch.cdist(x[i:i + rows], y) ** 2 / (2 * s * s)) @ bb
                         for i in range(0, n, rows)])
        return out if b.dim() == 2 else out[:, 0]

    def keops(x, b):
        from pykeops.torch import LazyTensor
        bb = b if b.dim() == 2 else b[:, None]
        xi, yj, bj = LazyTensor(x[:, None, :]), LazyTensor(y[None, :, :]), LazyTensor(bb[None])
        out = ((-((xi - yj) ** 2).sum(-1) / (2 * s * s)).exp() * bj).sum(dim=1)
        return out if b.dim() == 2 else out[:, 0]

    fns = {"itdsl": lambda: call(lambda x, b: op(X=x, Y=y, b=b)),
           "torch chunked": lambda: call(chunked)}
    if _has_keops():
        fns["pykeops"] = lambda: call(keops)
    return fns


def mix_methods(n: int, batch: int = 16) -> dict:
    """A training step (forward and backward) of the kernel MLP mixer on n points, batch
    `batch`: itdsl as it decides, itdsl forced onto its kernels, the reference."""
    import itdsl
    ops = {t: itdsl.compile_source(MIX, target=t)["mix"] for t in ("cpu", "reference")}
    ops["reference"].load_state_dict(ops["cpu"].state_dict())
    g = torch.Generator().manual_seed(0)
    P = torch.rand(n, 1, generator=g)
    a0, v0 = torch.randn(batch, n, 4, generator=g), torch.randn(batch, n, 4, generator=g)

    def step(op):
        a, v = a0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
        out = op(P=P, a=a, v=v)
        out.square().mean().backward()
        return out.detach()

    def kernels():
        with small_pairs_set(0):
            return step(ops["cpu"])

    def chosen():
        out = step(ops["cpu"])
        chosen.ran = ops["cpu"].last_run  # what the cost model (or the setting) chose
        return out

    return {"itdsl": chosen, "itdsl kernels": kernels, "reference": lambda: step(ops["reference"])}


def cases(quick: bool) -> list[tuple[str, str, list[int], object]]:
    """(case, what the size means, sizes, methods of a size)."""
    gauss = [500, 1000, 2000] if quick else [1000, 3000, 10_000, 30_000]
    mix = [16, 32, 64] if quick else [16, 32, 64, 128]
    return [
        ("Gaussian sum, forward", "n = m", gauss, lambda n: gauss_methods(n)),
        ("Gaussian sum, forward + backward", "n = m", gauss[:3],
         lambda n: gauss_methods(n, backward=True)),
        ("MLP-kernel mixer, training step (batch 16)", "n", mix, lambda n: mix_methods(n)),
    ]


def selected(quick: bool, only: str | None) -> list:
    """The cases whose name contains `only` (all without it), as `cases` gives them."""
    return [c for c in cases(quick) if not only or only.lower() in c[0].lower()]


def run(quick: bool = False, only: str | None = None, progress=print) -> list[dict]:
    """Every case and size: rows of (case, size label, n, method, seconds or None, error)."""
    rows = []
    for case, label, sizes, make in selected(quick, only):
        for n in sizes:
            repeats = 5 if quick else (3 if n >= 10_000 else 9)
            fns = make(n)
            for method, t in median_times(fns, repeats).items():
                err = t if isinstance(t, Exception) else None
                ran = getattr(fns[method], "ran", None)
                rows.append({"case": case, "label": label, "n": n,
                             "method": f"{method} ({ran})" if ran else method,
                             "s": None if err else t,
                             "error": f"{type(err).__name__}: {err}" if err else ""})
            progress(f"  {case}, {label} = {n:,}: " + ", ".join(
                f"{r['method']} {r['s'] * 1e3:.1f} ms" if r["s"] is not None else
                f"{r['method']} failed" for r in rows if r["case"] == case and r["n"] == n))
    return rows


def _mine(method: str) -> bool:
    """itdsl as it decides (the row every ratio is against)."""
    return method == "itdsl" or method.startswith("itdsl (")


def table(rows: list[dict]) -> str:
    """The markdown table: each size's methods with their time against itdsl's."""
    out = ["| case | size | method | time (median) | against itdsl |", "|---|---|---|---|---|"]
    for r in rows:
        base = next(x["s"] for x in rows if x["case"] == r["case"] and x["n"] == r["n"]
                    and _mine(x["method"]))
        if r["s"] is None:
            out.append(f"| {r['case']} | {r['label']} = {r['n']:,} | {r['method']} | "
                       f"failed ({r['error'][:60]}) | |")
            continue
        if _mine(r["method"]) or base is None:
            ratio = "1.0×" if _mine(r["method"]) else ""
        else:
            q = r["s"] / base
            ratio = f"{q:.2f}× slower" if q >= 1 else f"{1 / q:.2f}× faster"
        ms = r["s"] * 1e3
        ms = f"{ms:.2f}" if ms < 10 else f"{ms:.0f}"
        out.append(f"| {r['case']} | {r['label']} = {r['n']:,} | {r['method']} | {ms} ms | "
                   f"{ratio} |")
    return "\n".join(out) + "\n"


def _series(method: str) -> str:
    """A method's line in the plot (itdsl's, whichever path it took at each size)."""
    return "itdsl" if _mine(method) else method


def _matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("`itdsl bench` draws its plot with matplotlib, which is not installed",
                         hint='pip install "itdsl[bench]" (or matplotlib), or pass --no-plot')
    return plt


def plot(rows: list[dict], path: Path) -> None:
    """Time against size, one panel per case, log-log, a line per method."""
    plt = _matplotlib()
    cases_ = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, len(cases_), figsize=(5 * len(cases_), 4), squeeze=False)
    for ax, case in zip(axes[0], cases_):
        mine = [r for r in rows if r["case"] == case]
        for method in dict.fromkeys(_series(r["method"]) for r in mine):
            pts = [(r["n"], r["s"] * 1e3) for r in mine
                   if _series(r["method"]) == method and r["s"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method,
                        linewidth=2.5 if _mine(method) else 1.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(mine[0]["label"])
        ax.set_ylabel("time (ms, median)")
        ax.set_title(case, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _out_dir(path: str) -> Path:
    """The output folder, made if missing; a clear error where it cannot be."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {path}: this is a file, not a folder",
                         hint="give a folder (it is made if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {path}: cannot make this folder ({e.strerror})",
                         hint="give a folder you can write to") from None
    return out


def main(args: argparse.Namespace) -> int:
    if not selected(args.quick, args.only):
        raise InputError(f"no benchmark case matches --only {args.only!r}",
                         hint="the cases: " + "; ".join(c for c, *_ in cases(False)))
    if not args.no_plot:
        _matplotlib()  # before minutes of measuring
    out = _out_dir(args.out)
    threads = torch.get_num_threads()
    setting = small_pairs()
    print(f"itdsl bench: {threads} threads, torch {torch.__version__}"
          + ("" if _has_keops() else "; pykeops is not installed (pip install \"itdsl[bench]\" "
             "adds it as a peer)")
          + ("" if setting is None else f"; small calls fixed at {setting:,} pairs by "
             "$ITDSL_SMALL_PAIRS (not the cost model)"))
    rows = run(args.quick, args.only)
    text = table(rows)
    (out / "bench.md").write_text(text)
    print()
    print(text)
    print(f"wrote {out / 'bench.md'}")
    if not args.no_plot:
        plot(rows, out / "bench.png")
        print(f"wrote {out / 'bench.png'}")
    return 0
