"""The on-disk compile cache: keys, hits without TVM or sympy (and Plans without torch),
corruption, concurrency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from util import EXAMPLES, ROOT

import itdsl
from itdsl.cache import disk
from itdsl.lowering.spec import pair_groups, spec_of
from itdsl.runtime import cache

GAUSS = EXAMPLES / "gauss.it"

CHILD = textwrap.dedent("""
    import json, sys, torch, itdsl
    op = itdsl.compile_file(sys.argv[1], target="cpu")["gauss_smooth"]
    g = torch.Generator().manual_seed(0)
    x, y, b = torch.rand(30, 3, generator=g), torch.rand(20, 3, generator=g), torch.randn(20, 16, generator=g)
    u = op(X=x, Y=y, b=b)
    ref = torch.exp(-torch.cdist(x, y) ** 2 / (2 * op.s ** 2)) @ b
    print(json.dumps({"err": (u - ref).abs().max().item(), "tvm": "tvm" in sys.modules,
                      "analysed": "itdsl.symbolic.recognize" in sys.modules}))
""")


def run_child(cache_dir, *, background=False):
    env = {**os.environ, "ITDSL_CACHE_DIR": str(cache_dir)}
    args = [sys.executable, "-c", CHILD, str(GAUSS)]
    if background:
        return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    r = subprocess.run(args, env=env, cwd=ROOT, check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_keys_are_canonical_and_name_what_changes_the_code():
    plan = itdsl.compile_file(GAUSS, target="cpu").plan("gauss_smooth")
    spec = spec_of(pair_groups(plan.forward)[0], "cpu")
    again = itdsl.compile_file(GAUSS, target="cpu").plan("gauss_smooth")
    spec2 = spec_of(pair_groups(again.forward)[0], "cpu")
    k32 = cache.kernel_key(spec, "float32", "cpu")
    assert k32 == cache.kernel_key(spec2, "float32", "cpu")
    assert k32 != cache.kernel_key(spec, "float64", "cpu")
    assert k32 != cache.kernel_key(spec_of(pair_groups(plan.forward)[0], "cuda"), "float32", "cuda")
    ema = itdsl.compile_file(EXAMPLES / "ema.it", target="cpu").plan("ema")
    assert k32 != cache.kernel_key(spec_of(pair_groups(ema.forward)[0], "cpu"), "float32", "cpu")


def test_warm_process_loads_kernels_without_tvm_or_analysis(tmp_path):
    cold = run_child(tmp_path)
    assert cold["err"] < 1e-4 and cold["tvm"]  # the first process compiled with TVM
    libs = list(tmp_path.glob("*.so"))
    assert libs and len(list(tmp_path.glob("*.sha256"))) == len(libs)
    assert list((tmp_path / "plans").glob("*.pkl"))
    warm = run_child(tmp_path)
    assert warm["err"] < 1e-4
    assert not warm["tvm"], "a cache hit must not import tvm"
    # (torch imports sympy itself for its symbolic shapes; what must not run is the analysis)
    assert not warm["analysed"], "a cached Plan must not be analysed again"


def test_corrupt_or_truncated_entries_are_rebuilt(tmp_path):
    run_child(tmp_path)
    libs = sorted(tmp_path.glob("*.so"))
    with open(libs[0], "r+b") as f:  # truncate one library
        f.truncate(100)
    with open(libs[-1], "r+b") as f:  # flip bytes in another
        f.seek(200)
        f.write(b"\x00" * 64)
    plan = next((tmp_path / "plans").glob("*.pkl"))
    plan.write_bytes(b"not a pickle")
    again = run_child(tmp_path)  # detected, removed, recompiled and re-analysed
    assert again["err"] < 1e-4 and again["tvm"]
    for lib in tmp_path.glob("*.so"):
        assert (tmp_path / f"{lib.stem}.sha256").read_text() == disk.digest(lib)


def test_two_processes_compiling_the_same_operator_both_succeed(tmp_path):
    procs = [run_child(tmp_path, background=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1])["err"] < 1e-4
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob(".*.so"))


def test_the_cache_directory_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv("ITDSL_CACHE_DIR", str(tmp_path / "here"))
    assert disk.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("ITDSL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert disk.cache_dir() == tmp_path / "xdg" / "itdsl"


def test_float64_and_float32_kernels_coexist():
    op = itdsl.compile_file(GAUSS, target="cpu")["gauss_smooth"]
    x, y, b = torch.rand(5, 3), torch.rand(4, 3), torch.randn(4, 16)
    u32 = op(X=x, Y=y, b=b)
    u64 = op.double()(X=x.double(), Y=y.double(), b=b.double())
    torch.testing.assert_close(u32.double(), u64, rtol=1e-5, atol=1e-5)


def test_a_cached_plan_that_is_not_a_plan_is_analysed_again(tmp_path, monkeypatch):
    """A pickle that loads to another object (an older layout, a stray file) is removed and
    the operator analysed again, every time, not failing forever."""
    import pickle
    monkeypatch.setenv("ITDSL_CACHE_DIR", str(tmp_path))
    itdsl.compile_file(GAUSS, target="reference").plan("gauss_smooth")
    entry = next((tmp_path / "plans").glob("*.pkl"))
    entry.write_bytes(pickle.dumps({"not": "a plan"}))
    prog = itdsl.compile_file(GAUSS, target="reference")
    assert prog.plan("gauss_smooth").strategy == "dense"
    assert isinstance(pickle.loads(entry.read_bytes()), type(prog.plan("gauss_smooth")))


def test_a_cache_directory_that_is_a_file_is_a_clear_error(tmp_path, monkeypatch):
    afile = tmp_path / "cache"
    afile.write_text("not a directory")
    for where in (afile, afile / "below"):
        monkeypatch.setenv("ITDSL_CACHE_DIR", str(where))
        prog = itdsl.compile_file(GAUSS, target="reference")
        with pytest.raises(itdsl.ItdslError, match="ITDSL_CACHE_DIR=.* is a file, not a dir"):
            prog.plan("gauss_smooth")


PLAN_CHILD = textwrap.dedent("""
    import json, sys, itdsl
    plan = itdsl.compile_source(sys.stdin.read()).plan("gauss_smooth")
    print(json.dumps({"strategy": plan.strategy,
                      "loaded": sorted(m for m in ("torch", "tvm", "tvm_ffi", "sympy",
                                                   "itdsl.runtime", "itdsl.symbolic.recognize")
                                       if m in sys.modules)}))
""")


def test_a_cached_plan_loads_without_torch_tvm_or_sympy(tmp_path):
    """The Plan cache is the symbolic layer's: `Program.plan` on a warm cache imports neither
    the runtime (torch) nor TVM, nor does it analyse (sympy)."""
    env = {**os.environ, "ITDSL_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", PLAN_CHILD], input=GAUSS.read_text(), env=env,
                           cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    cold, warm = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert cold["strategy"] == warm["strategy"] == "dense"
    assert "itdsl.symbolic.recognize" in cold["loaded"]  # the first process analysed
    assert list((tmp_path / "plans").glob("*.pkl"))
    assert warm["loaded"] == [], f"a cached Plan loaded {warm['loaded']}"


@pytest.mark.parametrize("module", ["itdsl.cache.plans", "itdsl.cache.disk", "itdsl.runtime.cache"])
def test_the_cache_modules_import_first_without_a_circle(module):
    """Each cache module imports in a fresh process before anything else of itdsl; the Plan
    cache and its helpers bring in neither torch nor TVM."""
    code = (f"import sys, {module}; "
            "print(sorted(m for m in ('torch', 'tvm', 'tvm_ffi') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    if module.startswith("itdsl.cache"):
        assert r.stdout.strip() == "[]"


def test_plan_key_covers_the_ir_classes():
    """A Plan pickles the operator's IR: a change to the IR's classes is a new key (a stale
    Plan whose domains lacked their axes once crashed a version 1 operator)."""
    from itdsl.cache.disk import sources
    names = {(p.parent.name, p.name) for p in sources("symbolic")}
    assert ("frontend", "ir.py") in names and ("frontend", "ast.py") in names


def test_cache_info_counts_the_entries_and_clear_removes_only_itdsl_files(tmp_path, monkeypatch,
                                                                          capsys):
    from itdsl import cli
    monkeypatch.setenv("ITDSL_CACHE_DIR", str(tmp_path))
    for key in ("k1", "k2"):  # entries where the caches write them (their layout is disk's)
        for f in disk.kernel_files(key):
            f.write_bytes(b"x" * 1000)
    disk.plan_file("p1").parent.mkdir()
    disk.plan_file("p1").write_bytes(b"y" * 500)
    disk.private_temp(disk.plan_file("p2"))  # a write that was interrupted
    (tmp_path / "notes.txt").write_text("not itdsl's")  # a shared directory
    assert cli.main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "$ITDSL_CACHE_DIR" in out
    counts = {" ".join(line.split()[:-3]): line.split()[-3] for line in out.splitlines()
              if line.strip().endswith(("B", "KiB"))}
    assert counts["compiled kernels"] == "2" and counts["analysed operators (Plans)"] == "1"
    assert counts["unfinished writes"] == "1", out
    assert cli.main(["cache", "clear"]) == 0
    assert "removed 2 compiled kernels, 1 Plans and 1 unfinished writes (4.4 KiB)" in \
        capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["notes.txt"]


def test_a_compile_longer_than_a_second_prints_a_progress_line(monkeypatch):
    import io
    import time

    from itdsl.runtime import progress

    monkeypatch.setattr(progress, "DELAY", 0.05)

    def run(seconds: float, n: int = 3) -> str:
        out = io.StringIO()
        with progress.Progress("`op` (cpu, float32)", n, stream=out) as bar:
            for _ in range(n):
                time.sleep(seconds)
                bar.step()
        return out.getvalue()

    assert run(0) == ""  # a warm cache: nothing
    lines = run(0.04).splitlines()  # (a log, not a terminal: a line at the start and the end)
    assert lines[0].startswith("itdsl: compiling `op` (cpu, float32): ") and len(lines) == 2
    assert lines[-1].startswith("itdsl: compiling `op` (cpu, float32): 3 of 3 kernels, ")
    itdsl.set_progress(False)
    try:
        assert run(0.04) == ""
    finally:
        itdsl.set_progress(None)
    with pytest.raises(itdsl.InputError, match="True, False or None"):
        itdsl.set_progress("yes")


def test_a_progress_line_to_a_closed_stream_never_stops_the_compile(monkeypatch):
    """stderr gone (a closed pipe: `... 2>&1 | head`): the progress line stops, the work
    goes on."""
    import time

    from itdsl.runtime import progress

    monkeypatch.setattr(progress, "DELAY", 0.01)

    class Broken:
        def isatty(self):
            return True

        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    done = 0
    with progress.Progress("`op` (cpu, float32)", 3, stream=Broken()) as bar:
        for _ in range(3):
            time.sleep(0.03)
            bar.step()
            done += 1
    assert done == 3
