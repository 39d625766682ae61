"""itdsl benchmarks: one command, one table, peers measured side by side.

    python benchmarks/run.py            # everything (several minutes on 2 cores)
    python benchmarks/run.py --quick    # smaller sizes, for a smoke test
    python benchmarks/run.py --only attention --no-compile   # some cases only

Times are medians of repeated runs in this one process, itdsl and its peers taking
turns; peak memory is measured in a child process per (case, method), after a warm-up
call, as the rise of its resident set during one more call (sampled every millisecond).
Compile times are measured in fresh child processes with an empty cache (cold) and with
the cache they filled (warm).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(ROOT))

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))


# ---- the cases ---------------------------------------------------------------------------


def gauss_setup(n: int, channels: int, backward: bool = False):
    """The Gaussian sum (`itdsl bench`'s case): itdsl, row-chunked torch, pykeops."""
    from itdsl.bench import gauss_methods
    return gauss_methods(n, channels, backward)


def itnet_setup(n: int):
    import torch

    import itdsl
    op = itdsl.compile_file(EXAMPLES / "itnet_mixer.it", target="cpu")["itnet_mix"]
    g = torch.Generator().manual_seed(0)
    P, f0 = torch.rand(n, 2, generator=g), torch.randn(n, 32, generator=g)

    def itdsl_fn():
        f = f0.clone().requires_grad_(True)
        out = op(P=P, f=f)
        out.square().mean().backward()
        return out.detach()

    def torch_fn():
        # the pair tensor materialised, as neuraloperator's IntegralTransform does
        f = f0.clone().requires_grad_(True)
        xi, yj = P[:, None, :].expand(n, n, 2), P[None, :, :].expand(n, n, 2)
        fi, fj = f[:, None, :].expand(n, n, 32), f[None, :, :].expand(n, n, 32)
        K = op.phi(torch.cat([xi, yj, fi, fj], dim=-1))
        out = f + (K * fj).mean(dim=1)
        out.square().mean().backward()
        return out.detach()

    return {"itdsl": itdsl_fn, "torch materialised": torch_fn}


def small_setup(n: int, batch: int):
    """A training step of an ITNet-style kernel mlp(10 → 64 → 64 → 4) at a size ITNet models
    on small data sets run at (`itdsl bench`'s case): itdsl as it decides (its cost model),
    itdsl forced onto its kernels, and the reference (every pair materialised)."""
    from itdsl.bench import mix_methods
    return mix_methods(n, batch)


def inn_setup(n: int, batch: int):
    import torch

    import itdsl
    op = itdsl.compile_file(EXAMPLES / "inn_linear.it", target="cpu")["integral_linear"]
    lin = torch.nn.Linear(n, n)
    f = torch.randn(batch, n, generator=torch.Generator().manual_seed(0))

    def itdsl_fn():
        with torch.no_grad():
            return op(f=f, U=n)

    def linear_fn():
        with torch.no_grad():
            return lin(f)

    return {"itdsl": itdsl_fn, "nn.Linear": linear_fn}


def attention_setup(n: int, causal: bool, backward: bool):
    """Batch·heads = 4, d = 64; the peer is torch's scaled_dot_product_attention (its CPU
    flash kernel: 4-D inputs)."""
    import torch
    import torch.nn.functional as F

    import itdsl
    name = "causal_attention" if causal else "attention"
    op = itdsl.compile_file(EXAMPLES / "attention.it", target="cpu")[name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, n, 64, generator=g) for _ in range(3))

    def run(fn):
        if not backward:
            with torch.no_grad():
                return fn(q, k, v)
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = fn(qq, kk, vv)
        out.square().mean().backward()
        return out.detach()

    import itdsl.runtime.strategies.tuning as strategies

    def itdsl_fn():
        return run(lambda a, b, c: op(q=a, k=b, v=c))

    def own_fn():  # itdsl's own online softmax (at this size the fused kernel), off SDPA
        strategies.USE_SDPA = False
        try:
            return run(lambda a, b, c: op(q=a, k=b, v=c))
        finally:
            strategies.USE_SDPA = True

    def sdpa_fn():
        return run(lambda a, b, c: F.scaled_dot_product_attention(
            a[None], b[None], c[None], is_causal=causal)[0])

    return {"itdsl": itdsl_fn, "itdsl, its own online softmax": own_fn, "torch sdpa": sdpa_fn}


ALIBI = """operator alibi {
    domain T = index
    input  q : T -> R^64
    input  k : T -> R^64
    input  v : T -> R^64
    param  slope : R = 0.0625
    kernel a(t: T, s: T) = exp(dot(q(t), k(s)) / 8 - slope * BIAS)MASK
    output o(t: T) = integral(s: T) a(t, s) * v(s) / integral(s: T) a(t, s)
}
"""


def alibi_setup(n: int, causal: bool, bias: str):
    """Attention with a position bias: ALiBi's linear slope·(t − s) (its terms separate, so
    SDPA runs it on two more columns of q and k) or slope·|t − s| (SDPA on each side of the
    diagonal, where it is linear, merged; under the causal mask |t − s| is t − s, and SDPA
    runs it as the linear one); the peer is SDPA with the n×n bias materialised as its float
    mask."""
    import torch
    import torch.nn.functional as F

    import itdsl
    src = ALIBI.replace("BIAS", bias).replace("MASK", " * [s <= t]" if causal else "")
    op = itdsl.compile_source(src, target="cpu")["alibi"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, n, 64, generator=g) for _ in range(3))
    i = torch.arange(n, dtype=torch.float32)
    d = i[:, None] - i[None, :]
    mask = -0.0625 * (d.abs() if "abs" in bias else d)
    if causal:
        mask = mask.masked_fill(i[None, :] > i[:, None], -torch.inf)

    def itdsl_fn():
        with torch.no_grad():
            return op(q=q, k=k, v=v)

    def sdpa_fn():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]

    return {"itdsl": itdsl_fn, "torch sdpa, n×n bias": sdpa_fn}


def window_setup(n: int, score: str):
    """Attention whose score SDPA cannot take as columns: a window [|t − s| < 256] or a
    decaying bias 2·exp(−|t − s| / 64); itdsl (the fused kernel), its torch tiles, and SDPA
    given the n×n mask or bias."""
    import torch
    import torch.nn.functional as F

    import itdsl
    import itdsl.runtime.strategies.tuning as tuning
    kernel, bias = {
        "window": ("exp(dot(q(t), k(s)) / 8) * [abs(t - s) < 256]",
                   lambda d: torch.zeros_like(d).masked_fill(d.abs() >= 256, -torch.inf)),
        "decay": ("exp(dot(q(t), k(s)) / 8 - 2 * exp(-abs(t - s) / 64))",
                  lambda d: -2 * (-d.abs() / 64).exp())}[score]
    src = ALIBI.replace("    param  slope : R = 0.0625\n", "").replace(
        "    kernel a(t: T, s: T) = exp(dot(q(t), k(s)) / 8 - slope * BIAS)MASK\n",
        f"    kernel a(t: T, s: T) = {kernel}\n")
    op = itdsl.compile_source(src, target="cpu")["alibi"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, n, 64, generator=g) for _ in range(3))
    i = torch.arange(n, dtype=torch.float32)
    mask = bias(i[:, None] - i[None, :])

    def itdsl_fn():
        with torch.no_grad():
            return op(q=q, k=k, v=v)

    def tiles_fn():
        tuning.USE_FUSED = False
        try:
            return itdsl_fn()
        finally:
            tuning.USE_FUSED = True

    def sdpa_fn():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]

    return {"itdsl": itdsl_fn, "itdsl, torch tiles": tiles_fn, "torch sdpa, n×n mask": sdpa_fn}


def sequence_setup(which: str, T: int, dense: bool):
    """ema (batch 8, 16 channels) or causal linear attention (batch 4, d = 32): forward;
    with `dense`, also the same operator forced onto the dense pair kernels."""
    import torch

    import itdsl
    file = "ema.it" if which == "ema" else "linear_attention.it"
    fns = {}
    g = torch.Generator().manual_seed(0)
    if which == "ema":
        kw = {"f": torch.randn(8, T, 16, generator=g)}
    else:
        kw = {c: torch.randn(4, T, 32, generator=g) for c in "qkv"}
    for label, strategy in (("itdsl", None), ("itdsl dense kernels", "dense")):
        if strategy and not dense:
            continue
        op = itdsl.compile_file(EXAMPLES / file, target="cpu", strategy=strategy)[which]

        def fn(op=op):
            with torch.no_grad():
                return op(**kw)
        fns[label] = fn
    return fns


def conv_setup(T: int, batch: int):
    """bump_conv on a T-point grid (8 channels); the peer is a depthwise conv1d with the
    same taps, sampled beforehand."""
    import torch
    import torch.nn.functional as F

    import itdsl
    op = itdsl.compile_file(EXAMPLES / "bump_conv.it", target="cpu")["bump_conv"]
    g = torch.Generator().manual_seed(0)
    f = torch.randn(batch, T, 8, generator=g)
    h = 1.0 / (T - 1)
    D = int(0.2 / h)
    d = torch.arange(-D, D + 1) * h
    w = op.w.detach()
    taps = torch.exp(-d[None] ** 2 / (2 * w[:, None] ** 2))  # [8, 2D+1]
    wq = torch.full((T,), h)
    wq[0] = wq[-1] = h / 2
    weight = taps.flip(-1).unsqueeze(1)

    def itdsl_fn():
        with torch.no_grad():
            return op(f=f)

    def conv_fn():
        with torch.no_grad():
            x = (f * wq[:, None]).transpose(1, 2)
            return F.conv1d(x, weight, padding=D, groups=8).transpose(1, 2)

    return {"itdsl": itdsl_fn, "torch conv1d (depthwise)": conv_fn}


def lowrank_setup(n: int):
    import torch

    import itdsl
    g = torch.Generator().manual_seed(0)
    kw = {"q": torch.randn(4, n, 32, generator=g), "k": torch.randn(4, n, 32, generator=g),
          "v": torch.randn(4, n, 32, generator=g)}
    fns = {}
    for label, strategy in (("itdsl", None), ("itdsl dense kernels", "dense")):
        op = itdsl.compile_file(EXAMPLES / "linear_attention.it", target="cpu",
                                strategy=strategy)["linear_attention"]

        def fn(op=op):
            with torch.no_grad():
                return op(**kw)
        fns[label] = fn
    return fns


def cases(quick: bool) -> dict:
    out = {}
    for n in ((2000,) if quick else (10_000, 50_000)):
        for c in (16, 1):
            out[f"gauss n=m={n} C={c}"] = ("gauss", (n, c))
    n = 2000 if quick else 10_000
    out[f"gauss fwd+bwd n=m={n} C=16"] = ("gauss", (n, 16, True))
    out[f"itnet_mix fwd+bwd n={512 if quick else 2048}"] = ("itnet", (512 if quick else 2048,))
    out["integral_linear fwd 1024->1024, batch 256"] = ("inn", (1024, 256))
    for n, batch in ((32, 16), (128, 16)):
        out[f"small mlp kernel train step n={n} batch {batch}"] = ("small", (n, batch))
    n = 1024 if quick else 4096
    for causal in (False, True):
        for bwd in (False, True):
            name = f"{'causal ' if causal else ''}attention {'fwd+bwd' if bwd else 'fwd'} " \
                   f"B·H=4 n={n} d=64"
            out[name] = ("attention", (n, causal, bwd))
    for causal in (True, False):
        for bias in ("(t - s)", "abs(t - s)"):
            name = f"{'causal' if causal else 'non-causal'} ALiBi slope·{bias} fwd B·H=4 n={n} d=64"
            out[name] = ("alibi", (n, causal, bias))
    out[f"window attention [|t - s| < 256] fwd B·H=4 n={n} d=64"] = ("window", (n, "window"))
    out[f"decay-bias attention 2·exp(-|t - s|/64) fwd B·H=4 n={n} d=64"] = ("window",
                                                                          (n, "decay"))
    out["bump_conv fwd T=4096 batch 32 (1,639 taps: FFT)"] = ("conv", (4096, 32))
    out["bump_conv fwd T=128 batch 256 (51 taps: conv1d)"] = ("conv", (128, 256))
    lengths = (1000, 4000) if quick else (1000, 4000, 16_000, 64_000)
    for which in ("ema", "causal_linear_attention"):
        for T in lengths:
            out[f"{which} fwd T={T}"] = ("sequence", (which, T, False))
        T = lengths[-2]
        out[f"{which} fwd T={T}, against the dense kernels"] = ("sequence", (which, T, True))
    n = 4000 if quick else 16_000
    out[f"linear_attention fwd n={n}"] = ("lowrank", (n,))
    return out


def build(kind: str, args: tuple) -> dict:
    return {"gauss": gauss_setup, "itnet": itnet_setup, "inn": inn_setup,
            "attention": attention_setup, "sequence": sequence_setup, "conv": conv_setup,
            "lowrank": lowrank_setup, "alibi": alibi_setup, "small": small_setup,
            "window": window_setup}[kind](*args)


# ---- measurement --------------------------------------------------------------------------------

from itdsl.bench import median_times  # noqa: E402  (the methods take turns; medians)


def peak_memory_mb(case: str, method: str, quick: bool) -> float:
    """Run one method once in a child process; the rise of its peak RSS, in MB."""
    r = subprocess.run([sys.executable, __file__, "--child-memory", case, method] +
                       (["--quick"] if quick else []), check=False, capture_output=True, text=True,
                       timeout=3600, env=os.environ.copy())
    if r.returncode != 0:
        return float("nan")
    return json.loads(r.stdout.strip().splitlines()[-1])["mb"]


class _RssSampler:
    """The peak of the process's resident set above where it stood at start, sampled
    every millisecond from /proc (peaks shorter than that can be missed)."""

    def __init__(self):
        import threading
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


def child_memory(case: str, method: str, quick: bool) -> None:
    kind, args = cases(quick)[case]
    fn = build(kind, args)[method]
    fn()  # compile, load, warm caches: what remains is the call's own memory
    import gc
    gc.collect()
    with _RssSampler() as s:
        fn()
    print(json.dumps({"mb": s.mb}))


def compile_times(ops: list[tuple[str, str]]) -> list[tuple[str, float, float]]:
    """(operator, cold compile s, warm load s), each in a fresh process."""
    out = []
    for file, name in ops:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "ITDSL_CACHE_DIR": cache}
            cold = _child_load(file, name, env)
            warm = _child_load(file, name, env)
        out.append((name, cold, warm))
    return out


def _child_load(file: str, name: str, env: dict) -> float:
    r = subprocess.run([sys.executable, __file__, "--child-load", file, name],
                       check=False, capture_output=True, text=True, timeout=1200, env=env)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])["s"]


def child_load(file: str, name: str) -> None:
    """Time to a compiled operator with every kernel ready (forward and backward): parse,
    analyse (or load the Plan), build or load the kernels. torch's own one-time start-up
    of custom ops (it imports torch._dynamo on their first call) is excluded: it is paid
    once per process, not per operator."""
    import torch

    import itdsl
    torch.library.custom_op
    import torch._dynamo
    t = time.perf_counter()
    prog = itdsl.compile_file(EXAMPLES / file, target="cpu")
    op = prog[name]
    op.opdef("cpu").kernelset(torch.float32)
    print(json.dumps({"s": time.perf_counter() - t}))


def scaling(seen: dict) -> None:
    """For the scans: how time grows with T (4× T should cost ≤ 5× time)."""
    for which in ("ema", "causal_linear_attention"):
        rows = sorted((int(c.rsplit("=", 1)[1]), r["itdsl"]) for c, r in seen.items()
                      if c.startswith(f"{which} fwd T=") and "dense" not in c
                      and not isinstance(r["itdsl"], Exception))
        if len(rows) < 2:
            continue
        steps = ", ".join(f"{t1}→{t2}: {b / a:.1f}×" for (t1, a), (t2, b) in zip(rows, rows[1:]))
        print(f"\n{which}: time for 4× T ({steps})")


# ---- the targets ---------------------------------------------------------------------------------


def _t(seen: dict, case_start: str, method: str = "itdsl") -> float | None:
    """The median of `method` in the first case whose name starts with `case_start`."""
    for case, r in seen.items():
        if case.startswith(case_start) and isinstance(r.get(method), float):
            return r[method]
    return None


def bars(seen: dict) -> None:
    """The speed targets, each against the measurement of this run (ratios of medians of
    interleaved runs; ±30 % noise on a shared machine)."""
    rows = []

    def bar(what: str, value: float | None, target: str, ok) -> None:
        if value is None:
            rows.append(f"| {what} | not measured in this run | {target} | |")
        else:
            rows.append(f"| {what} | {value:.2f} | {target} | {'met' if ok(value) else 'missed'} |")

    fwd, both = _t(seen, "gauss n=m=10000 C=16"), _t(seen, "gauss fwd+bwd n=m=10000 C=16")
    bar("Gaussian sum n = m = 10⁴, C = 16: backward / forward",
        None if fwd is None or both is None else (both - fwd) / fwd, "≤ 3", lambda v: v <= 3)
    for peer, target in (("torch chunked", 10), ("pykeops", 15)):
        p = _t(seen, "gauss fwd+bwd n=m=10000 C=16", peer)
        bar(f"Gaussian sum forward + backward: {peer} / itdsl",
            None if p is None or both is None else p / both, f"≥ {target}",
            lambda v, t=target: v >= t)
    for causal in ("non-causal", "causal"):
        for bias, how in (("(t - s)", "the fused kernel on extra columns"),
                          ("abs(t - s)", "the fused kernel, each side's columns")):
            if causal == "causal":  # (|t − s| = t − s under the mask)
                how = "SDPA on extra columns" + (": |t − s| = t − s under the mask"
                                                 if bias == "abs(t - s)" else "")
            name = f"{causal} ALiBi slope·{bias} fwd"
            mine, peer = _t(seen, name), _t(seen, name, "torch sdpa, n×n bias")
            bar(f"{name} ({how}): itdsl / SDPA with the bias as mask",
                None if mine is None or peer is None else mine / peer, "≤ 1.0",
                lambda v: v <= 1.0)
    own, sdpa = (_t(seen, "attention fwd B·H", m) for m in ("itdsl, its own online softmax",
                                                             "torch sdpa"))
    bar("plain attention forward, itdsl's own online softmax (the fused kernel) / SDPA",
        None if own is None or sdpa is None else own / sdpa, "≤ 1.2", lambda v: v <= 1.2)
    mine, peer = (_t(seen, "itnet_mix fwd+bwd n=2048", m) for m in ("itdsl", "torch materialised"))
    bar("itnet_mix forward + backward n = 2,048: materialised torch / itdsl",
        None if mine is None or peer is None else peer / mine, "≥ 10", lambda v: v >= 10)
    mine, ref = (_t(seen, "small mlp kernel train step n=32", m)
                 for m in ("itdsl", "reference"))
    bar("MLP-kernel training step at n = 32 (batch 16): itdsl / reference",
        None if mine is None or ref is None else mine / ref, "≤ 1.0", lambda v: v <= 1.0)
    print("\n| target | measured | bar | |\n|---|---|---|---|")
    print("\n".join(rows))


# ---- the table ---------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child-memory", nargs=2)
    ap.add_argument("--child-load", nargs=2)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--only", help="run the cases whose name contains this text")
    a = ap.parse_args()
    if a.child_memory:
        return child_memory(*a.child_memory, a.quick)
    if a.child_load:
        return child_load(*a.child_load)
    import torch
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(f"# itdsl benchmarks — {threads} cores, torch {torch.__version__}, "
          f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}")
    seen: dict = {}
    print("| case | method | time (median) | vs itdsl | peak memory |")
    print("|---|---|---|---|---|")
    for case, (kind, args) in cases(a.quick).items():
        if a.only and a.only not in case:
            continue
        fns = build(kind, args)
        big = kind == "gauss" and args[0] >= 50_000
        slow_peer = any("dense" in m for m in fns)
        repeats = (1 if big else 21 if kind in ("inn", "conv", "small") else
                   11 if kind in ("sequence", "lowrank") and not slow_peer else 5)
        results = median_times(fns, repeats)
        seen[case] = results
        base = results["itdsl"]
        for method, t in results.items():
            if isinstance(t, Exception):
                print(f"| {case} | {method} | failed: {type(t).__name__} | | |")
                continue
            mem = "" if a.no_memory else f"{peak_memory_mb(case, method, a.quick):.0f} MB"
            r = t / base if t >= base else base / t
            r = f"{r:.2f}" if r < 1.95 else f"{r:.1f}"  # (1.04× is not 1.0×)
            ratio = ("1.0×" if method == "itdsl" else f"{r}× slower" if t >= base
                     else f"{r}× faster")
            ms = f"{t * 1000:.2f}" if t < 0.01 else f"{t * 1000:.0f}"
            print(f"| {case} | {method} | {ms} ms | {ratio} | {mem} |", flush=True)
    scaling(seen)
    bars(seen)
    if not a.no_compile:
        print()
        print("| operator | cold compile (empty cache) | warm load (cached, new process) |")
        print("|---|---|---|")
        ops = [("gauss.it", "gauss_smooth"), ("itnet_mixer.it", "itnet_mix")]
        for name, cold, warm in compile_times(ops):
            print(f"| {name} | {cold:.2f} s | {warm:.3f} s |", flush=True)


if __name__ == "__main__":
    main()
