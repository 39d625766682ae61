"""`inn.convert`: a trained network of Conv2d / Linear / BatchNorm / activations / pooling as an
Integral Neural Network — the same graph (torch.fx) with each Conv2d and Linear an integral
layer (`layers.py`) — and its channel groups.

A group is a set of channel axes that must share one grid, found by union-find over the
graph's tensors: a layer's output channels start a group, activations, pooling, BatchNorm and
flattening after a global pooling carry it, a residual add merges the groups it adds. The
network's input channels and its output are not groups (they stay discrete), nor is a group
that reaches them through an add.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import InputError, UnsupportedError
from .layers import (
    Grid,
    IntegralBatchNorm,
    IntegralConv2d,
    IntegralLayer,
    IntegralLinear,
    count,
)
from .permute import permutation

# modules and functions that keep the channel axis (dim 1 of images, the last of vectors)
_SAME_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Sigmoid, nn.Tanh,
                 nn.Hardswish, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d,
                 nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Softmax,
                 nn.LogSoftmax)
_SAME_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, torch.sigmoid,
                   torch.tanh, torch.relu, F.hardswish, F.dropout, F.max_pool2d, F.avg_pool2d,
                   F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.softmax, F.log_softmax}
_SAME_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "softmax", "log_softmax"}
_ADD = {operator.add, operator.iadd, torch.add}
_FLATTEN = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_INPUT, _OUTPUT = "<input>", "<output>"


class _Groups:
    """Union-find over channel axes (one id per tensor of the graph that has one)."""

    def __init__(self):
        self.parent: dict[str, str] = {}

    def add(self, a: str) -> str:
        self.parent.setdefault(a, a)
        return a

    def find(self, a: str) -> str:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the fixed ends win, else the earlier group (its name is the first layer's)
            keep = ra if ra in (_INPUT, _OUTPUT) or rb not in (_INPUT, _OUTPUT) else rb
            other = rb if keep == ra else ra
            self.parent[other] = keep


def _inputs(batch, what: str) -> torch.Tensor:
    """The net's input of a loader's batch: `x`, or the first of `(x, ...)`."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{what} reads batches `x` or `(x, ...)` with x a tensor, got "
                         f"{type(batch).__name__}" + (f" holding {type(x).__name__}"
                                                       if x is not batch else ""))
    return x


def _where(node: fx.Node, gm: fx.GraphModule) -> str:
    """How an error names a node: its module and its place in the graph."""
    if node.op == "call_module":
        return f"`{node.target}` ({type(gm.get_submodule(node.target)).__name__}, graph node " \
               f"`{node.name}`)"
    what = getattr(node.target, "__name__", str(node.target))
    return f"`{what}` (graph node `{node.name}`)"


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return None if meta is None or not hasattr(meta, "shape") else tuple(meta.shape)


class IntegralNet(nn.Module):
    """A converted network: `groups` {name: channels at full size}, `sizes` {name: channels
    now}; `resample` gives a copy at other sizes, `export` a plain torch model."""

    def __init__(self, gm: fx.GraphModule, groups: dict[str, int], grid: Grid):
        super().__init__()
        self.graph_module = gm
        self.groups = dict(groups)
        self.grid = grid  # shared with every integral layer (changed in place only)
        # the trained nodes' gaps (`grid.gaps`), registered as params (a group's name may
        # hold dots, which a param's may not)
        self.gaps = nn.ParameterDict()

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.grid.sizes)

    @property
    def nodes(self) -> dict[str, torch.Tensor]:
        """The nodes of each group's axis, sorted positions in [0, 1] (uniform until
        `tune_grid` trains them)."""
        like = next(self.parameters())
        return {g: self.grid.nodes(g, n, like).detach() for g, n in self.groups.items()}

    def forward(self, *args, **kwargs):
        return self.graph_module(*args, **kwargs)

    def layers(self) -> dict[str, IntegralLayer]:
        return {n: m for n, m in self.graph_module.named_modules()
                if isinstance(m, IntegralLayer)}

    def resample(self, ratio: float | dict[str, int]) -> IntegralNet:
        """A copy that keeps `ratio` of every group's channels (round(ratio · n), at least
        2), or the sizes given by name; the weight functions are sampled there, no training."""
        if isinstance(ratio, dict):
            unknown = [k for k in ratio if k not in self.groups]
            if unknown:
                raise InputError(f"no channel group named `{unknown[0]}`; the groups are "
                                 + ", ".join(f"`{g}`" for g in self.groups))
            bad = [(k, v) for k, v in ratio.items()
                   if not isinstance(v, int) or not 2 <= v <= self.groups[k]]
            if bad:
                k, v = bad[0]
                raise InputError(f"group `{k}` has {self.groups[k]} channels; a size in "
                                 f"[2, {self.groups[k]}] is needed, got {v!r}")
            sizes = {**self.groups, **ratio}
        else:
            sizes = {g: count(ratio, n) for g, n in self.groups.items()}
        new = copy.deepcopy(self)
        new.grid.sizes.update(sizes)
        new.grid.gaps.clear()  # (nodes trained for other sizes do not carry over)
        for key in list(new.gaps):
            del new.gaps[key]
        return new

    def tune_grid(self, loader, steps: int = 200, lr: float = 0.05) -> list[float]:
        """Learn the nodes of every resampled group's axis (sorted positions in [0, 1] with
        their trapezoid weights; nothing else changes) so that this net's outputs match the
        full-size net's on `loader`'s inputs (batches `x` or `(x, ...)`), by Adam on the mean
        squared difference: distillation, as TorchIntegral trains its grid. Starts from the
        uniform nodes, where the gradient is not zero. Returns the loss per step."""
        groups = [g for g, n in self.groups.items() if self.grid.sizes[g] < n]
        if not groups:
            raise InputError("every group is at full size, where the uniform grid is exact",
                             hint="resample first: `net.resample(0.5).tune_grid(loader)`")
        teacher = self.resample({g: n for g, n in self.groups.items()}).eval()
        self._drop_calibrations()  # (measured at the nodes this moves)
        was = self.training
        self.eval()  # (the objective is the evaluated net's: BatchNorms by their statistics)
        like = next(self.parameters())
        for g in groups:
            if g not in self.grid.gaps:
                gap = nn.Parameter(torch.zeros(self.grid.sizes[g] - 1, dtype=like.dtype,
                                               device=like.device))
                self.grid.gaps[g] = self.gaps[g.replace(".", "/")] = gap
        trained = [self.grid.gaps[g] for g in groups]
        frozen = [p for p in self.parameters() if p.requires_grad and
                  all(p is not t for t in trained)]
        for p in frozen:
            p.requires_grad_(False)
        opt = torch.optim.Adam(trained, lr=lr)
        losses: list[float] = []
        try:
            while len(losses) < steps:
                for batch in loader:
                    x = _inputs(batch, "tune_grid")
                    with torch.no_grad():
                        want = teacher(x)
                    loss = torch.nn.functional.mse_loss(self(x), want)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
                    if len(losses) >= steps:
                        break
        finally:
            for p in frozen:
                p.requires_grad_(True)
            self.train(was)
        return losses

    def _batch_norms(self) -> list[IntegralBatchNorm]:
        return [m for m in self.modules() if isinstance(m, IntegralBatchNorm)]

    def _drop_calibrations(self) -> None:
        """Forget what `calibrate` measured (the nodes or the weights change)."""
        for bn in self._batch_norms():
            bn.clear_calibration()

    def calibrate(self, loader, batches: int | None = None) -> IntegralNet:
        """Measure every BatchNorm's statistics at the current sizes and nodes from
        `loader`'s inputs (batches `x` or `(x, ...)`; the first `batches` of them, or all):
        the mean of the batches' means and variances, each layer normalising by its batch's
        statistics as in training — what torch's BatchNorm accumulates with momentum=None,
        the calibration of slimmable networks. No weight changes. Evaluation at these sizes
        then uses them (`export` too) instead of the full-size statistics sampled at the
        nodes, which a resampled net's channels no longer have; `tune_grid` and `inn.fit`
        drop them.
        Returns the net. Only a net with BatchNorms (converted in training mode) has any."""
        bns = self._batch_norms()
        if not bns:
            raise InputError("this net has no BatchNorm to calibrate: `inn.convert` of a model "
                             "in eval mode fuses each BatchNorm into its conv",
                             hint="convert the model in training mode "
                                  "(`inn.convert(model.train(), x)`) to keep them")
        if batches is not None:
            if isinstance(batches, bool) or not hasattr(batches, "__index__") \
                    or operator.index(batches) < 1:
                raise InputError(f"batches is a positive number of batches or None, got "
                                 f"{batches!r}")
            batches = operator.index(batches)
        was = self.training
        for bn in bns:
            bn._collect = []
        try:
            self.eval()
            with torch.no_grad():
                for i, batch in enumerate(loader):
                    if batches is not None and i >= batches:
                        break
                    self(_inputs(batch, "calibrate"))
            collected = [bn._collect for bn in bns]
        finally:
            for bn in bns:
                bn._collect = None
            self.train(was)
        if not all(collected):
            raise InputError("the loader gave no batches to calibrate on")
        for bn, stats in zip(bns, collected):
            bn.calibrated(stats)
        return self

    def export(self) -> fx.GraphModule:
        """A plain torch model at the current sizes: each integral layer an nn.Conv2d or
        nn.Linear holding its sampled weights (the same outputs, the library's speed)."""
        gm = copy.deepcopy(self.graph_module)
        for name, layer in list(gm.named_modules()):
            if isinstance(layer, IntegralLayer):
                n_in = layer.n_in if layer.in_group is None else self.grid.sizes[layer.in_group]
                _set_module(gm, name, layer.export(n_in))
            elif isinstance(layer, IntegralBatchNorm):
                _set_module(gm, name, layer.export(layer.dims))
        gm.recompile()
        return gm


def _set_module(gm: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def convert(model: nn.Module, example_input: torch.Tensor, permute: bool = True) -> IntegralNet:
    """`model` (Conv2d, Linear, BatchNorm2d/1d, activations, pooling, residual adds, flatten
    after a global pooling) as an IntegralNet computing the same outputs at full size. In
    eval mode a BatchNorm that is a conv's (or linear's) only user is folded into it. With
    `permute`, each group's channels are first reordered so that neighbours are alike (a
    short path through them, `permute.py`): the outputs are the same, and the weight
    functions smooth enough to resample."""
    train = model.training
    try:
        gm = fx.symbolic_trace(copy.deepcopy(model))
    except Exception as e:  # torch.fx's own message says what it could not trace
        raise UnsupportedError(f"torch.fx cannot trace the model: {e}",
                               hint="convert a model whose forward has no data-dependent "
                                    "control flow") from None
    gm.eval()  # (the example's pass must not move a BatchNorm's running statistics)
    ShapeProp(gm).propagate(example_input)
    gm.train(train)
    uf = _Groups()
    uf.add(_INPUT)
    uf.add(_OUTPUT)
    chan: dict[fx.Node, str | None] = {}  # the channel axis's group of each tensor
    layer_of: dict[fx.Node, tuple[str, nn.Module, str | None]] = {}  # node -> (name, mod, in)
    folded: dict[fx.Node, fx.Node] = {}  # a BatchNorm node -> the layer node it folds into
    norms: list[fx.Node] = []  # the BatchNorms that stay (a net in training mode)

    def need(node: fx.Node, arg) -> str:
        if not isinstance(arg, fx.Node) or chan.get(arg) is None:
            raise UnsupportedError(f"{_where(node, gm)} reads a value without a channel axis "
                                   "itdsl can follow")
        return chan[arg]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            chan[node] = _INPUT
        elif node.op == "get_attr":
            raise UnsupportedError(f"{_where(node, gm)} reads a tensor attribute of the model; "
                                   "only layers' own weights can be converted")
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                if isinstance(mod, nn.Conv2d):
                    _check_conv(mod, node, gm)
                g = uf.add(node.name)
                layer_of[node] = (node.target, mod, need(node, node.args[0]))
                chan[node] = g
            elif isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
                src = node.args[0]
                chan[node] = need(node, src)
                if not mod.track_running_stats:
                    raise UnsupportedError(
                        f"{_where(node, gm)} keeps no running statistics "
                        "(track_running_stats=False): nothing to fold, resample or evaluate "
                        "with", hint="use track_running_stats=True")
                if train:
                    norms.append(node)
                elif src in layer_of and len(src.users) == 1:
                    folded[node] = src
                else:
                    raise UnsupportedError(
                        f"{_where(node, gm)} does not follow a Conv2d or Linear that it is the "
                        "only user of, so it cannot be folded into it",
                        hint="convert the model in training mode (`model.train()`): its "
                             "BatchNorms then stay, as splines over their group's axis")
            elif isinstance(mod, _SAME_MODULES):
                chan[node] = need(node, node.args[0])
            elif isinstance(mod, nn.Flatten):
                chan[node] = _flatten(node, gm, need)
            else:
                raise UnsupportedError(f"{_where(node, gm)} is not a layer `inn.convert` "
                                       "supports",
                                       hint="supported: Conv2d, Linear, BatchNorm, "
                                            "activations, pooling, residual adds, flatten "
                                            "after a global pooling")
        elif node.op in ("call_function", "call_method"):
            t = node.target
            if t in _ADD:
                tensors = [a for a in node.args if isinstance(a, fx.Node)]
                groups = [need(node, a) for a in tensors]
                for g in groups[1:]:
                    uf.union(groups[0], g)
                chan[node] = groups[0]
            elif t in _SAME_FUNCTIONS or (node.op == "call_method" and t in _SAME_METHODS):
                chan[node] = need(node, node.args[0])
            elif t in _FLATTEN or (node.op == "call_method" and t in _FLATTEN_METHODS):
                chan[node] = _flatten(node, gm, need)
            elif node.op == "call_method" and t == "mean" and _global_mean(node):
                chan[node] = need(node, node.args[0])
            elif node.op == "call_method" and t == "size":
                chan[node] = None
            else:
                raise UnsupportedError(f"{_where(node, gm)} is not an operation `inn.convert` "
                                       "supports",
                                       hint="supported: activations, pooling, residual adds, "
                                            "flatten after a global pooling, mean over the "
                                            "spatial axes")
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                raise UnsupportedError("the model returns several values; `inn.convert` takes "
                                       "a model with one output tensor")
            uf.union(_OUTPUT, need(node, out))
    # the groups: classes of the union-find without the fixed ends
    fixed = {uf.find(_INPUT), uf.find(_OUTPUT)}
    sizes: dict[str, int] = {}
    names: dict[str, str] = {}  # root -> group name (its first layer's)
    for node, (name, mod, _) in layer_of.items():
        root = uf.find(chan[node])
        n = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
        if root in fixed or n < 2:
            continue
        names.setdefault(root, name)
        sizes[names[root]] = n
    groups = dict(sizes)
    grid = Grid(sizes)

    def group(g: str | None) -> str | None:
        if g is None:
            return None
        root = uf.find(g)
        return names.get(root)

    bn_of = {src: bn for bn, src in folded.items()}
    arrays = {node: _folded(mod, gm.get_submodule(bn_of[node].target) if node in bn_of
                            else None) for node, (_, mod, _) in layer_of.items()}
    roles = {node: (group(in_g), group(chan[node])) for node, (_, _, in_g) in layer_of.items()}
    for node in norms:  # a BatchNorm's vectors, stacked: reordered with its group
        bn = gm.get_submodule(node.target)
        arrays[node] = (torch.stack([t.detach() for t in (bn.running_mean, bn.running_var)
                                     + ((bn.weight, bn.bias) if bn.affine else ())], 1), None)
        roles[node] = (None, group(chan[node]))
    if permute:
        arrays = _permuted(arrays, roles, sizes)
    for node in norms:
        g, bn = group(chan[node]), gm.get_submodule(node.target)
        with torch.no_grad():
            stats = arrays[node][0]
            bn.running_mean.copy_(stats[:, 0])
            bn.running_var.copy_(stats[:, 1])
            if bn.affine:
                bn.weight.copy_(stats[:, 2])
                bn.bias.copy_(stats[:, 3])
        _set_module(gm, node.target, IntegralBatchNorm(bn, g, grid))  # (g None: discrete)
    for node, (name, mod, in_g) in layer_of.items():
        w, b = arrays[node]
        if isinstance(mod, nn.Conv2d):
            layer = IntegralConv2d(w, b, mod.stride[0], mod.padding, group(in_g),
                                   group(chan[node]), grid)
        else:
            layer = IntegralLinear(w, b, group(in_g), group(chan[node]), grid)
        _set_module(gm, name, layer)
    for bn_node in folded:
        bn_node.replace_all_uses_with(bn_node.args[0])
        gm.graph.erase_node(bn_node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return IntegralNet(gm, groups, grid)


def _permuted(arrays: dict, groups: dict, sizes: dict[str, int]) -> dict:
    """`arrays` {layer: (weight, bias)} with each group's channels reordered alike: the
    output channels of the layers that make the group, the input channels of those that read
    it (`groups` {layer: (input group, output group)}; a BatchNorm's stacked vectors make
    their group too)."""
    arrays = {k: list(v) for k, v in arrays.items()}
    for g in sizes:
        parts = []
        for node, (gin, gout) in groups.items():
            w, b = arrays[node]
            if gout == g:
                parts += [(w, 0)] + ([] if b is None else [(b, 0)])
            if gin == g:
                parts.append((w, 1))
        perm = permutation(parts).to(next(iter(arrays.values()))[0].device)
        for node, (gin, gout) in groups.items():
            w, b = arrays[node]
            if gout == g:
                w, b = w[perm], None if b is None else b[perm]
            if gin == g:
                w = w[:, perm]
            arrays[node] = [w, b]
    return {k: tuple(v) for k, v in arrays.items()}


def _folded(layer: nn.Module, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's weight and bias (None: none) with an eval-mode BatchNorm after it folded in:
    bn(W x + b) = s·(W x + b) + t, s = γ / √(var + ε), t = β − s·mean; in float64, returned
    in the layer's dtype."""
    w = layer.weight.detach().to(torch.float64)
    b = None if layer.bias is None else layer.bias.detach().to(torch.float64)
    if bn is not None:
        s = 1 / torch.sqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
        t = -bn.running_mean.detach().to(torch.float64) * s
        if bn.affine:
            g = bn.weight.detach().to(torch.float64)
            s, t = s * g, t * g + bn.bias.detach().to(torch.float64)
        w = w * s.reshape(-1, *[1] * (w.dim() - 1))
        b = s * (torch.zeros_like(s) if b is None else b) + t
    dtype = layer.weight.dtype
    return w.to(dtype), None if b is None else b.to(dtype)


def _check_conv(conv: nn.Conv2d, node: fx.Node, gm: fx.GraphModule) -> None:
    where = _where(node, gm)
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    problems = []
    if conv.groups != 1:
        problems.append(f"groups={conv.groups} (only 1)")
    if tuple(d) != (1, 1):
        problems.append(f"dilation={tuple(d)} (only 1)")
    if any(x % 2 == 0 for x in k):
        problems.append(f"kernel_size={tuple(k)} (odd sizes only: a stencil has a centre)")
    if isinstance(p, str):
        problems.append(f"padding='{p}' (give the padding as numbers)")
    elif s[0] != s[1]:
        problems.append(f"stride={tuple(s)} (the same on both axes)")
    elif (k[0] - 1) // 2 - p[0] != (k[1] - 1) // 2 - p[1]:
        problems.append(f"padding={tuple(p)} with kernel_size={tuple(k)} (the read's offset "
                        "(k − 1)/2 − padding must be the same on both axes)")
    if conv.padding_mode != "zeros":
        problems.append(f"padding_mode='{conv.padding_mode}' (only zeros)")
    if problems:
        raise UnsupportedError(f"{where} cannot be converted: " + "; ".join(problems))


def _global_mean(node: fx.Node) -> bool:
    """`x.mean((2, 3))` / `x.mean(dim=[-2, -1])` of a 4-D tensor: a global average pooling."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    shape = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    if shape is None or len(shape) != 4 or dims is None:
        return False
    dims = {d % 4 for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    return dims == {2, 3}


def _flatten(node: fx.Node, gm: fx.GraphModule, need) -> str:
    """A flatten keeps the channel axis only where the spatial axes are 1 × 1 (after a global
    pooling): then the channels become the features."""
    src = node.args[0]
    group = need(node, src)
    shape = _shape(src)
    if shape is not None and len(shape) == 4 and shape[2] * shape[3] != 1:
        raise UnsupportedError(
            f"{_where(node, gm)} flattens {shape[2]}×{shape[3]} spatial maps into features, "
            "which mixes the channel axis with positions",
            hint="flatten after a global pooling (nn.AdaptiveAvgPool2d(1)), so that the "
                 "features are the channels")
    out = _shape(node)
    if shape is not None and out is not None and (len(out) != 2 or out[1] != shape[1]):
        raise UnsupportedError(
            f"{_where(node, gm)} reshapes {list(shape)} into {list(out)}: only a flatten of "
            "the channels into features [batch, channels] keeps the channel axis")
    return group
