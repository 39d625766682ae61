"""The pruning arms. Each arm prepares once per trained model and then gives, for a rate r
(the fraction of every channel group's channels removed), a model to evaluate, with no
fine-tuning. Every arm keeps the same number of channels per group at a given r, INN's
rule round((1 − r)·n) (at least 2), so that the arms are compared at equal widths.

Two arms do more than resample: "INN, tuned grid" learns the resampled axes' nodes at each
rate (`tune_grid`, distillation against the full-size net on training images; the weights
unchanged), and "INN, random widths" is a network trained from scratch with `inn.fit` (full
width and a random width per group on every step), then resampled — as it is, or with its
BatchNorms' statistics calibrated at each size on training batches (`calibrate`)."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch_pruning as tp
from torch import nn
from torch.fx.experimental.optimization import fuse

from itdsl import inn
from itdsl.inn.layers import count

from .data import Split

Pruner = Callable[[float], nn.Module]  # rate -> the pruned model


class Run(NamedTuple):
    """What an arm may need beyond the trained model: how it was made."""

    make: Callable[[], nn.Module]  # a fresh, untrained model of the same architecture
    epochs: int
    seed: int


Arm = Callable[[nn.Module, Split, Run], Pruner]  # (trained model in eval mode, data, run)
GRID_STEPS = 40  # tune_grid's steps per rate
GRID_BATCH = 128


def widths(groups: dict[str, int], rate: float) -> dict[str, int]:
    """The channels each group keeps at `rate`: INN's resampling rule."""
    return {g: count(1 - rate, n) for g, n in groups.items()}


def layer_groups(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, int], dict[str, str]]:
    """The model's channel groups {name: channels} and the group of each Conv2d/Linear's
    output {module name: group}, as `inn.convert` finds them (layers whose output is not a
    group, the classifier, are left out)."""
    net = inn.convert(model, x, permute=False)
    return net.groups, {name: layer.out_group for name, layer in net.layers().items()
                        if layer.out_group is not None}


def l1(model: nn.Module, data: Split, run: Run | None = None) -> Pruner:
    """L1 structured pruning with torch-pruning: its dependency graph couples the layers of a
    group (a residual add's convs, the BatchNorms, the next layer's inputs), each channel's
    importance is the mean over the group of the L1 norms of its slices (conv filters,
    BatchNorm scales, the next layer's input columns); the least important are removed,
    the classifier's outputs kept. BatchNorm stays unfolded, as torch-pruning leaves it."""
    x = data.x_test[:2]
    groups, group_of = layer_groups(model, x)

    def prune(rate: float) -> nn.Module:
        if rate == 0:
            return model
        keep = widths(groups, rate)
        m = copy.deepcopy(model)
        mods = dict(m.named_modules())
        # torch-pruning keeps int(n·(1 − ratio)) channels; a ratio half a channel below
        # 1 − k/n makes that exactly k, whatever the rounding of the float product
        ratios = {mods[name]: 1 - (keep[g] + 0.5) / groups[g] for name, g in group_of.items()}
        classifier = [mod for name, mod in mods.items()
                      if isinstance(mod, (nn.Conv2d, nn.Linear)) and name not in group_of]
        pruner = tp.pruner.MetaPruner(
            m, x, importance=tp.importance.MagnitudeImportance(p=1, normalizer=None),
            pruning_ratio_dict=ratios, ignored_layers=classifier)
        pruner.step()
        got = {g: mods[g].out_channels if isinstance(mods[g], nn.Conv2d)
               else mods[g].out_features for g in groups}
        if got != keep:
            raise RuntimeError(f"torch-pruning kept {got}, not {keep}")
        return m.eval()

    return prune


def _inn(permute: bool) -> Arm:
    """The INN arm: convert once (channels reordered by 2-opt or not), then resample every
    group to 1 − r of its channels."""
    def arm(model: nn.Module, data: Split, run: Run) -> Pruner:
        net = inn.convert(model, data.x_test[:2], permute=permute)
        return lambda rate: net if rate == 0 else net.resample(1 - rate)
    return arm


def _batches(data: Split, seed: int, size: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.y_train), generator=g)
    return [data.x_train[order[i:i + size]] for i in range(0, len(order), size)]


def tuned_grid(model: nn.Module, data: Split, run: Run) -> Pruner:
    """INN (2-opt), resampled, its nodes tuned at each rate (`tune_grid`, GRID_STEPS steps)."""
    net = inn.convert(model, data.x_test[:2])
    loader = _batches(data, run.seed, GRID_BATCH)

    def prune(rate: float) -> nn.Module:
        if rate == 0:
            return net
        small = net.resample(1 - rate)
        small.tune_grid(loader, steps=GRID_STEPS)
        return small.eval()
    return prune


FIT_EPOCHS = 1.5  # the random-width training's epochs, per epoch of the discrete one
CALIBRATION_BATCHES = 20  # training batches (of 64) that calibrate the BatchNorms per rate
_fitted: dict = {}


def _fitted_net(data: Split, run: Run) -> inn.IntegralNet:
    """A fresh model converted in training mode (BatchNorms kept as splines) and trained from
    scratch by `inn.fit` for 1.5× the discrete model's epochs (each step trains the full
    width and a random one, 50–100 % per group; the discrete training's peak rate and
    one-cycle schedule, the weight splines' steps scaled to a discrete layer's). Trained once
    per job, shared by the two arms that resample it."""
    key = (run, id(data))
    if key not in _fitted:
        from .train import LR, Shuffled
        torch.manual_seed(run.seed)
        net = inn.convert(run.make().train(), data.x_test[:2], permute=False)
        inn.fit(net, Shuffled(data, run.seed), epochs=round(FIT_EPOCHS * run.epochs),
                widths=(0.5, 1.0), lr=LR, seed=run.seed)
        _fitted[key] = net.eval()
    return _fitted[key]


def random_widths(model: nn.Module, data: Split, run: Run) -> Pruner:
    """The net trained with random widths, resampled; evaluated with its BatchNorms'
    full-size statistics sampled at the nodes."""
    net = _fitted_net(data, run)
    return lambda rate: net if rate == 0 else net.resample(1 - rate)


def random_widths_calibrated(model: nn.Module, data: Split, run: Run) -> Pruner:
    """The same, with its BatchNorms' statistics measured at each size on CALIBRATION_BATCHES
    training batches (`calibrate`: no weight changes)."""
    from .train import Shuffled
    net = _fitted_net(data, run)
    batches = [b for b, _ in zip(Shuffled(data, run.seed + 1), range(CALIBRATION_BATCHES))]
    return lambda rate: net.resample(1 - rate).calibrate(batches)


ARMS: dict[str, tuple[str, Arm]] = {
    "l1": ("L1 (torch-pruning)", l1),
    "inn": ("INN, no permutation", _inn(permute=False)),
    "inn_2opt": ("INN, 2-opt permutation", _inn(permute=True)),
    "inn_grid": ("INN, 2-opt + tuned grid", tuned_grid),
    "inn_fit": ("INN trained with random widths", random_widths),
    "inn_fit_bn": ("INN, random widths + calibrated BN", random_widths_calibrated),
}


def _difference(a: nn.Module, b: nn.Module, data: Split) -> tuple[float, float]:
    """max |a(x) − b(x)| over the test split, and max |b(x)| (its scale: in float32 the
    difference grows with the logits)."""
    with torch.no_grad():
        pairs = [(a(x), b(x)) for x in data.x_test.split(500)]
    return (max((ya - yb).abs().max().item() for ya, yb in pairs),
            max(yb.abs().max().item() for _, yb in pairs))


def conversion_error(model: nn.Module, data: Split, permute: bool) -> tuple[float, float]:
    """max |Δlogits| between the model's conversion at full size and the model, and the
    model's max |logit|."""
    return _difference(inn.convert(model, data.x_test[:2], permute=permute), model, data)


def export_error(net: inn.IntegralNet, data: Split) -> tuple[float, float]:
    """max |Δlogits| between a resampled IntegralNet's export and the net, and the net's
    max |logit|."""
    return _difference(net.export(), net, data)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def timings(variants: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """The median wall time (ms) of one forward pass on `x` for each model, measured
    interleaved (one call of each per round, after a warm-up round) so that a machine's
    changing load falls on all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for i in range(repeats + 1):
            for name, m in variants.items():
                t = time.perf_counter()
                m(x)
                if i:
                    times[name].append(1e3 * (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}


def timing_variants(model: nn.Module, data: Split, rate: float) -> dict[str, nn.Module]:
    """What the timing compares at `rate`: the L1-pruned model as torch-pruning leaves it
    (BatchNorm unfolded), the same with its BatchNorms fused into the convs (torch.fx's
    `fuse`: the fair baseline, since an export has them folded), and the export of the
    INN (2-opt) resampled to the same widths."""
    pruned = l1(model, data)(rate)
    net = inn.convert(model, data.x_test[:2]).resample(1 - rate)
    return {"L1": pruned, "L1, BN fused": fuse(pruned), "INN export": net.export()}
