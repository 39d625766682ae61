"""Calling an operator wrongly gives an itdsl error naming the input, expected and actual."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from util import EXAMPLES, ROOT

import itdsl
from itdsl.errors import InputError, ItdslError


@pytest.fixture(scope="module")
def gauss():
    return itdsl.compile_file(EXAMPLES / "gauss.it", target="reference")["gauss_smooth"]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(X=torch.rand(5, 3), Y=torch.rand(4, 3)), "missing the input `b`"),
    (dict(X=torch.rand(5, 3), Y=torch.rand(4, 3), b=torch.rand(4, 8)),
     "input `b` should have shape [..., n, 16]"),
    (dict(X=torch.rand(5, 2), Y=torch.rand(4, 3), b=torch.rand(4, 16)),
     "`X` should have shape [..., n, 3]"),
    (dict(X=torch.rand(5, 3), Y=torch.rand(4, 3), b=torch.rand(6, 16)),
     "input `b` has 6 points of `Y`, but `Y` has 4"),
    (dict(X=torch.rand(5, 3), Y=torch.rand(4, 3), b=torch.rand(4, 16, dtype=torch.float64)),
     "`b` has dtype torch.float64 but `X` has torch.float32"),
    (dict(X=torch.rand(5, 3), Y=torch.rand(4, 3), b=torch.ones(4, 16, dtype=torch.int64)),
     "`b` has dtype torch.int64"),
    (dict(X=torch.rand(5, 3), Y=torch.rand(4, 3), b=torch.rand(4, 16), c=1),
     "unexpected argument `c`"),
    (dict(Y=torch.rand(4, 3), b=torch.rand(4, 16)), "needs the coordinates of `X`"),
    (dict(X=torch.rand(2, 5, 3), Y=torch.rand(4, 3), b=torch.rand(3, 4, 16)),
     "batch) dimensions do not broadcast"),
    (dict(X=[[0.0, 0.0, 0.0]], Y=torch.rand(4, 3), b=torch.rand(4, 16)), "got list"),
])
def test_bad_calls(gauss, kwargs, needle):
    with pytest.raises(InputError) as e:
        gauss(**kwargs)
    assert needle in str(e.value)


def test_output_only_domain_needs_its_size():
    op = itdsl.compile_file(EXAMPLES / "inn_linear.it", target="reference")["integral_linear"]
    with pytest.raises(InputError, match="number of points of `U` is unknown.*`U=24`"):
        op(f=torch.rand(8))
    with pytest.raises(InputError, match="pass its number of points as an int"):
        op(f=torch.rand(8), U=torch.rand(3))
    with pytest.raises(InputError, match="at least 2 points"):
        op(f=torch.rand(8), U=1)


def test_unknown_operator_and_target():
    prog = itdsl.compile_file(EXAMPLES / "gauss.it", target="reference")
    with pytest.raises(ItdslError, match="no operator named `gaus`.*"):
        prog["gaus"]
    with pytest.raises(ItdslError, match="unknown target `tpu`"):
        itdsl.compile_file(EXAMPLES / "gauss.it", target="tpu")
    with pytest.raises(ItdslError, match="unknown strategy"):
        itdsl.compile_file(EXAMPLES / "gauss.it", strategy="fft")


def test_missing_file_is_an_itdsl_error(tmp_path):
    with pytest.raises(ItdslError, match="cannot read"):
        itdsl.compile_file(tmp_path / "nope.it")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "itdsl", *args], cwd=ROOT, check=False, capture_output=True,
                          text=True, timeout=120)


def test_cli_check_explain_and_emit():
    r = run_cli("check", *sorted(str(p) for p in EXAMPLES.glob("*.it")))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(": ok (") == len(list(EXAMPLES.glob("*.it")))
    r = run_cli("explain", str(EXAMPLES / "attention.it"), "--op", "causal_attention")
    assert r.returncode == 0 and "operator causal_attention" in r.stdout
    assert "strategy:" in r.stdout
    r = run_cli("compile", str(EXAMPLES / "ema.it"), "--emit", "ir")
    assert r.returncode == 0 and "output g(t: T) : R^16 =" in r.stdout
    r = run_cli("compile", str(EXAMPLES / "ema.it"), "--emit", "it")
    assert r.returncode == 0 and r.stdout.startswith("operator ema {")
    r = run_cli("compile", str(EXAMPLES / "ema.it"), "--emit", "ast")
    assert r.returncode == 0 and "KernelDecl @" in r.stdout
    r = run_cli("explain", str(EXAMPLES / "attention.it"), "--op", "nope")
    assert r.returncode == 1 and "no operator named `nope`" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_calls_take_keywords_and_a_generator(target):
    op = itdsl.compile_file(EXAMPLES / "gauss.it", target=target)["gauss_smooth"]
    kw = dict(X=torch.rand(5, 3), Y=torch.rand(4, 3), b=torch.rand(4, 16))
    with pytest.raises(InputError, match="keyword arguments only.*1 positional") as e:
        op(torch.rand(5, 3), Y=kw["Y"], b=kw["b"])
    assert "op(X=x, b=b)" in str(e.value)
    with pytest.raises(InputError, match="`generator` must be a torch.Generator, got int"):
        op(**kw, generator=123)


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_a_scalar_field_with_a_trailing_one_says_so(target):
    text = """operator s {
        domain X = points(2)
        input  f : X -> R
        output u(x: X) = integral(y: X) exp(-sqnorm(x - y)) * f(y)
    }"""
    op = itdsl.compile_source(text, target=target)["s"]
    with pytest.raises(InputError, match="has 1 points of `X`, but `X` has 5") as e:
        op(X=torch.rand(5, 2), f=torch.rand(5, 1))
    assert "scalar field (R)" in str(e.value) and "f.squeeze(-1)" in str(e.value)


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_sizes_beyond_memory_fail_before_allocating(target):
    op = itdsl.compile_file(EXAMPLES / "inn_linear.it", target=target)["integral_linear"]
    with pytest.raises(InputError, match=r"`U=1000000000000` needs 3,725.3 GiB, more than"):
        op(f=torch.rand(8), U=10**12)


def test_the_reference_refuses_pair_tensors_beyond_memory():
    op = itdsl.compile_file(EXAMPLES / "gauss.it", target="reference")["gauss_smooth"]
    x = torch.rand(100_000, 3)
    with pytest.raises(InputError, match=r"reference semantics of `integral\(y: Y\)` over "
                                         r"100000 × 100000 pairs needs") as e:
        op(X=x, Y=x, b=torch.rand(100_000, 16))
    assert 'target="cpu"' in str(e.value)
