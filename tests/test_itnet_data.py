"""experiments/itnet: the data sets' layouts (shapes, dtypes, labels, padding, the shuffled
MNIST-1D) and the baselines' sizes, output shapes and masking of padded steps. Skipped without
the `itnet` extras; no training."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # a plain `pytest` puts only tests/ on the path, `python -m pytest` "."
    sys.path.insert(0, ROOT)

from experiments.itnet import baselines, data  # noqa: E402

for _module in ("sklearn", "mlxtend", "mnist1d", "sktime"):
    pytest.importorskip(_module)

KINDS = sorted(baselines.MODELS)
TARGET = 30_000


@pytest.fixture(scope="module")
def digits() -> data.Task:
    return data.digits()


@pytest.fixture(scope="module")
def vowels() -> data.Task:
    return data.japanese_vowels()


def _check_labels(task: data.Task) -> None:
    for y in (task.y_train, task.y_test):
        assert y.dtype == torch.long
        assert y.min() == 0 and y.max() == task.classes - 1
    assert torch.equal(task.y_train.unique(), torch.arange(task.classes))


def _check_floats(task: data.Task) -> None:
    for x in (task.x_train, task.x_test):
        assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert len(task.x_train) == len(task.y_train) and len(task.x_test) == len(task.y_test)


def test_digits(digits):
    assert digits.kind == "image" and digits.classes == 10 and digits.len_train is None
    assert digits.x_train.shape == (1437, 1, 8, 8) and digits.x_test.shape == (360, 1, 8, 8)
    assert digits.x_train.min() == 0 and digits.x_train.max() == 1
    _check_floats(digits)
    _check_labels(digits)


def test_mnist1d_and_its_shuffled_twin():
    data._mnist1d_arrays.cache_clear()
    state = np.random.get_state()[1].copy()
    plain, shuffled = data.mnist1d(), data.mnist1d(shuffle=True)
    assert np.array_equal(np.random.get_state()[1], state)  # the generator's seeding is undone
    for task in (plain, shuffled):
        assert task.kind == "sequence" and task.classes == 10 and task.len_train is None
        assert task.x_train.shape == (4000, 40, 1) and task.x_test.shape == (1000, 40, 1)
        _check_floats(task)
        _check_labels(task)
    perm = data.mnist1d_permutation()
    assert torch.equal(perm.sort().values, torch.arange(40))
    assert not torch.equal(perm, torch.arange(40))
    assert torch.equal(shuffled.x_train, plain.x_train[:, perm])
    assert torch.equal(shuffled.x_test, plain.x_test[:, perm])
    assert torch.equal(shuffled.y_train, plain.y_train)
    assert torch.equal(shuffled.y_test, plain.y_test)


def test_gunpoint():
    task = data.gunpoint()
    assert task.kind == "sequence" and task.classes == 2 and task.len_train is None
    assert task.x_train.shape == (50, 150, 1) and task.x_test.shape == (150, 150, 1)
    _check_floats(task)
    _check_labels(task)
    x = torch.cat([task.x_train, task.x_test])
    torch.testing.assert_close(x.mean(1), torch.zeros(200, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(1, correction=0), torch.ones(200, 1), atol=1e-4, rtol=0)


def test_japanese_vowels_padding(vowels):
    assert vowels.kind == "sequence" and vowels.classes == 9
    assert vowels.x_train.shape == (270, 29, 12) and vowels.x_test.shape == (370, 29, 12)
    _check_floats(vowels)
    _check_labels(vowels)
    for x, lengths in ((vowels.x_train, vowels.len_train), (vowels.x_test, vowels.len_test)):
        assert lengths.dtype == torch.long and lengths.shape == (len(x),)
        assert lengths.min() >= 1 and lengths.max() <= x.shape[1]
        past = torch.arange(x.shape[1]) >= lengths[:, None]
        assert (x[past] == 0).all()  # zero padding past each length
        assert (x[torch.arange(len(x)), lengths - 1] != 0).any(1).all()  # the last step is real
    assert max(vowels.len_train.max(), vowels.len_test.max()) == vowels.x_train.shape[1]


@pytest.mark.parametrize("kind", KINDS)
def test_baseline_on_images(kind, digits):
    model = baselines.make(kind, digits, target_params=TARGET).eval()
    assert abs(baselines.count_params(model) - TARGET) <= 0.1 * TARGET
    with torch.no_grad():
        assert model(digits.x_test[:5]).shape == (5, digits.classes)


@pytest.mark.parametrize("kind", KINDS)
def test_baseline_on_sequences_masks_padding(kind, vowels):
    model = baselines.make(kind, vowels, target_params=TARGET).eval()
    assert abs(baselines.count_params(model) - TARGET) <= 0.1 * TARGET
    x, lengths = vowels.x_test[:16], vowels.len_test[:16]
    assert (lengths < x.shape[1]).sum() >= 8  # most of them have padding to change
    noisy = torch.where(torch.arange(x.shape[1])[:, None] < lengths[:, None, None], x,
                        10 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        out = model(x, lengths)
        assert out.shape == (16, vowels.classes)
        torch.testing.assert_close(model(noisy, lengths), out, atol=1e-5, rtol=1e-5)
        assert model(x).shape == (16, vowels.classes)  # lengths are optional


def test_make_rejects_what_no_width_reaches(digits):
    with pytest.raises(ValueError, match="closest is"):
        baselines.make("mlp", digits, target_params=100)
    with pytest.raises(ValueError, match="unknown baseline"):
        baselines.make("lstm", digits, target_params=TARGET)
