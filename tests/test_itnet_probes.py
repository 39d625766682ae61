"""The kernel probes of experiments/itnet/probes.py on kernels whose answers are known by
construction (no training, no extras)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from experiments.itnet.probes import probe

N = 20  # points 0, 1/19, …, 1 on a line


class _Phi(nn.Module):
    """A kernel of z = (x, y, a(x), a(y)) (1-D positions, 1 key) picked by `form`."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x, y, ax, ay = z.unbind(-1)
        if self.form == "diagonal":  # 1 where x = y, else 0: stationary, local
            k = ((x - y).abs() < 0.5 / (N - 1)).to(z.dtype)
        elif self.form == "content":  # a(x) only: of mean 0 at every pair, blind to y
            k = ax + 0 * ay
        else:  # "smooth": a smooth function of x − y
            k = torch.cos(3 * (x - y))
        return k[..., None]


def _mix(form: str, causal: bool = False):
    return SimpleNamespace(kind="mlp", causal=causal, keys=nn.Identity(), op=SimpleNamespace(
        phi=_Phi(form)))


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(256, N, 1, generator=g, dtype=torch.float64)
    pos = torch.linspace(0, 1, N, dtype=torch.float64)[None, :, None]
    return h, pos


def test_a_diagonal_kernel_is_stationary_and_local():
    r = probe(_mix("diagonal"), *_inputs())
    assert r["stationarity"] == pytest.approx(1.0) and r["position share"] == pytest.approx(1.0)
    # the nearest tenth of the 400 pairs: the 20 on the diagonal and 20 next to it, so the mean
    # there is 0.5 against 20/400 overall
    assert r["locality"] == pytest.approx(10.0)
    assert r["future mass"] == pytest.approx(0.0)


def test_a_content_kernel_has_no_position_share():
    r = probe(_mix("content"), *_inputs())
    assert abs(r["stationarity"]) < 0.01 and abs(r["position share"]) < 0.01
    assert r["locality"] == pytest.approx(1.0, abs=0.1)
    assert r["future mass"] == pytest.approx(0.5, abs=0.05)


def test_a_smooth_stationary_kernel_and_the_causal_bracket():
    h, pos = _inputs()
    r = probe(_mix("smooth"), h, pos)
    assert r["stationarity"] == pytest.approx(1.0)
    assert 1.0 < r["locality"] < 2.0  # larger near x = y, but not local
    causal = probe(_mix("smooth", causal=True), h, pos)
    assert causal["future mass"] == 0.0
