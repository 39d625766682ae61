"""experiments/itnet/run: a tiny run in this process (one task with a padding mask, every model,
one epoch on a subset, the mixers in torch so that no kernel is compiled) writes the CSVs, the
table and the plot; the accuracies are fractions, the baselines at ITNet's parameter count.
Skipped without the `itnet` extras."""

from __future__ import annotations

import csv
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # a plain `pytest` puts only tests/ on the path, `python -m pytest` "."
    sys.path.insert(0, ROOT)

for _module in ("sklearn", "mlxtend", "mnist1d", "sktime", "matplotlib", "tqdm"):
    pytest.importorskip(_module)

from experiments.itnet import run  # noqa: E402
from experiments.itnet.models import MODELS  # noqa: E402
from experiments.itnet.train import Recipe  # noqa: E402

TASK = "japanese_vowels"


def test_quick_run_writes_every_output(tmp_path):
    config = replace(run.CONFIGS[TASK], target="reference", recipe=Recipe(epochs=1, batch=64,
                                                                          lr=3e-3))
    md = run.experiment([TASK], list(MODELS), [0], {TASK: config}, quick=True, jobs=0,
                        out=tmp_path)
    for name in ("results.csv", "epochs.csv", "table.md", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == list(MODELS)
    itnet = int(rows[0]["params"])
    for r in rows:
        assert 0 <= float(r["accuracy"]) <= 1
        assert abs(int(r["params"]) - itnet) <= 0.1 * itnet
    with (tmp_path / "epochs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(MODELS)  # one epoch each
    assert f"| {TASK} |" in md and "best baseline" in md
