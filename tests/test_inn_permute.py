"""itdsl.inn.permute: channel distances against an explicit loop, 2-opt orders against
brute force (small n), a line (optimal path known), a shuffled smooth curve (the INN use:
neighbouring channels similar), the 2-opt local optimum checked reversal by reversal, and
the degenerate groups (identical channels, n = 1, 2, mismatched sizes)."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from itdsl.errors import InputError
from itdsl.inn.permute import channel_distances, order, path_cost, permutation

D = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cost(dist: torch.Tensor, perm: list[int]) -> float:
    """The open path's length, summed edge by edge (independent of `path_cost`)."""
    return sum(float(dist[perm[k], perm[k + 1]]) for k in range(len(perm) - 1))


def is_permutation(perm: torch.Tensor, n: int) -> bool:
    return perm.dtype == torch.long and torch.equal(perm.sort().values, torch.arange(n))


def nearest_neighbour_path(dist: torch.Tensor) -> list[int]:
    """The greedy path from the channel of largest row sum (one of `order`'s starts)."""
    n = dist.shape[0]
    path = [int(dist.sum(1).argmax())]
    while len(path) < n:
        rest = [c for c in range(n) if c not in path]
        path.append(min(rest, key=lambda c: float(dist[path[-1], c])))
    return path


def test_channel_distances_match_a_loop_over_pairs():
    g = gen(0)
    a = torch.randn(5, 3, 2, generator=g)  # channels along dim 0
    b = torch.randn(4, 5, 3, generator=g)  # channels along dim 1
    got = channel_distances([(a, 0), (b, 1)])
    assert got.dtype == D and got.shape == (5, 5)
    want = torch.zeros(5, 5, dtype=D)
    for i in range(5):
        for j in range(5):
            want[i, j] = (torch.linalg.norm(a[i].double() - a[j].double())
                          + torch.linalg.norm(b[:, i].double() - b[:, j].double()))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # a negative dim names the same axis
    torch.testing.assert_close(channel_distances([(b, -2)]), channel_distances([(b, 1)]))


def test_distances_are_accurate_at_and_near_zero():
    """No |x|^2 + |y|^2 - 2 x.y cancellation: a channel is at distance exactly 0 from itself
    and from its copy, and a tiny difference is measured, not lost in rounding."""
    w = torch.randn(64, 300, generator=gen(1), dtype=D)
    w[1] = w[0]
    w[2] = w[0]
    w[2, 7] += 1e-9
    dist = channel_distances([(w, 0)])
    assert not bool(dist.diagonal().any())
    assert dist[0, 1] == 0 and dist[1, 0] == 0
    assert float(dist[0, 2]) == pytest.approx(1e-9, rel=1e-6)
    assert not bool(channel_distances([(torch.ones(64, 300), 0)]).any())


def test_points_on_a_line_give_the_sorted_path():
    x = torch.rand(50, generator=gen(2), dtype=D)
    dist = channel_distances([(x[:, None], 0)])
    perm = order(dist)
    assert is_permutation(perm, 50)
    assert path_cost(dist, perm) == pytest.approx(float(x.max() - x.min()), rel=1e-12)
    xs = x[perm]
    assert bool((xs.diff() > 0).all()) or bool((xs.diff() < 0).all())


def test_a_shuffled_smooth_curve_is_recovered():
    """Channels sampled along a smooth curve (each channel a function of t), shuffled: the
    order puts them back along the curve, within 1% of the unshuffled path."""
    n = 96
    t = torch.linspace(0, 1, n, dtype=D)
    k = torch.arange(1, 5, dtype=D)
    w = torch.cat([torch.sin(torch.pi * k * t[:, None]), torch.cos(torch.pi * k * t[:, None])], 1)
    shuffled = w[torch.randperm(n, generator=gen(3))]
    dist = channel_distances([(shuffled, 0)])
    smooth = path_cost(channel_distances([(w, 0)]), torch.arange(n))
    assert path_cost(dist, torch.arange(n)) > 10 * smooth
    assert path_cost(dist, order(dist)) <= 1.01 * smooth


@pytest.mark.parametrize("n", [5, 6, 7, 8])
def test_small_groups_against_brute_force(n):
    """2-opt is a local search, not exact. Measured on 300 instances per n (points in 3-D):
    at most 11% above the optimum, under 2.4% on average over any 20, exact on at least
    10 of any 20; asserted with some slack."""
    perms = torch.tensor(list(itertools.permutations(range(n))))
    g = gen(10 + n)
    ratios = []
    for _ in range(20):
        dist = channel_distances([(torch.randn(n, 3, generator=g, dtype=D), 0)])
        best = float(dist[perms[:, :-1], perms[:, 1:]].sum(1).min())
        ratios.append(cost(dist, order(dist).tolist()) / best)
    assert min(ratios) >= 1 - 1e-12
    assert max(ratios) <= 1.15
    assert sum(ratios) / len(ratios) <= 1.03
    assert sum(r <= 1 + 1e-12 for r in ratios) >= 8


def test_never_worse_than_identity_or_nearest_neighbour_and_deterministic():
    g = gen(4)
    n = 128
    parts = [(torch.randn(n, 64, 3, 3, generator=g), 0),
             (torch.randn(32, n, 3, 3, generator=g), 1)]
    dist = channel_distances(parts)
    perm = permutation(parts)
    assert is_permutation(perm, n)
    c = cost(dist, perm.tolist())
    assert c < cost(dist, list(range(n)))
    assert c <= cost(dist, nearest_neighbour_path(dist)) + 1e-9
    assert torch.equal(perm, order(dist))


def test_an_ordered_group_keeps_its_order_when_no_start_beats_it():
    """Channels already put in a 2-opt order: every nearest-neighbour path is longer than
    the identity, so `order` starts from the identity and keeps its cost."""
    n = 80
    dist = channel_distances([(torch.rand(n, 2, generator=gen(9), dtype=D), 0)])
    perm = order(dist)
    ordered = dist[perm][:, perm]
    kept = path_cost(ordered, torch.arange(n))
    assert path_cost(ordered, nearest_neighbour_path(ordered)) > 1.02 * kept
    assert path_cost(ordered, order(ordered, max_rounds=0)) <= kept
    assert path_cost(ordered, order(ordered)) <= kept


def test_the_result_is_a_two_opt_local_optimum():
    """No segment reversal, tried one by one, shortens the returned path."""
    n = 30
    dist = channel_distances([(torch.randn(n, 4, generator=gen(5), dtype=D), 0)])
    perm = order(dist).tolist()
    c = cost(dist, perm)
    for i in range(n):
        for j in range(i + 1, n):
            moved = perm[:i] + perm[i:j + 1][::-1] + perm[j + 1:]
            assert cost(dist, moved) >= c - 1e-9 * c, (i, j)


def test_max_rounds_bounds_the_improvement():
    n = 60
    dist = channel_distances([(torch.randn(n, 2, generator=gen(6), dtype=D), 0)])
    c0, c1, c = (path_cost(dist, order(dist, max_rounds=r)) for r in (0, 1, 1000))
    assert c < c1 < c0


def test_identical_channels_return_at_once():
    """All distances 0 (a group of equal channels, which makes TorchIntegral hang)."""
    w = torch.ones(512, 64, 3, 3)
    start = time.perf_counter()
    perm = permutation([(w, 0), (torch.zeros(16, 512), 1)])
    assert time.perf_counter() - start < 5
    assert is_permutation(perm, 512)


def test_duplicated_channels_end_up_next_to_each_other():
    base = torch.randn(20, 8, generator=gen(7), dtype=D)
    w = torch.cat([base, base])  # channel c and c + 20 are equal
    perm = order(channel_distances([(w, 0)])).tolist()
    pos = {c: k for k, c in enumerate(perm)}
    assert all(abs(pos[c] - pos[c + 20]) == 1 for c in range(20))


def test_one_and_two_channels():
    assert torch.equal(order(torch.zeros(1, 1, dtype=D)), torch.tensor([0]))
    assert torch.equal(permutation([(torch.randn(1, 3), 0)]), torch.tensor([0]))
    perm = permutation([(torch.randn(2, 3, generator=gen(8)), 0)])
    assert is_permutation(perm, 2)


def test_errors():
    with pytest.raises(InputError, match=r"\[4, 5\]"):
        channel_distances([(torch.zeros(4, 3), 0), (torch.zeros(3, 5), 1)])
    with pytest.raises(InputError, match="at least one"):
        channel_distances([])
    with pytest.raises(InputError, match="out of range"):
        channel_distances([(torch.zeros(4, 3), 2)])
    with pytest.raises(InputError, match="square"):
        order(torch.zeros(3, 4))
    with pytest.raises(InputError, match="finite"):
        order(torch.tensor([[0.0, float("nan")], [float("nan"), 0.0]]))
