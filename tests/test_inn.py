"""itdsl.inn: converting a trained network into integral layers, resampling its channel groups,
exporting plain torch layers. The references are the original torch models and convolutions
with weights sampled by the test's own cubic-convolution code."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from util import keys_spline

from itdsl import inn
from itdsl.errors import InputError, UnsupportedError

D = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randomise_bn(model: nn.Module, seed: int = 1) -> None:
    g = _gen(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


class SmallResNet(nn.Module):
    """Conv-BN-ReLU stem on 1 input channel, a strided conv, a residual block, global pooling,
    a BatchNorm1d'd hidden linear layer and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 12, 5, stride=2, padding=2)
        self.bn1 = nn.BatchNorm2d(12)
        self.a = nn.Conv2d(12, 12, 3, padding=1)
        self.bna = nn.BatchNorm2d(12)
        self.b = nn.Conv2d(12, 12, 1)
        self.fc1 = nn.Linear(12, 16)
        self.bnf = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.down(x)))
        x = x + self.b(F.relu(self.bna(self.a(x))))
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc2(F.relu(self.bnf(self.fc1(x))))


def _resnet(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    m = SmallResNet()
    _randomise_bn(m)
    return m.eval().to(dtype)


def test_conversion_is_exact_at_full_size():
    model = _resnet()
    x = torch.randn(5, 1, 11, 9, generator=_gen())
    net = inn.convert(model, x)
    with torch.no_grad():
        assert (net(x) - model(x)).abs().max() <= 1e-5
    # another input size than the example's (the layers take their sizes from the call)
    x2 = torch.randn(2, 1, 16, 16, generator=_gen(1))
    with torch.no_grad():
        assert (net(x2) - model(x2)).abs().max() <= 1e-5


def test_groups_follow_the_graph():
    """stem's channels are one group, down's another that the residual add merges with b's;
    the input channel and the classes are not groups; fc1's features are."""
    net = inn.convert(_resnet(), torch.randn(1, 1, 8, 8))
    assert net.groups == {"stem": 8, "down": 12, "a": 12, "fc1": 16}
    layers = net.layers()
    assert layers["b"].out_group == "down" and layers["a"].out_group == "a"
    assert layers["stem"].in_group is None and layers["fc2"].out_group is None


def keys(C: torch.Tensor, m: int) -> torch.Tensor:
    """The cubic-convolution spline of coefficients C [..., n] at m equispaced points."""
    return keys_spline(C, torch.linspace(0, 1, m, dtype=C.dtype))


def trapezoid(n: int) -> torch.Tensor:
    q = torch.full((n,), 1 / (n - 1), dtype=D)
    q[0] = q[-1] = 0.5 / (n - 1)
    return q


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 10, 3, padding=1)
        self.c2 = nn.Conv2d(10, 6, 3, stride=2, padding=1)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x)))


def test_a_resampled_group_is_the_weight_function_sampled_there():
    """Keeping 6 of c1's 10 channels: c1's weights (divided by nothing: its input is the
    network's, discrete) sampled at 6 points of its output axis; c2's weights, divided by the
    trapezoid weights on 10 points at conversion, sampled at 6 points of its input axis and
    multiplied by the trapezoid weights on 6."""
    torch.manual_seed(0)
    model = TwoConvs().double().eval()
    x = torch.randn(2, 3, 9, 8, generator=_gen(), dtype=D)
    net = inn.convert(model, x, permute=False)
    assert net.groups == {"c1": 10}
    small = net.resample({"c1": 6})
    w1, b1 = model.c1.weight.detach(), model.c1.bias.detach()
    w2, b2 = model.c2.weight.detach(), model.c2.bias.detach()
    s1 = keys(w1.permute(1, 2, 3, 0), 6).permute(3, 0, 1, 2)  # [6, 3, 3, 3]
    sb1 = keys(b1, 6)
    c2 = w2 / trapezoid(10)[None, :, None, None]
    s2 = keys(c2.permute(0, 2, 3, 1), 6).permute(0, 3, 1, 2) * trapezoid(6)[None, :, None, None]
    want = F.conv2d(torch.tanh(F.conv2d(x, s1, sb1, padding=1)), s2, b2, stride=2, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(small(x), want, rtol=1e-10, atol=1e-12)
        plain = small.export()
        torch.testing.assert_close(plain(x), want, rtol=1e-10, atol=1e-12)
    assert isinstance(plain.c1, nn.Conv2d) and plain.c1.weight.shape == (6, 3, 3, 3)
    assert net.sizes == {"c1": 10}  # resample made a copy


def test_resample_ratio_and_export():
    model = _resnet()
    x = torch.randn(3, 1, 12, 12, generator=_gen())
    net = inn.convert(model, x)
    small = net.resample(0.7)
    assert small.sizes == {"stem": 6, "down": 8, "a": 8, "fc1": 11}  # round(0.7 n)
    assert net.resample(0.01).sizes == {g: 2 for g in net.groups}  # at least 2
    with torch.no_grad():
        y = small(x)
        assert y.shape == (3, 10)
        plain = small.export()
        assert (plain(x) - y).abs().max() <= 1e-5
    shapes = {n: tuple(m.weight.shape) for n, m in plain.named_children()
              if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert shapes == {"stem": (6, 1, 3, 3), "down": (8, 6, 5, 5), "a": (8, 8, 3, 3),
                      "b": (8, 8, 1, 1), "fc1": (11, 8), "fc2": (10, 11)}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())  # folded


def test_an_mlp_converts_and_resamples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(),
                          nn.Linear(32, 10)).eval()
    x = torch.randn(7, 64, generator=_gen())
    net = inn.convert(model, x)
    assert net.groups == {"0": 32, "2": 32}
    with torch.no_grad():
        assert (net(x) - model(x)).abs().max() <= 1e-5
        small = net.resample({"0": 20})
        assert (small.export()(x) - small(x)).abs().max() <= 1e-5


def test_resample_rejects_bad_sizes():
    net = inn.convert(_resnet(), torch.randn(1, 1, 8, 8))
    with pytest.raises(InputError, match="no channel group named `stm`"):
        net.resample({"stm": 4})
    with pytest.raises(InputError, match=r"group `stem` has 8 channels; a size in \[2, 8\]"):
        net.resample({"stem": 9})
    with pytest.raises(InputError, match=r"ratio is in \(0, 1\]"):
        net.resample(1.5)


class _Wrap(nn.Module):
    def __init__(self, layer, tail=None):
        super().__init__()
        self.layer, self.tail = layer, tail

    def forward(self, x):
        y = self.layer(x)
        return y if self.tail is None else self.tail(y)


class _Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.c(x), x], 1)


class _SpatialFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.c(x).flatten(1))


@pytest.mark.parametrize("model,message", [
    (_Wrap(nn.Conv2d(2, 4, 2)), r"`layer` \(Conv2d.*kernel_size=\(2, 2\) \(odd sizes only"),
    (_Wrap(nn.Conv2d(2, 4, 3, dilation=2)), r"dilation=\(2, 2\)"),
    (_Wrap(nn.Conv2d(2, 4, 3, groups=2)), r"groups=2"),
    (_Wrap(nn.Conv2d(2, 4, 3, stride=(1, 2))), r"stride=\(1, 2\)"),
    (_Wrap(nn.Conv2d(2, 4, 3), nn.Upsample(scale_factor=2)),
     r"`tail` \(Upsample.*not a layer `inn.convert` supports"),
    (_Cat(), r"`cat` \(graph node `cat`\) is not an operation"),
    (_SpatialFlatten(), r"flattens 6×6 spatial maps"),
])
def test_unsupported_layers_name_the_module(model, message):
    with pytest.raises(UnsupportedError, match=message):
        inn.convert(model.eval(), torch.randn(1, 2, 6, 6))


def test_a_model_in_training_mode_keeps_its_batchnorms():
    """Converted in training mode, the BatchNorms stay (splines over their group's axis): at
    full size the net is the model, in training mode (batch statistics, running statistics
    updated alike) and in eval mode; resampled, export gives plain BatchNorms sampled there."""
    model = _resnet().train()
    x = torch.randn(6, 1, 10, 10, generator=_gen())
    net = inn.convert(model, x)
    assert sum(isinstance(m, inn.layers.IntegralBatchNorm) for m in net.modules()) == 4
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), rtol=1e-5, atol=1e-5)  # both update stats
        net.eval()
        model.eval()
        torch.testing.assert_close(net(x), model(x), rtol=1e-5, atol=1e-5)  # the updated stats
        small = net.resample(0.6)
        y = small(x)
        plain = small.export()
        assert sum(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) for m in plain.modules()) == 4
        assert (plain(x) - y).abs().max() <= 1e-5


def test_the_converted_net_trains():
    """The integral layers' splines are parameters: one SGD step changes the outputs, and
    gradients reach every layer."""
    net = inn.convert(_resnet(), torch.randn(1, 1, 8, 8))
    x = torch.randn(4, 1, 8, 8, generator=_gen())
    loss = net(x).square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_a_deep_copy_of_an_operator_has_its_own_params():
    net = inn.convert(_resnet(), torch.randn(1, 1, 8, 8))
    twin = copy.deepcopy(net)
    x = torch.randn(2, 1, 8, 8, generator=_gen())
    with torch.no_grad():
        torch.testing.assert_close(twin(x), net(x))
        for p in twin.parameters():
            p.mul_(0.5)
        assert not torch.allclose(twin(x), net(x))


def test_permuting_the_channels_keeps_the_outputs_and_smooths_the_weights():
    """A hidden layer whose weights are smooth in the channel index, shuffled: converted with
    the channel permutation, the net resampled at half its width stays close to the full
    net; converted as it is, it does not. At full size both compute the model exactly."""
    g = _gen(5)
    n, d = 48, 6
    t = torch.linspace(0, 1, n, dtype=D)
    freq = torch.rand(d, generator=g, dtype=D) * 3
    phase = torch.rand(d, generator=g, dtype=D) * 6
    w1 = torch.sin(freq[None] * 3 * t[:, None] + phase[None])  # [n, d], smooth in t
    w2 = torch.cos(2 * t[None, :] + torch.arange(3, dtype=D)[:, None])  # [3, n]
    shuffle = torch.randperm(n, generator=g)
    model = nn.Sequential(nn.Linear(d, n), nn.Tanh(), nn.Linear(n, 3)).double().eval()
    with torch.no_grad():
        model[0].weight.copy_(w1[shuffle])
        model[0].bias.zero_()
        model[2].weight.copy_(w2[:, shuffle])
        model[2].bias.zero_()
    x = torch.randn(64, d, generator=g, dtype=D)
    with torch.no_grad():
        want = model(x)
        errors = {}
        for permute in (True, False):
            net = inn.convert(model, x, permute=permute)
            torch.testing.assert_close(net(x), want, rtol=1e-10, atol=1e-10)
            half = net.resample(0.5)(x)
            errors[permute] = ((half - want).norm() / want.norm()).item()
    assert errors[True] < 0.05 < errors[False]


def test_the_grid_gradient_is_not_zero_at_the_uniform_start():
    """The nodes start uniform (the resampled net as it is) and their gradient there is not
    zero: training can move them (TorchIntegral's trainable grid starts where its gradient
    is exactly zero)."""
    model = _resnet()
    x = torch.randn(16, 1, 10, 10, generator=_gen())
    small = inn.convert(model, x).resample(0.5)
    with torch.no_grad():
        before = small(x)
    small.tune_grid([x], steps=1, lr=0.0)  # the nodes made, nothing moved
    with torch.no_grad():
        torch.testing.assert_close(small(x), before, rtol=1e-5, atol=1e-5)  # uniform nodes
    loss = (small(x) - model(x).detach()).square().mean()
    grads = torch.autograd.grad(loss, list(small.grid.gaps.values()))
    assert set(small.grid.gaps) == {"stem", "down", "a", "fc1"}
    assert all(g.abs().max() > 1e-6 for g in grads)


def test_tune_grid_brings_the_resampled_net_closer_and_exports_it():
    model = _resnet()
    x = torch.randn(48, 1, 10, 10, generator=_gen())
    small = inn.convert(model, x).resample(0.5)
    with torch.no_grad():
        want = model(x)
        before = (small(x) - want).square().mean()
    losses = small.tune_grid([x[:24], x[24:]], steps=30)
    assert len(losses) == 30
    with torch.no_grad():
        after = (small(x) - want).square().mean()
        assert after < 0.5 * before
        nodes = small.nodes
        assert all((torch.diff(x) > 0).all() and x[0] == 0 and x[-1] == 1
                   for g, x in nodes.items() if g in small.grid.gaps)  # sorted, distinct
        assert len(nodes["stem"]) == 4 and nodes["stem"][1] != 1 / 3  # moved
        plain = small.export()
        assert (plain(x) - small(x)).abs().max() <= 1e-5
    assert all(p.requires_grad for p in small.parameters())  # unfrozen again
    with pytest.raises(InputError, match="every group is at full size"):
        inn.convert(model, x).tune_grid([x], steps=1)


def test_node_weights_are_the_trapezoid_rule():
    x = torch.tensor([0.0, 0.1, 0.5, 0.6, 1.0], dtype=D)
    want = torch.tensor([0.05, 0.25, 0.25, 0.25, 0.2], dtype=D)
    from itdsl.inn.layers import node_weights
    torch.testing.assert_close(node_weights(x), want)
    f = torch.sin(3 * x)  # the rule integrates a linear interpolant exactly
    exact = sum((x[i + 1] - x[i]) * (f[i] + f[i + 1]) / 2 for i in range(4))
    torch.testing.assert_close((node_weights(x) * f).sum(), exact)


def test_fit_trains_every_width():
    """inn.fit on a small synthetic task: the loss falls, and afterwards the net at 60 % of
    its channels classifies about as well as at full width."""
    g = _gen(9)
    centers = torch.randn(3, 1, 6, 6, generator=g) * 2
    y = torch.randint(0, 3, (96,), generator=g)
    x = centers[y] + 0.5 * torch.randn(96, 1, 6, 6, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    net = inn.convert(model.train(), x[:4])
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]
    losses = inn.fit(net, loader, epochs=16, lr=0.03)
    assert len(losses) == 48 and sum(losses[-3:]) < 0.5 * sum(losses[:3])
    assert net.sizes == net.groups  # back at full width
    net.eval()
    with torch.no_grad():
        full = (net(x).argmax(1) == y).float().mean()
        small = (net.resample(0.6)(x).argmax(1) == y).float().mean()
    assert full > 0.9 and small > full - 0.1
    with pytest.raises(InputError, match="widths are fractions"):
        inn.fit(net, loader, widths=(0.8, 0.5))
    # the one-cycle schedule (the default) over epochs × len(loader) steps, ending near 0;
    # None keeps the rate, as any loader (a generator) allows
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(2):  # (a second call peaks at the same rate; momentum untouched)
        inn.fit(net, loader, epochs=2, optimizer=opt)
        assert opt.param_groups[0]["lr"] < 1e-5 and opt.param_groups[0]["momentum"] == 0
        assert opt.param_groups[0]["max_lr"] == 0.01
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    inn.fit(net, (b for b in loader), optimizer=opt, scheduler=None)
    assert opt.param_groups[0]["lr"] == 0.01
    with pytest.raises(InputError, match="len()"):
        inn.fit(net, (b for b in loader))
    with pytest.raises(InputError, match="scheduler is"):
        inn.fit(net, loader, scheduler="cosine")


def test_groups_of_nested_modules_tune_and_copy():
    """Group names are module paths ("0.0"), which a param's name cannot be: the nodes are
    still trained, copied and dropped by resample."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU()),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    x = torch.randn(8, 1, 5, 5, generator=_gen())
    small = inn.convert(model, x).resample(0.5)
    assert small.groups == {"0.0": 6}
    small.tune_grid([x], steps=3)
    assert set(small.grid.gaps) == {"0.0"} and len(list(small.gaps.parameters())) == 1
    twin = copy.deepcopy(small)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), small(x))
    assert not small.resample(0.5).grid.gaps


def test_fit_steps_the_weight_splines_as_a_discrete_layer():
    """A weight spline's coefficients are the weights over h = 1/(n − 1): its learning rate
    is lr · (n − 1) where its input axis is a group, so that a step moves the sampled weights
    as much as the discrete layer's (the classifier's bias, BatchNorms: lr)."""
    from itdsl.inn.train import param_groups
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 3))
    net = inn.convert(model.train(), torch.randn(2, 1, 5, 5))
    groups = param_groups(net, 0.01)
    layers = net.layers()
    scaled = {id(g["params"][0]): g["lr"] for g in groups[:-1]}
    assert scaled == {id(layers["3"].op.W): pytest.approx(0.07),
                      id(layers["7"].op.W): pytest.approx(0.05)}
    assert groups[-1]["lr"] == 0.01 and id(layers["0"].op.W) in map(id, groups[-1]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


class _Reshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        y = nn.functional.adaptive_avg_pool2d(self.c(x), 1)
        return self.fc(y.view(-1, 2))  # splits the channels: not a flatten


def test_a_reshape_that_splits_the_channels_is_refused():
    with pytest.raises(UnsupportedError, match=r"reshapes \[1, 4, 1, 1\] into \[2, 2\]"):
        inn.convert(_Reshape().eval(), torch.randn(1, 2, 6, 6))


def _torch_calibrated(plain: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """torch's own BatchNorm calibration of a plain model: statistics reset, momentum=None
    (a cumulative average), one training-mode pass over the batches, then eval."""
    plain = copy.deepcopy(plain)
    for m in plain.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.reset_running_stats()
            m.momentum = None
    plain.train()
    with torch.no_grad():
        for x in batches:
            plain(x)
    return plain.eval()


@pytest.mark.parametrize("ratio", [1.0, 0.6])
def test_calibrate_measures_the_batchnorm_statistics_at_the_current_sizes(ratio):
    """`calibrate` gives a resampled net the statistics of its own channels: the outputs of
    torch's BatchNorm calibration (reset, momentum=None, a training-mode pass) of the same
    net exported to plain layers, at full size and resampled; export carries them, a
    state_dict round trip too, and evaluation at other sizes (or after tune_grid) goes back
    to the sampled full-size statistics."""
    model = _resnet().train()
    x = torch.randn(6, 1, 10, 10, generator=_gen())
    net = inn.convert(model, x).eval()
    small = net.resample(ratio)
    g = _gen(4)
    batches = [torch.randn(8, 1, 10, 10, generator=g) * 2 + 1 for _ in range(3)]
    want = _torch_calibrated(small.export(), batches)
    before = small(x)
    assert small.calibrate([(b, None) for b in batches] + [(x, None)], batches=3) is small
    assert not small.training
    with torch.no_grad():
        got = small(x)
        torch.testing.assert_close(got, want(x), rtol=1e-4, atol=1e-4)
        assert (got - before).abs().max() > 1e-2  # (the statistics did change)
        torch.testing.assert_close(small.export()(x), got, rtol=1e-5, atol=1e-5)
        again = net.resample(ratio)
        again.load_state_dict(small.state_dict())
        torch.testing.assert_close(again(x), got, rtol=0, atol=0)
        other = small.resample(0.5 if ratio == 1.0 else 1.0)  # other sizes: sampled again
        torch.testing.assert_close(other(x), net.resample(0.5 if ratio == 1.0 else 1.0)(x))
        fresh = net.resample(ratio)
        fresh.load_state_dict(net.resample(ratio).state_dict())  # nothing calibrated
        torch.testing.assert_close(fresh(x), before)
    if ratio < 1:
        small.tune_grid([x], steps=1)
        assert all(m.calibrated_for is None for m in small.modules()
                   if isinstance(m, inn.layers.IntegralBatchNorm))


def test_calibrate_errors():
    net = inn.convert(_resnet(), torch.randn(1, 1, 8, 8))  # eval mode: BatchNorms fused
    with pytest.raises(InputError, match="no BatchNorm") as e:
        net.calibrate([torch.randn(2, 1, 8, 8)])
    assert "training mode" in e.value.render()
    net = inn.convert(_resnet().train(), torch.randn(2, 1, 8, 8))
    with pytest.raises(InputError, match="no batches"):
        net.calibrate([])
    with pytest.raises(InputError, match="positive number"):
        net.calibrate([torch.randn(2, 1, 8, 8)], batches=0)


def test_tune_grid_of_a_net_with_batchnorms():
    """A net converted in training mode keeps BatchNorms whose statistics are sampled at the
    nodes `tune_grid` trains: their gradient reaches the nodes (F.batch_norm takes none with
    respect to its running statistics, so such a call is written out), and at the uniform
    start the outputs are those of the untuned net."""
    x = torch.randn(6, 1, 10, 10, generator=_gen())
    small = inn.convert(_resnet().train(), x).eval().resample(0.6)
    with torch.no_grad():
        before = small(x)
    small.tune_grid([x], steps=1, lr=0.0)
    with torch.no_grad():
        torch.testing.assert_close(small(x), before, rtol=1e-5, atol=1e-5)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in small.gaps.values())


class _BNMLP(nn.Module):
    """Linear-BN-ReLU twice, and a BatchNorm on the outputs (a discrete axis)."""

    def __init__(self, momentum=0.1):
        super().__init__()
        self.a, self.bna = nn.Linear(6, 16), nn.BatchNorm1d(16, momentum=momentum)
        self.b, self.bnb = nn.Linear(16, 10), nn.BatchNorm1d(10, momentum=momentum)
        self.c, self.bnc = nn.Linear(10, 3), nn.BatchNorm1d(3, momentum=momentum)

    def forward(self, x):
        x = F.relu(self.bna(self.a(x)))
        return self.bnc(self.c(F.relu(self.bnb(self.b(x)))))


def _bn_mlp(momentum=0.1) -> nn.Module:
    torch.manual_seed(2)
    m = _BNMLP(momentum)
    _randomise_bn(m)
    return m.train()


def test_calibration_holds_for_the_sizes_of_every_group_and_every_batchnorm():
    """A BatchNorm's input depends on every group before it: statistics measured at one
    set of sizes are not used at another that differs only in an earlier group; a
    BatchNorm on a discrete axis (the outputs) is calibrated too; each equals torch's
    calibration of the exported net."""
    g = _gen(5)
    x = torch.randn(7, 6, generator=g)
    batches = [torch.randn(16, 6, generator=g) for _ in range(3)]
    net = inn.convert(_bn_mlp(), x).eval()
    assert set(net.groups) == {"a", "b"}
    for sizes in ({"a": 8, "b": 5}, {"a": 16, "b": 5}, {"a": 16, "b": 10}):
        small = net.resample(sizes).calibrate(batches)
        with torch.no_grad():
            torch.testing.assert_close(small(x), _torch_calibrated(small.export(), batches)(x),
                                       rtol=1e-4, atol=1e-4)
    moved = net.resample({"a": 8, "b": 5}).calibrate(batches).resample({"a": 16, "b": 5})
    with torch.no_grad():
        torch.testing.assert_close(moved(x), net.resample({"a": 16, "b": 5})(x))


def test_fit_drops_calibrations_and_keeps_the_sizes():
    g = _gen(6)
    data = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
            for _ in range(3)]
    small = inn.convert(_bn_mlp(), data[0][0]).resample(0.5)
    sizes = small.sizes
    small.calibrate(data)
    inn.fit(small, data, epochs=1, lr=1e-3)
    assert small.sizes == sizes
    assert all(m.calibrated_for is None for m in small.modules()
               if isinstance(m, inn.layers.IntegralBatchNorm))


def test_batchnorm_momentum_none_is_a_cumulative_average_as_torchs():
    g = _gen(7)
    xs = [torch.randn(16, 6, generator=g) for _ in range(3)]
    model = _bn_mlp(momentum=None)
    net = inn.convert(copy.deepcopy(model), xs[0])
    with torch.no_grad():
        for x in xs:
            model(x), net(x)
        model.eval(), net.eval()
        torch.testing.assert_close(net(xs[0]), model(xs[0]), rtol=1e-5, atol=1e-5)


def test_calibrated_state_dicts_across_dtypes_and_partial_ones():
    g = _gen(8)
    x = torch.randn(7, 6, generator=g)
    net = inn.convert(_bn_mlp(), x).eval()
    small = net.resample(0.5).calibrate([torch.randn(16, 6, generator=g) for _ in range(2)])
    state = small.state_dict()
    wide = net.resample(0.5).double()
    wide.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(wide(x.double()).float(), small(x), rtol=1e-5, atol=1e-5)
    del state[next(k for k in state if k.endswith("calibrated_var"))]
    with pytest.raises(RuntimeError, match="calibrated_var"):
        net.resample(0.5).load_state_dict(state)


def test_inputs_of_the_wrong_shape_and_unsupported_batchnorms_are_clear_errors():
    net = inn.convert(_resnet(), torch.randn(1, 1, 8, 8))
    with pytest.raises(InputError, match="1 input channels, got 2"):
        net(torch.randn(2, 2, 8, 8))
    mlp = inn.convert(_bn_mlp().eval(), torch.randn(2, 6))
    with pytest.raises(InputError, match="6 input features, got 9"):
        mlp(torch.randn(2, 9))
    model = _bn_mlp()
    model.bna = nn.BatchNorm1d(16, track_running_stats=False)
    with pytest.raises(UnsupportedError, match="track_running_stats"):
        inn.convert(model, torch.randn(4, 6))
    with pytest.raises(InputError, match="got dict"):
        inn.convert(_bn_mlp(), torch.randn(4, 6)).calibrate([{"x": torch.randn(4, 6)}])
    with pytest.raises(InputError, match="positive number"):
        inn.convert(_bn_mlp(), torch.randn(4, 6)).calibrate([torch.randn(4, 6)], batches=True)
