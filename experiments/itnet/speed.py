"""Speed of an ITNet block's training step (issue 14): itdsl's compiled block against the same
block written in plain torch with the pair tensor materialised, the way neuraloperator's GNO
builds its edge features; and the step time against n for the mixers "mlp", "lowrank" and
"montecarlo".

    python -m experiments.itnet.speed [--quick] [--only bar|sweep] [--profile KIND]

The block: `ITNetBlock(32, kind=...)` over B = 1 sequence of n tokens with 32 channels at
random positions in [0, 1]², keys 8, kernel MLP 20 -> 32 -> 32 (GELU), rank 8, 32 Monte Carlo
samples: the defaults of `itdsl.nn.Mix`. B = 1 keeps the materialised block inside memory up to
n = 2,048 (its pair tensors grow as B·n²). A training step is the forward pass, the loss
mean(out²) and its backward into every param (the block's 18 tensors), float32, 2 threads on
both sides (torch's; itdsl's TVM kernels take TVM_NUM_THREADS, by default every core: 2
here). Times are medians of steps taken in turn by each method in one process, after
warm-up steps (the first compiled call loads or builds the TVM kernels: seconds).

Peak memory is measured in a fresh child process per method: one warm-up step (kernels,
torch's lazy state, the grads' first allocation); then freed memory goes back to Linux
(`malloc_trim`) and the process's high-water mark of its resident set is reset
(`/proc/self/clear_refs`); the peak of the resident set during the next step, above where it
stood before it, is the step's memory. The resident set counts every page the step touches —
torch's tensors, TVM's workspaces, any library's malloc — so neither side can hide memory
from it (torch's profiler sees torch's allocations only), and Linux keeps the high-water
mark itself, so no peak between two samples is missed. Trimming first keeps memory that the
warm-up step freed and the measured one reuses from going uncounted.

Before anything is timed, the materialised block is checked against the compiled one —
forward and the gradient of every param, max |Δ| / max |reference| ≤ 1e-5 — at every n where
it runs; `Disagreement` is raised otherwise. Results go to experiments/itnet/results/: speed.md,
speed.png (log-log, step time against n) and speed.json (every step's time; rerunning one
experiment with --only keeps the other's results).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from itdsl.nn import ITNetBlock

DIM, COORDS, KEYS, HIDDEN, RANK, SAMPLES, BATCH = 32, 2, 8, 32, 8, 32, 1
LAYERS = 2  # the kernel MLP's hidden layers (itdsl.nn's default)
KINDS = ("mlp", "lowrank", "montecarlo")
BAR_N, QUICK_BAR_N = 1024, 512
NS, QUICK_NS = (128, 256, 512, 1024, 2048), (128, 256, 512)
THREADS = 2
TOL = 1e-5  # max |Δ| / max |reference|, float32
MATERIALISED_LIMIT = 8 << 30  # bytes: larger n are not run
RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[2]

# The block's parameters that the materialised version reads, by `named_parameters()` name;
# a block with any other set is refused rather than half-used.
# (besides the kernel MLP's layers, mix.op.phi.<i>.weight and .bias)
PARAMS = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
          "mix.keys.weight", "mix.keys.bias", "mix.values.weight", "mix.values.bias",
          "mix.out.weight", "mix.out.bias",
          "ffn.0.weight", "ffn.0.bias", "ffn.2.weight", "ffn.2.bias")


class Disagreement(AssertionError):
    """The materialised block does not compute what the itdsl block computes."""


def block(kind: str, seed: int = 0) -> ITNetBlock:
    torch.manual_seed(seed)
    return ITNetBlock(DIM, kind=kind, coords=COORDS, keys=KEYS, hidden=HIDDEN, rank=RANK,
                      samples=SAMPLES, layers=LAYERS)


def inputs(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens `[B, n, DIM]` and their positions `[1, n, COORDS]`, uniform in [0, 1]^COORDS."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, n, DIM, generator=g), torch.rand(1, n, COORDS, generator=g)


# ---- the block in plain torch, every pair materialised -----------------------------------------


def block_params(blk: ITNetBlock) -> dict[str, torch.Tensor]:
    """The block's own parameter tensors, by name (the same tensors: gradients land in both)."""
    params = dict(blk.named_parameters())
    others = {k for k in params if not k.startswith("mix.op.phi.")}
    if blk.mix.kind != "mlp" or others != set(PARAMS):
        raise Disagreement(f"the materialised block is the kind 'mlp' with params {PARAMS}; "
                           f"got the kind {blk.mix.kind!r} with {sorted(params)}")
    return params


def materialised(p: dict[str, torch.Tensor], x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x + Mix(LN x), then x + FFN(LN x), with Mix(h)(x) = Σ_y φ(x, y, a(x), a(y)) ⊙ v(y) / n:
    the edge features (x, y, a(x), a(y)) of every pair `[B, n, n, 2·(coords + keys)]`, the
    kernel MLP on all of them, times v(y)·w(y) (w = 1/n, the mean), summed over y."""
    B, n, dim = x.shape
    h = F.layer_norm(x, (dim,), p["norm1.weight"], p["norm1.bias"])
    a = F.linear(h, p["mix.keys.weight"], p["mix.keys.bias"])
    v = F.linear(h, p["mix.values.weight"], p["mix.values.bias"])
    P = pos.expand(B, n, pos.shape[-1])
    pair = torch.cat([P[:, :, None].expand(-1, -1, n, -1), P[:, None].expand(-1, n, -1, -1),
                      a[:, :, None].expand(-1, -1, n, -1), a[:, None].expand(-1, n, -1, -1)], -1)
    layers = sorted({int(k.split(".")[3]) for k in p if k.startswith("mix.op.phi.")})
    K = pair
    for j, i in enumerate(layers):  # Linear, then GELU and Linear for each further layer
        K = F.linear(K if j == 0 else F.gelu(K), p[f"mix.op.phi.{i}.weight"],
                     p[f"mix.op.phi.{i}.bias"])  # finally [B, x, y, C]
    g = (K * (v / n)[:, None]).sum(2)
    x = x + F.linear(g, p["mix.out.weight"], p["mix.out.bias"])
    h = F.layer_norm(x, (dim,), p["norm2.weight"], p["norm2.bias"])
    return x + F.linear(F.gelu(F.linear(h, p["ffn.0.weight"], p["ffn.0.bias"])),
                        p["ffn.2.weight"], p["ffn.2.bias"])


def materialised_bytes(n: int) -> int:
    """About the materialised step's peak: the pair tensor, the MLP's pre-activation, hidden
    layer and output and the product with v (kept for the backward), and their gradients."""
    return 2 * 4 * BATCH * n * n * (2 * (COORDS + KEYS) + 2 * LAYERS * HIDDEN + 2 * DIM)


def loss(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def check_agreement(blk: ITNetBlock, x: torch.Tensor, pos: torch.Tensor,
                    tol: float = TOL) -> dict[str, float]:
    """max |Δ| / max |materialised| of the output and of every param's gradient of the loss;
    raises `Disagreement` if any is over `tol` (or not finite)."""
    p = block_params(blk)
    names = list(p)
    got, want = blk(x, pos), materialised(p, x, pos)
    errors = {"forward": _rel(got.detach(), want.detach())}
    grads = zip(torch.autograd.grad(loss(got), [p[k] for k in names]),
                torch.autograd.grad(loss(want), [p[k] for k in names]))
    errors.update({k: _rel(a, b) for k, (a, b) in zip(names, grads)})
    bad = {k: e for k, e in errors.items() if not e <= tol}
    if bad:
        raise Disagreement(f"the materialised block differs from the itdsl block at n = "
                           f"{x.shape[1]} (max |Δ| / max |ref| over {tol:g}): {bad}")
    return errors


# ---- timing --------------------------------------------------------------------------------


def train_step(fn, params: list[torch.Tensor]):
    """One training step of `fn()` (the block on fixed inputs): forward, loss, backward."""
    def step():
        for q in params:
            q.grad = None
        loss(fn()).backward()
    return step


def steps(n: int, blocks: dict[str, ITNetBlock], with_materialised: bool) -> dict:
    """The training steps at n, by method name ("itdsl mlp", ..., "materialised mlp")."""
    x, pos = inputs(n)
    gen = torch.Generator().manual_seed(2)
    out = {f"itdsl {k}": train_step(lambda b=b: b(x, pos, generator=gen), list(b.parameters()))
           for k, b in blocks.items()}
    if with_materialised:
        p = block_params(blocks["mlp"])
        out["materialised mlp"] = train_step(lambda: materialised(p, x, pos), list(p.values()))
    return out


def step_times(fns: dict, repeats: int, warmups: int = 2) -> dict[str, dict[str, list[float]]]:
    """`{"wall": {method: s}, "cpu": {method: s}}`: the seconds of each of `repeats` steps of
    each method, and the CPU seconds of the process's threads during each. The methods take
    turns, so a change of load on the machine hits them alike. The CPU time leaves out the
    time a thread waits for a core that another process holds, but not the time it spins or
    yields waiting for another thread: it is not the work alone either."""
    for fn in fns.values():
        for _ in range(warmups):
            fn()
    out: dict[str, dict[str, list[float]]] = {"wall": {m: [] for m in fns},
                                              "cpu": {m: [] for m in fns}}
    for _ in range(repeats):
        for m, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            out["cpu"][m].append(time.process_time() - c)
            out["wall"][m].append(time.perf_counter() - t)
    return out


def _medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {m: statistics.median(s) for m, s in samples.items()}


# ---- memory (a fresh child process per measurement) ----------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def step_peak_bytes(step) -> int:
    """The rise of the resident set's peak during `step()`, after a warm-up step (see the
    module's docstring)."""
    step()
    gc.collect()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _status("VmRSS")
    step()
    return _status("VmHWM") - base


def child_memory(method: str, n: int) -> None:
    torch.set_num_threads(THREADS)
    kind = method.split()[-1]
    fns = steps(n, {kind: block(kind)}, method.startswith("materialised"))
    print(json.dumps({"bytes": step_peak_bytes(fns[method])}))


def peak_memory(method: str, n: int) -> int:
    r = subprocess.run([sys.executable, "-m", "experiments.itnet.speed", "--child-memory",
                        method, str(n)], check=False, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"the memory child for {method} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["bytes"]


# ---- the experiments -----------------------------------------------------------------------


def bar(n: int, repeats: int) -> dict:
    """itdsl's "mlp" block against the materialised one at n tokens: time and memory."""
    blocks = {"mlp": block("mlp")}
    errors = check_agreement(blocks["mlp"], *inputs(n))
    samples = step_times(steps(n, blocks, True), repeats)
    t, cpu = _medians(samples["wall"]), _medians(samples["cpu"])
    fastest = {m: min(s) for m, s in samples["wall"].items()}
    mem = {m: peak_memory(m, n) for m in ("itdsl mlp", "materialised mlp")}
    return {"n": n, "machine": machine(), "repeats": repeats, "times": t, "fastest": fastest,
            "cpu": cpu, "samples": samples, "memory": mem, "max_error": max(errors.values()),
            "time_ratio": t["materialised mlp"] / t["itdsl mlp"],
            "fastest_ratio": fastest["materialised mlp"] / fastest["itdsl mlp"],
            "cpu_ratio": cpu["materialised mlp"] / cpu["itdsl mlp"],
            "memory_ratio": mem["itdsl mlp"] / mem["materialised mlp"]}


def sweep(ns: tuple[int, ...], repeats: int) -> dict:
    """Median step time of each kind (and of the materialised mlp where it fits) at each n:
    `{"times": {n: {method: s}}, "cpu": (the same in CPU seconds), ...}`."""
    blocks = {k: block(k) for k in KINDS}
    out, cpu, samples = {}, {}, {}
    for n in ns:
        fits = materialised_bytes(n) <= MATERIALISED_LIMIT
        if fits:
            check_agreement(blocks["mlp"], *inputs(n))
        samples[n] = step_times(steps(n, blocks, fits), repeats)
        out[n], cpu[n] = _medians(samples[n]["wall"]), _medians(samples[n]["cpu"])
        print(f"n = {n}: " + ", ".join(f"{m} {s * 1e3:.1f} ms" for m, s in out[n].items()),
              flush=True)
    return {"machine": machine(), "repeats": repeats, "times": out, "cpu": cpu,
            "samples": samples}


def profile(kind: str, n: int) -> None:
    """torch.profiler's table of one compiled training step (after warm-ups)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    fn = steps(n, {kind: block(kind)}, False)[f"itdsl {kind}"]
    for _ in range(2):
        fn()
    with prof(activities=[ProfilerActivity.CPU]) as p:
        fn()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


# ---- the report ----------------------------------------------------------------------------


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def machine() -> str:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{time.strftime('%Y-%m-%d %H:%M')}, {cpu}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {THREADS} threads")


def _table(rows: dict[int, dict[str, float]], methods: list[str]) -> list[str]:
    out = ["| n | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for n, row in rows.items():
        out.append(f"| {n} | " + " | ".join(_ms(row[m]) if m in row else "—" for m in methods)
                   + " |")
    return out


def write_markdown(bar_result: dict | None, table: dict | None) -> str:
    lines = ["# ITNet block: training-step speed", "",
             f"`ITNetBlock({DIM})`, B = {BATCH}, positions in [0, 1]^{COORDS}, keys {KEYS}, "
             f"kernel MLP {2 * (COORDS + KEYS)} -> {' -> '.join([str(HIDDEN)] * LAYERS)} -> "
             f"{DIM}, rank {RANK}, "
             f"{SAMPLES} samples; float32; a step is forward, mean(out²), backward. Medians of "
             "interleaved steps on a shared machine: ratios are more telling than times. CPU "
             "time: the seconds of all the process's threads during a step (without the waits "
             "for a core held by another process, with the spinning and yielding of threads "
             "that wait for each other).", ""]
    if bar_result:
        r = bar_result
        t, f, m, cpu = r["times"], r["fastest"], r["memory"], r.get("cpu", {})
        lines += [f"## n = {r['n']}: itdsl against the materialised block", "",
                  f"{r['machine']}; medians of {r['repeats']} steps.", "",
                  "| method | step time (median) | fastest step | CPU time (median) "
                  "| peak memory of the step |", "|---|---|---|---|---|",
                  *(f"| {k} | {_ms(t[k])} | {_ms(f[k])} | "
                    f"{_ms(cpu[k]) if k in cpu else '—'} | {m[k] / 2**20:.1f} MiB |"
                    for k in t), "",
                  f"Time: the materialised block takes {r['time_ratio']:.2f}× itdsl's (target "
                  f"≥ 5×; fastest steps: {r['fastest_ratio']:.2f}×"
                  + (f"; CPU time: {r['cpu_ratio']:.2f}×" if "cpu_ratio" in r else "")
                  + f"). Memory: itdsl uses {r['memory_ratio']:.3f} of the materialised "
                  f"block's (target ≤ 0.1). Largest disagreement: {r['max_error']:.1e} "
                  "(max |Δ| / max |ref|, forward and every param's gradient).", ""]
    if table:
        methods = [f"itdsl {k}" for k in KINDS] + ["materialised mlp"]
        lines += ["## Step time against n", "",
                  f"{table['machine']}; medians of {table['repeats']} steps.", "",
                  *_table(table["times"], methods)]
        if "cpu" in table:
            lines += ["", "CPU time of the same steps:", "", *_table(table["cpu"], methods)]
        if any(len(row) < len(methods) for row in table["times"].values()):
            lines += ["", f"— : not run (the materialised step would need over "
                          f"{MATERIALISED_LIMIT >> 30} GiB)."]
    return "\n".join(lines) + "\n"


def plot(table: dict[int, dict[str, float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in [f"itdsl {k}" for k in KINDS] + ["materialised mlp"]:
        ns = [n for n in table if m in table[n]]
        ax.loglog(ns, [table[n][m] * 1e3 for n in ns], "o-", label=m)
    ax.set_xticks(list(table), [str(n) for n in table])
    ax.minorticks_off()
    ax.set_xlabel("tokens n")
    ax.set_ylabel("training step (ms, median)")
    ax.set_title(f"ITNet block, dim {DIM}, B = {BATCH}, {THREADS} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"n in {QUICK_NS}, the bar at n = {QUICK_BAR_N}, fewer repeats; "
                         "to results/speed-quick.*")
    ap.add_argument("--only", choices=("bar", "sweep"), help="one of the two experiments")
    ap.add_argument("--repeats", type=int, help="timed steps per method (default 7, quick 3)")
    ap.add_argument("--profile", metavar="KIND", help="profile one compiled step and stop")
    ap.add_argument("--n", type=int, default=BAR_N, help="the n of --profile")
    ap.add_argument("--child-memory", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_memory:
        return child_memory(args.child_memory[0], int(args.child_memory[1]))
    torch.set_num_threads(THREADS)
    if args.profile:
        return profile(args.profile, args.n)
    # the latest result of each experiment, kept so that running one keeps the other's
    RESULTS.mkdir(exist_ok=True)
    stem = "speed-quick" if args.quick else "speed"
    saved = RESULTS / f"{stem}.json"
    results = json.loads(saved.read_text()) if saved.exists() else {}
    if args.only in (None, "bar"):
        results["bar"] = bar(QUICK_BAR_N if args.quick else BAR_N,
                             args.repeats or (3 if args.quick else 7))
        print(json.dumps(results["bar"], indent=1), flush=True)
    if args.only in (None, "sweep"):
        results["sweep"] = sweep(QUICK_NS if args.quick else NS,
                                 args.repeats or (3 if args.quick else 5))
    saved.write_text(json.dumps(results, indent=1))
    table = results.get("sweep")
    if table:  # (JSON keys are strings)
        for key in ("times", "cpu"):
            if key in table:
                table[key] = {int(n): row for n, row in table[key].items()}
        plot(table["times"], RESULTS / f"{stem}.png")
    text = write_markdown(results.get("bar"), table)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
