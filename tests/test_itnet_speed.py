"""experiments/itnet/speed.py: the block written in plain torch with every pair materialised,
which the ITNet speed bar times against itdsl's compiled block, computes what that block
computes (forward and every param's gradient), and its check refuses what it does not match.
Needs no matplotlib (only the plot imports it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # a plain `pytest` puts only tests/ on the path, `python -m pytest` "."
    sys.path.insert(0, ROOT)

from experiments.itnet import speed  # noqa: E402


def test_the_materialised_block_agrees_with_the_compiled_block():
    blk = speed.block("mlp")
    errors = speed.check_agreement(blk, *speed.inputs(48))
    assert set(errors) == {"forward", *dict(blk.named_parameters())}


def test_the_agreement_check_catches_a_divergence(monkeypatch):
    exact = speed.materialised
    monkeypatch.setattr(speed, "materialised", lambda p, x, pos: exact(p, x, pos) * (1 + 1e-4))
    with pytest.raises(speed.Disagreement):
        speed.check_agreement(speed.block("mlp"), *speed.inputs(16))
    with pytest.raises(speed.Disagreement, match="kind 'mlp'"):
        speed.check_agreement(speed.block("lowrank"), *speed.inputs(16))
