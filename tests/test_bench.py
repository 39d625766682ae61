"""`itdsl bench`: its cases run and agree with their peers, its table reports what was
measured, its plot is written, and bad use gets a clear error."""

from __future__ import annotations

import sys

import pytest
import torch

import itdsl
from itdsl import bench, cli


@pytest.fixture
def cost_model():
    """The default small-call rule (the suite runs with $ITDSL_SMALL_PAIRS=0)."""
    import os
    saved = os.environ.pop("ITDSL_SMALL_PAIRS", None)
    itdsl.set_small_pairs(None)
    yield
    if saved is not None:
        os.environ["ITDSL_SMALL_PAIRS"] = saved


@pytest.mark.parametrize("backward", [False, True])
def test_gauss_methods_compute_the_same_sum(backward):
    fns = bench.gauss_methods(300, backward=backward)
    outs = {m: fn() for m, fn in fns.items()}
    assert {"itdsl", "torch chunked"} <= set(outs)
    for m, out in outs.items():
        torch.testing.assert_close(out, outs["torch chunked"], rtol=1e-4, atol=1e-4, msg=m)


def test_mix_methods_agree_and_restore_the_setting(cost_model):
    itdsl.set_small_pairs(77)  # the user's: kept after the forced-kernels method
    try:
        fns = bench.mix_methods(12, batch=3)
        outs = {m: fn() for m, fn in fns.items()}
        assert itdsl.settings.small_pairs() == 77
        assert fns["itdsl"].ran == "kernels"  # 3·12·12 pairs > 77
    finally:
        itdsl.set_small_pairs(None)
    for m, out in outs.items():
        torch.testing.assert_close(out, outs["reference"], rtol=1e-4, atol=1e-5, msg=m)


def test_table_ratios_are_against_itdsl():
    rows = [{"case": "c", "label": "n", "n": 10, "method": "itdsl", "s": 0.002, "error": ""},
            {"case": "c", "label": "n", "n": 10, "method": "peer", "s": 0.005, "error": ""},
            {"case": "c", "label": "n", "n": 10, "method": "fast", "s": 0.001, "error": ""},
            {"case": "c", "label": "n", "n": 10, "method": "broken", "s": None,
             "error": "RuntimeError: no"}]
    text = bench.table(rows)
    assert "| c | n = 10 | peer | 5.00 ms | 2.50× slower |" in text
    assert "| c | n = 10 | fast | 1.00 ms | 2.00× faster |" in text
    assert "| c | n = 10 | broken | failed (RuntimeError: no) | |" in text


def test_cli_writes_table_and_plot(tmp_path, capsys, cost_model, monkeypatch):
    monkeypatch.setattr(bench, "cases", lambda quick: [
        ("MLP-kernel mixer, training step (batch 16)", "n", [8, 16],
         lambda n: bench.mix_methods(n, batch=2))])
    pytest.importorskip("matplotlib")
    assert cli.main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "bench.md").read_text()
    for n in (8, 16):
        for method in ("itdsl (materialised)", "itdsl kernels", "reference"):
            assert f"| n = {n} | {method} |" in text
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


def test_cli_errors_are_clear(tmp_path, capsys, monkeypatch):
    assert cli.main(["bench", "--only", "no such case", "--out", str(tmp_path / "o")]) == 1
    assert "no benchmark case matches" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing made for a run that cannot start
    afile = tmp_path / "afile"
    afile.write_text("")
    for out, what in ((afile, "a file, not a folder"), (afile / "sub", "cannot make")):
        assert cli.main(["bench", "--no-plot", "--only", "mixer", "--out", str(out)]) == 1
        assert what in capsys.readouterr().err
    # no matplotlib: the plot's error says how to get it (or to skip the plot)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rows = [{"case": "c", "label": "n", "n": 10, "method": "itdsl", "s": 0.002, "error": ""}]
    with pytest.raises(itdsl.InputError, match="matplotlib") as e:
        bench.plot(rows, tmp_path / "x.png")
    assert "--no-plot" in e.value.render()
