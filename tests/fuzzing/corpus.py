"""Failing programs as `.it` files whose leading `#` lines say how to replay them.

    # fuzz: seed 1234, family general, strategy lowrank
    # inputs: X[3, 2] strided, b[3, 2] +special
    # failure: plan input:b: nan: NaN positions differ: ...
    # rerun: PYTHONPATH=tests .venv/bin/python -m fuzzing --replay tests/fuzz_corpus/...
    # replay: seed=1234 tvm=1 sizes=X:0 batch=none special=none set=b@3=nan
    # xfail: <the bug>   (a corpus program that still fails today)

`replay:` holds the options of `make_inputs` (the inputs are drawn from the seed, for the
text of the file, so a program shrunk by hand keeps its seed) and `tvm=1` to run the TVM
kernels too. `tests/test_differential.py` replays every file of `tests/fuzz_corpus/`.
"""

from __future__ import annotations

from pathlib import Path

from .paths import Report, run_case

CORPUS = Path(__file__).resolve().parents[1] / "fuzz_corpus"


def header(text: str) -> dict[str, str]:
    """The `# key: value` lines at the top of a corpus file (the first of each key)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        key, _, value = line[1:].partition(":")
        out.setdefault(key.strip(), value.strip())
    return out


def replay_options(text: str) -> tuple[int, bool, dict[str, str]]:
    """(seed, whether to run the TVM kernels, input options) of a corpus file."""
    opts = dict(p.split("=", 1) for p in header(text).get("replay", "").split() if "=" in p)
    seed = int(opts.pop("seed", "0"))
    tvm = opts.pop("tvm", "1") == "1"
    return seed, tvm, opts


def replay(path: Path, tvm: bool | None = None) -> Report:
    """Run a corpus file through every path (the TVM kernels unless `tvm` is False)."""
    text = path.read_text()
    seed, file_tvm, options = replay_options(text)
    return run_case(seed, file_tvm if tvm is None else tvm, text=text, options=options)


def save(report: Report, directory: Path, tvm: bool) -> Path:
    """Write a failing program with its header; return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"seed-{report.seed}.it"
    try:
        shown = path.relative_to(Path.cwd())
    except ValueError:
        shown = path
    lines = [f"# fuzz: seed {report.seed}, family {report.family}, strategy {report.strategy}",
             f"# inputs: {report.inputs}"]
    lines += [f"# failure: {f}"[:400] for f in report.failures]
    lines += [f"# rerun: PYTHONPATH=tests .venv/bin/python -m fuzzing --replay {shown}",
              f"# replay: seed={report.seed} tvm={int(tvm)}"]
    body = report.text.splitlines(keepends=True)
    while body and body[0].startswith("#"):  # a replayed file's own header
        body.pop(0)
    path.write_text("\n".join(lines) + "\n" + "".join(body))
    return path
