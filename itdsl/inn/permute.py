"""Channel orderings for Integral Neural Networks (INN, Solodskikh et al., CVPR 2023).

An INN reads a layer's channel axis as samples of a smooth function, so before a trained
network is converted, the channels of each group (the axes that must share one order: a
conv's output channels, the next conv's input channels, the BatchNorm vectors between) are
reordered so that neighbouring channels are similar; resampling the weight functions at
fewer points then loses little. Finding the order is a travelling-salesman *path* problem
over the channels: a nearest-neighbour path from several starts, improved by 2-opt.
"""

from __future__ import annotations

import torch

from ..errors import InputError

NN_STARTS = 16  # nearest-neighbour paths tried (from the channels of largest row sum)
REL_TOL = 1e-12  # a 2-opt move must gain more than this fraction of the path's cost


def channel_distances(parts: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """The [n, n] float64 distances between the n channels of one group, summed over its
    parts: each part (tensor, dim) contributes the Euclidean distance between its slices
    along `dim` (a conv weight [out, in, kh, kw] with dim 0 compares filters, with dim 1
    compares what each input channel feeds). Computed directly, not by the faster
    |x|^2 + |y|^2 - 2 x.y, whose cancellation leaves ~1e-6 between identical channels:
    equal channels must be at distance 0 (and `order` then returns at once)."""
    if not parts:
        raise InputError("channel_distances needs at least one (tensor, dim) part",
                         hint="pass the tensors of the group together with their channel dim")
    sizes = []
    for t, dim in parts:
        if not -t.dim() <= dim < t.dim():
            raise InputError(f"channel dim {dim} is out of range for a tensor of shape "
                             f"{tuple(t.shape)}")
        sizes.append(t.shape[dim])
    n = sizes[0]
    if any(s != n for s in sizes):
        raise InputError(f"the parts of a channel group disagree on the number of channels: "
                         f"sizes {sizes} along their channel dims",
                         hint="every part of one group must have the same size along its dim")
    dist = torch.zeros(n, n, dtype=torch.float64)
    for t, dim in parts:
        flat = t.detach().movedim(dim, 0).reshape(n, -1).to(device="cpu", dtype=torch.float64)
        dist += torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")
    return dist


def path_cost(dist: torch.Tensor, perm: torch.Tensor) -> float:
    """The length Σ dist[perm[i], perm[i+1]] of the open path visiting `perm` in order."""
    return float(dist[perm[:-1], perm[1:]].sum())


def _nearest_neighbour(dist: torch.Tensor) -> torch.Tensor:
    """The shortest of the greedy nearest-neighbour paths started, all at once, from the
    NN_STARTS channels of largest row sum (far from the rest, so likely ends of a path)."""
    n = dist.shape[0]
    starts = torch.argsort(dist.sum(1), descending=True, stable=True)[:NN_STARTS]
    rows = torch.arange(len(starts))
    paths = torch.empty(len(starts), n, dtype=torch.long)
    paths[:, 0] = starts
    visited = torch.zeros(len(starts), n, dtype=torch.bool)
    visited[rows, starts] = True
    for k in range(1, n):
        d = dist[paths[:, k - 1]].masked_fill(visited, float("inf"))
        nxt = d.argmin(1)  # the first of equal minima: deterministic
        paths[:, k] = nxt
        visited[rows, nxt] = True
    costs = dist[paths[:, :-1], paths[:, 1:]].sum(1)
    return paths[int(costs.argmin())]


def _two_opt(dist: torch.Tensor, perm: torch.Tensor, max_rounds: int) -> torch.Tensor:
    """Improve an open path a = perm by 2-opt: each round computes, for every segment a[i..j] at
    once, the gain of reversing it, d(a[i-1], a[i]) + d(a[j], a[j+1]) - d(a[i-1], a[j]) -
    d(a[i], a[j+1]) (a term with a neighbour past an end of the path is 0), and applies the
    best one; it stops when no reversal gains more than REL_TOL of the cost."""
    n = len(perm)
    tol = REL_TOL * path_cost(dist, perm)
    lower = torch.ones(n, n, dtype=torch.bool).tril()  # the pairs i >= j: no segment
    zero = torch.zeros(1, dtype=dist.dtype)
    for _ in range(max_rounds):
        d = dist[perm][:, perm]  # d[i, j] = dist[a[i], a[j]]
        edge = d.diagonal(1)  # edge[k] = d(a[k], a[k+1])
        before = torch.cat([zero, edge])  # d(a[i-1], a[i]), 0 at i = 0
        after = torch.cat([edge, zero])  # d(a[j], a[j+1]), 0 at j = n-1
        gain = before[:, None] + after[None, :]
        gain[1:] -= d[:-1]  # d(a[i-1], a[j]), for i >= 1
        gain[:, :-1] -= d[:, 1:]  # d(a[i], a[j+1]), for j <= n-2
        gain = gain.masked_fill_(lower, float("-inf")).flatten()
        best = int(gain.argmax())
        if not gain[best] > tol:
            break
        i, j = divmod(best, n)
        perm = torch.cat([perm[:i], perm[i:j + 1].flip(0), perm[j + 1:]])
    return perm


def order(dist: torch.Tensor, max_rounds: int = 1000) -> torch.Tensor:
    """A short open path through the n channels of the [n, n] distances `dist`, as a
    LongTensor permutation: the best of the nearest-neighbour paths and the identity,
    improved by at most `max_rounds` 2-opt reversals. Never longer than the identity;
    deterministic; immediate when every distance is 0 (identical channels)."""
    if dist.dim() != 2 or dist.shape[0] != dist.shape[1]:
        raise InputError(f"order needs a square [n, n] distance matrix, got shape "
                         f"{tuple(dist.shape)}")
    dist = dist.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(dist).all()):
        raise InputError("the channel distances are not all finite",
                         hint="the weights of the group hold NaN or inf")
    n = dist.shape[0]
    identity = torch.arange(n)
    if n <= 2 or not bool((dist != 0).any()):
        return identity
    start = _nearest_neighbour(dist)
    if path_cost(dist, identity) <= path_cost(dist, start):
        start = identity
    return _two_opt(dist, start, max_rounds)


def permutation(parts: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """The channel order of one group: `order(channel_distances(parts))`."""
    return order(channel_distances(parts))
