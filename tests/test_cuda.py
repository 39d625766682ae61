"""CUDA: every example operator's kernels are generated and build for sm_80 and sm_90.

No GPU is on these machines: the CUDA C that TVM generates is compiled to cubins with
the nvcc installed here (and its resource usage read), but never run. The numbers of
the same Plans are checked on the CPU path (tests/test_compiled.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from util import EXAMPLES

import itdsl
from itdsl.lowering import kernel_codes

NVCC = shutil.which("nvcc")
OPS = [(f.name, op.name) for f in sorted(EXAMPLES.glob("*.it"))
       for op in itdsl.compile_file(f).ir.operators]
# The default run builds one operator of each kind of kernel (a dense sum, the fused online
# softmax, an MLP kernel, a lattice read); `make test-cuda` ($ITDSL_TEST_CUDA=all) every
# example operator.
EVERY = os.environ.get("ITDSL_TEST_CUDA") == "all"
KINDS = {"gauss_smooth", "causal_attention", "itnet_mix", "integral_conv3x3"}


def _nvcc(src: str, arch: str | tuple[str, ...], tmp_path) -> str:
    """Build `src` for `arch` (or several at once: one nvcc call, its back ends in parallel
    threads) and return nvcc's resource report."""
    archs = (arch,) if isinstance(arch, str) else arch
    cu = tmp_path / "k.cu"
    cu.write_text(src)
    out = tmp_path / "k.bin"
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in archs]
    r = subprocess.run([NVCC, *gencode, "--threads", str(len(archs)),
                        "-cubin" if len(archs) == 1 else "-fatbin", "-o", str(out),
                        "--resource-usage", str(cu)], check=False, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.stat().st_size > 0
    report = r.stdout + r.stderr
    for a in archs:
        assert f"'{a}'" in report, report[-2000:]  # a resource report per architecture
    return report


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("file,name", [o for o in OPS if EVERY or o[1] in KINDS],
                         ids=[n for _, n in OPS if EVERY or n in KINDS])
def test_cuda_kernels_build_for_sm80_and_sm90(file, name, tmp_path):
    plan = itdsl.compile_file(EXAMPLES / file, target="cuda").plan(name)
    built = {}  # source -> the architectures it is built for (one nvcc call per source)
    for arch in ("sm_80", "sm_90"):
        codes = list(kernel_codes(plan, "cuda", arch=arch))
        assert len(codes) >= 2  # a forward kernel and at least one backward kernel
        for title, src in codes:
            assert "__global__" in src and "__launch_bounds__" in src, title
            assert "__shared__" in src, title  # column tiles staged in shared memory
            assert "threadIdx.x" in src and "blockIdx.x" in src, title
            built.setdefault(src, (title, []))[1].append(arch)
    for src, (title, archs) in built.items():
        assert "registers" in _nvcc(src, tuple(archs), tmp_path), title


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_nested_functions_start_stages_and_build(tmp_path):
    """softplus(exp(.)) and exp(exp(.)) nest let-bound values too deeply for one kernel
    body (lowering/spec.py LET_NESTING): their inner values are stages, on the GPU too."""
    src = """operator nested {
        domain X = points(2)
        input  b : X -> R
        output u(x: X) = integral(y: X) softplus(exp(x[0] * y[0])) * exp(exp(-sqnorm(x - y)))
                                       * b(y)
    }"""
    plan = itdsl.compile_source(src, target="cuda").plan("nested")
    for title, code in kernel_codes(plan, "cuda", arch="sm_80"):
        assert "__global__" in code, title
        _nvcc(code, "sm_80", tmp_path)


def test_source_api_and_cli(tmp_path):
    prog = itdsl.compile_file(EXAMPLES / "ema.it", target="cuda")
    src = prog.source("ema", "cuda")
    assert src.count("// ema:") >= 2 and "__global__" in src
    tir = prog.source("ema", "tir")
    assert "T.prim_func" in tir
    out = tmp_path / "ema.cu"
    r = subprocess.run([os.sys.executable, "-m", "itdsl", "compile", str(EXAMPLES / "ema.it"),
                        "--target", "cuda", "--emit", "cuda", "-o", str(out)],
                       check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "__global__" in out.read_text()


def test_cuda_target_without_gpu_says_so():
    op = itdsl.compile_file(EXAMPLES / "ema.it", target="cuda")["ema"]
    import torch
    if torch.cuda.is_available():  # pragma: no cover - not on these machines
        pytest.skip("a GPU is present")
    with pytest.raises(itdsl.LoweringError, match="no CUDA device"):
        op(f=torch.randn(5, 16))


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("which", ["blur2d", "integral_conv3x3", "stride2", "cube"])
def test_reads_at_computed_points_build_for_cuda(which, tmp_path):
    """Kernels that read a field at computed integer points (language version 1: stencils,
    strided reads; 2 and 3 axes) take the field as a table argument and build with nvcc."""
    from test_lattice_kernels import BLUR2D, INTEGRAL_CONV3X3, READS
    src = {"blur2d": BLUR2D, "integral_conv3x3": INTEGRAL_CONV3X3}.get(which, READS)
    plan = itdsl.compile_source(src, target="cuda", strategy="dense").plan(which)
    archs = ("sm_80", "sm_90") if which in ("blur2d", "integral_conv3x3") else ("sm_80",)
    for arch in archs:
        codes = list(kernel_codes(plan, "cuda", arch=arch))
        assert len(codes) == 2  # the forward sum and the backward sum (the scatter is torch's)
        for title, code in codes:
            assert "__global__" in code and "table" in code, title
            assert "registers" in _nvcc(code, arch, tmp_path), title
