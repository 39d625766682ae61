"""The differential fuzzer's CI sample: every execution path computes the same numbers.

A fixed sample of generated programs (tests/fuzzing/generate.py) runs through the reference,
the Plan evaluator and the automatic strategy; a smaller one through the TVM kernels too, in
float64 and float32; and every program of tests/fuzz_corpus/ through every path. The
comparison rules are in tests/fuzzing/paths.py. `make fuzz` runs the large campaign.

A sample program whose every failure belongs to a bug listed in KNOWN is an xfail naming
the bug (not strict: the bugs are being fixed); any other failure fails the test. A corpus
file that still fails carries a `# xfail: <bug>` line, and is a strict xfail.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fuzzing.corpus import CORPUS, header, replay
from fuzzing.generate import EXCLUDED, generate
from fuzzing.paths import Failure, Report, run_case

import itdsl
from itdsl.domains import RULES
from itdsl.frontend import check, parse
from itdsl.functions import ACTIVATIONS, FUNCTIONS

BASE = 1_000_000  # the sample's first seed
TORCH_SAMPLE = 600
TVM_SAMPLE = 18
TIMEOUT = 300  # seconds per program

# The bugs being fixed, each with a test of one failure (and its report) that says the failure
# is that bug. A sample program all of whose failures are known bugs is an xfail naming them.
KNOWN: list[tuple[str, Callable[[Report, Failure], bool]]] = []  # none open


def _bugs(report: Report) -> tuple[list[Failure], set[str]]:
    """The failures of no known bug, and the known bugs met."""
    unknown, bugs = [], set()
    for f in report.failures:
        bug = next((name for name, test in KNOWN if test(report, f)), None)
        if bug is None:
            unknown.append(f)
        else:
            bugs.add(bug)
    return unknown, bugs


def _alarm(signum, frame):
    raise TimeoutError(f"a program ran over {TIMEOUT} s")


def _run(fn, *args, **kw) -> Report:
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT)
    try:
        return fn(*args, **kw)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _verdict(report: Report) -> None:
    unknown, bugs = _bugs(report)
    shown = "\n".join(str(f)[:500] for f in unknown)
    assert not unknown, f"seed {report.seed} ({report.inputs}):\n{report.text}\n{shown}"
    if bugs:
        pytest.xfail("; ".join(sorted(bugs)))


# Every construct of the language, as text the generator writes (docs/language.md); every
# quadrature rule of `itdsl.domains`, every function of the table written `name(...)` and
# every activation, but those the generator
# excludes (with its reason).
CONSTRUCTS = ["points(", "grid(", "= index", *(f"with {r.name}" for r in RULES.values()),
              "importance =", ": R =", ": R^",
              *(f"act = {a}" for a in ACTIVATIONS),
              *(f"{f.name}(" for f in FUNCTIONS.values()
                if f.syntax == "call" and f.name not in EXCLUDED),
              *(f"{f}(" for f in ("dot", "norm", "sqnorm", "sum")),
              ")[", "pi", " and ", " or ", "[y <= x]", "[y < x]", "/ integral", "kernel "]


def test_generator_writes_the_whole_language_and_checks():
    texts = [generate(seed).text for seed in range(BASE, BASE + 1000)]
    for text in texts[:200]:
        check(parse(text))  # the generator writes well-typed programs
    missing = [c for c in CONSTRUCTS if not any(c in t for t in texts)]
    assert not missing, missing
    assert any("spline(" in t and ", " in t.split("spline(")[1].split(")")[0] for t in texts)


@pytest.mark.parametrize("seed", range(BASE, BASE + TORCH_SAMPLE))
def test_torch_paths_agree(seed):
    _verdict(_run(run_case, seed))


@pytest.mark.parametrize("seed", range(BASE + TORCH_SAMPLE, BASE + TORCH_SAMPLE + TVM_SAMPLE))
def test_tvm_kernels_agree(seed):
    _verdict(_run(run_case, seed, tvm=True))


def _corpus() -> list:
    cases = []
    for path in sorted(CORPUS.glob("*.it")):
        bug = header(path.read_text()).get("xfail")
        marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
        cases.append(pytest.param(path, marks=marks, id=path.stem))
    return cases


@pytest.mark.parametrize("path", _corpus())
def test_corpus_program_agrees(path: Path):
    report = _run(replay, path)
    assert report.skipped is None, report.skipped
    assert not report.failures, "\n".join(str(f)[:500] for f in report.failures)


def test_operators_differing_only_in_their_quadrature_stay_apart():
    """Found by the fuzzer, in a worker that had run another program with the same steps:
    custom ops were registered by a hash of the Plan's steps only, so a program differing in
    a quadrature rule or a grid's bounds ran the first one's Plan (fixed in f92c1fb)."""
    f = torch.linspace(1, 2, 6, dtype=torch.float64)
    for rule in ("trapezoid", "simpson", "riemann"):
        text = f"""operator same_steps {{
            domain U = grid(0, 1)
            domain V = grid(0, 1)
            input  f : V -> R
            output o(x: U) = integral(y: V) sin(x * y) * f(y) with {rule}
        }}"""
        ref = itdsl.compile_source(text, target="reference")["same_steps"](U=3, f=f)
        dense = itdsl.compile_source(text, target="cpu", strategy="dense")["same_steps"]
        torch.testing.assert_close(dense(U=3, f=f), ref, msg=rule)
