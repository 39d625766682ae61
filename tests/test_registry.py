"""The strategy registry and the per-call choices: one entry per strategy read by every stage,
the form found once at analysis, matmul's memory budget, and the device following the tensors.
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from util import EXAMPLES

import itdsl
from itdsl.runtime.module import CompiledOperator
from itdsl.runtime.strategies import RUNNERS, Runner
from itdsl.symbolic import strategies as registry
from itdsl.symbolic.recognize import RULES

D = torch.float64


def test_every_stage_reads_one_registry():
    names = [s.name for s in registry.REGISTRY]
    assert names[-1] == "dense" and len(set(names)) == len(names)
    # the recogniser tries the entries' rules, in the registry's order
    assert list(RULES) == [r for s in registry.REGISTRY for r in s.rules]
    assert all(r.strategy == s.name for s in registry.REGISTRY for r in s.rules)
    # every strategy with an algorithm of its own has a runner, and nothing else has one
    assert set(RUNNERS) == set(names) - {"dense"}
    # the API validates against the registry
    with pytest.raises(itdsl.ItdslError) as e:
        itdsl.compile_file(EXAMPLES / "gauss.it", strategy="fft")
    assert all(n in str(e.value) for n in names)


def test_the_form_is_found_once_and_travels_with_the_plan(monkeypatch):
    prog = itdsl.compile_file(EXAMPLES / "bump_conv.it", target="cpu")
    plan = prog.plan("bump_conv")
    assert plan.strategy == "convolution" and plan.form is not None
    assert type(plan.form[0]).__name__ == "ConvSum" and plan.form[0].half_width == 0.2
    again = pickle.loads(pickle.dumps(plan))  # (the Plan cache pickles it)
    assert again.form == plan.form
    # the runtime never looks for the form again
    for entry in registry.REGISTRY:
        monkeypatch.setitem(registry.BY_NAME, entry.name, dataclasses.replace(entry, find=_no_find))
    op = CompiledOperator(again, "cpu").double()
    ref = itdsl.compile_file(EXAMPLES / "bump_conv.it", target="reference")["bump_conv"].double()
    ref.load_state_dict(op.state_dict())
    f = torch.randn(2, 50, 8, dtype=D)
    torch.testing.assert_close(op(f=f, T=50), ref(f=f, T=50), rtol=1e-10, atol=1e-12)
    assert op.last_run == "convolution" and isinstance(op._runner, Runner)


def _no_find(plan):  # pragma: no cover
    raise AssertionError("the form is looked for again")


def test_a_form_the_algorithm_does_not_take_runs_dense_and_says_so():
    src = """operator k {
        domain T = index
        input q : T -> R^8
        input k : T -> R^8
        input v : T -> R^8
        param slope : R = 0.5
        kernel a(t: T, s: T) = exp(dot(q(t), k(s))) * exp(-slope * abs(t - s))
        output o(t: T) = integral(s: T) a(t, s) * v(s) / integral(s: T) a(t, s)
    }"""
    prog = itdsl.compile_source(src, target="cpu")
    plan = prog.plan("k")
    assert plan.verdict.strategy == "attention" and plan.strategy == "dense"
    assert plan.form is None and prog["k"]._runner is None
    text = prog.explain("k")
    assert "strategy: dense" in text and "found `attention`" in text


# ---- matmul within a memory budget -------------------------------------------------------------

GRID = """operator smooth {
    domain U = grid(0, 1)
    domain V = grid(0, 1)
    input f : V -> R
    param s : R = 0.1
    output g(u: U) = integral(v: V) exp(-(u - v)^2 / s) * f(v) with trapezoid
}"""


def _by_numpy(f: np.ndarray, n: int, s: float = 0.1) -> np.ndarray:
    """The trapezoid sum in float64, row blocks at a time (an independent reference)."""
    m = f.shape[-1]
    u, v = np.linspace(0, 1, n), np.linspace(0, 1, m)
    w = np.full(m, 1 / (m - 1))
    w[0] = w[-1] = 0.5 / (m - 1)
    out = np.empty(f.shape[:-1] + (n,))
    for lo in range(0, n, 512):
        K = np.exp(-(u[lo:lo + 512, None] - v[None, :]) ** 2 / s)
        out[..., lo:lo + 512] = (f * w) @ K.T
    return out


def test_matmul_samples_its_matrix_only_within_the_memory_budget():
    op = itdsl.compile_source(GRID)["smooth"].double()
    assert op.target is None and op.strategy == "matmul"
    f = torch.randn(2, 300, dtype=D)
    torch.testing.assert_close(op(f=f, U=200), torch.from_numpy(_by_numpy(f.numpy(), 200)))
    assert op.last_run == "matmul"
    try:
        k = sum(t.pair_values for t in op.plan.form)  # values per pair while sampling
        assert k > 1
        itdsl.set_memory_budget(200 * 300 * 8 * k - 1)  # one byte short
        f.requires_grad_(True)
        out = op(f=f, U=200)
        assert op.last_run == "kernels"
        torch.testing.assert_close(out, torch.from_numpy(_by_numpy(f.detach().numpy(), 200)))
        g, = torch.autograd.grad(out.sum(), f)  # d/df: the column sums of w·K
        ones = np.eye(300)
        want = _by_numpy(ones, 200).sum(-1)
        torch.testing.assert_close(g, torch.from_numpy(want).expand(2, 300))
        itdsl.set_memory_budget(200 * 300 * 8 * k)
        op(f=f, U=200)
        assert op.last_run == "matmul"  # just fits
    finally:
        itdsl.set_memory_budget(None)


def test_a_grid_whose_matrix_would_not_fit_runs_tiled():
    """6,000 × 6,000 in float64 is 288 MB (and sampling it more), over the default 256 MiB: the
    tiled kernels."""
    op = itdsl.compile_source(GRID)["smooth"].double()
    f = torch.randn(6000, dtype=D)
    with torch.no_grad():
        out = op(f=f, U=6000)
    assert op.last_run == "kernels"
    torch.testing.assert_close(out, torch.from_numpy(_by_numpy(f.numpy(), 6000)))
    k = sum(t.pair_values for t in op.plan.form)
    assert f"n·m <= {2**28 // (8 * k):,} in float64" in itdsl.compile_source(GRID).explain("smooth")


def test_memory_budgets_are_checked(monkeypatch):
    for bad in ("lots", "-5", "12Q", float("inf"), float("nan"), 1.5, True):
        with pytest.raises(itdsl.InputError, match="memory budget"):
            itdsl.set_memory_budget(bad)
    monkeypatch.setenv("ITDSL_MEMORY_BUDGET", "2k")
    from itdsl.settings import memory_budget
    assert memory_budget() == 2048
    for text, want in (("1KiB", 1024), ("1.5M", 3 * 2**19), ("3GB", 3 * 2**30), (4096, 4096)):
        itdsl.set_memory_budget(text)
        assert memory_budget() == want
    itdsl.set_memory_budget(None)
    monkeypatch.setenv("ITDSL_MEMORY_BUDGET", "none")
    with pytest.raises(itdsl.InputError, match="ITDSL_MEMORY_BUDGET"):
        memory_budget()
    # only a strategy whose rule reads the budget fails on a bad one
    conv = itdsl.compile_file(EXAMPLES / "bump_conv.it")["bump_conv"]
    conv(f=torch.randn(20, 8))


# ---- the device follows the tensors --------------------------------------------------------------


def test_no_target_gives_compiled_kernels_for_the_tensors_device():
    prog = itdsl.compile_file(EXAMPLES / "gauss.it")
    op = prog["gauss_smooth"].double()
    assert isinstance(op, CompiledOperator) and op.target is None
    ref = itdsl.compile_file(EXAMPLES / "gauss.it", target="reference")["gauss_smooth"].double()
    ref.load_state_dict(op.state_dict())
    x, y, b = torch.randn(30, 3, dtype=D), torch.randn(40, 3, dtype=D), torch.randn(40, 16, dtype=D)
    torch.testing.assert_close(op(X=x, Y=y, b=b), ref(X=x, Y=y, b=b), rtol=1e-10, atol=1e-12)
    assert op.last_run == "kernels" and set(op._opdefs) == {"cpu"}
    # the same module in float32: kernels built on first use per dtype
    op32 = op.float()
    out = op32(X=x.float(), Y=y.float(), b=b.float())
    assert out.dtype == torch.float32 and set(op._opdefs["cpu"].kernels) == {D, torch.float32}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_a_forced_cuda_target_without_a_gpu_is_a_clear_error():
    op = itdsl.compile_file(EXAMPLES / "gauss.it", target="cuda")["gauss_smooth"]
    with pytest.raises(itdsl.ItdslError, match="CUDA"):
        op(X=torch.randn(3, 3), Y=torch.randn(4, 3), b=torch.randn(4, 16))


def test_torch_compile_traces_calls_that_pass_sizes():
    """Sizes by keyword (grids, index domains) on every path: the sampled matrix, the scan, the
    dense kernels; the custom ops are registered when the module is built, not traced."""
    inn = itdsl.compile_file(EXAMPLES / "inn_linear.it")["integral_linear"]
    f = torch.randn(4, 24)
    torch.testing.assert_close(torch.compile(lambda f: inn(f=f, U=9), fullgraph=True)(f),
                               inn(f=f, U=9))
    ema = itdsl.compile_file(EXAMPLES / "ema.it")["ema"]
    x = torch.randn(2, 40, 16, requires_grad=True)
    torch.compile(lambda f: ema(f=f, T=40), fullgraph=True)(x).sum().backward()
    assert x.grad is not None
    dense = itdsl.compile_source("""operator d {
        domain T = index
        input f : T -> R
        output g(t: T) = integral(s: T) exp(-(t - s)^2) * sin(t * s) * f(s)
    }""")["d"]
    assert dense.strategy == "dense"
    y = torch.randn(30)
    torch.testing.assert_close(torch.compile(lambda f: dense(f=f, T=30), fullgraph=True)(y),
                               dense(f=y, T=30))


@pytest.mark.parametrize("rule", ["gauss(7)", "midpoint(9)"])
def test_a_rule_with_nodes_of_its_own_samples_its_matrix_there(rule):
    """An INN layer integrated by gauss or midpoint: the matrix sampled at the rule's nodes
    (no size of V needed), equal to the reference, forward and gradients."""
    src = f"""operator q {{
        domain U = grid(0, 1)
        domain V = grid(-1, 2)
        param W : spline(8, 12)
        input c : U -> R
        output g(u: U) = c(u) * integral(v: V) W(u, v) * sin(3 * v) with {rule}
    }}"""
    op = itdsl.compile_source(src)["q"].double()
    ref = itdsl.compile_source(src, target="reference")["q"].double()
    ref.load_state_dict(op.state_dict())
    c = torch.randn(2, 17, dtype=D, requires_grad=True)
    a, b = op(c=c), ref(c=c)
    assert op.strategy == "matmul" and op.last_run == "matmul"
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    for x, y in zip(torch.autograd.grad(a.sum(), [c, op.W]), torch.autograd.grad(b.sum(), [c, ref.W])):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13)


def test_tune_malloc_keeps_freed_memory_in_a_process_of_its_own():
    """glibc takes the settings (in a child: they are process-wide and never undone), and the
    memory freed by a loop of FFTs is reused instead of faulted in again on every call."""
    import platform
    import subprocess
    import sys
    code = """if True:
        import resource, torch, itdsl
        y, k = torch.randn(16, 64, 64), torch.randn(128, 65, dtype=torch.complex64)
        def conv():  # a 2-D convolution by FFT, as lattice_conv computes one
            fy = torch.fft.fft(torch.fft.rfft(y, n=128, dim=2), n=128, dim=1) * k
            return torch.fft.irfft(torch.fft.ifft(fy, dim=1)[:, 63:127], n=128, dim=2)
        def faults():
            for _ in range(5):
                conv()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(20):
                conv()
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        print(faults(), itdsl.tune_malloc(), faults())"""
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                         timeout=120)
    assert got.returncode == 0, got.stderr
    before, took, after = got.stdout.split()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert took == "True"
        assert int(after) <= int(before) // 4 + 50, (before, after)
    for bad in ("lots", -1, 1.5):
        with pytest.raises(itdsl.InputError, match="memory retained"):
            itdsl.tune_malloc(bad)
