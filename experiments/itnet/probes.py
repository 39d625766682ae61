"""Evidence (c): what a task-trained kernel became. For the first block's mixer of a trained
ITNet (the "mlp" kind: K(x, y) = φ(x, y, a(x), a(y)) ∈ R^C), on held-out inputs:

- stationarity: the share of K's variance explained by the offset x − y alone;
- position share: the share explained by the pair of positions (x, y); the rest depends on the
  tokens' contents — content sensitivity = 1 − position share;
- locality: the mean of |K| on the nearest tenth of the pairs (by |x − y|) over its mean on all
  pairs (1: blind to distance; a 5-tap convolution on 40 steps: about 8);
- future mass: the share of Σ|K| on pairs with y after x (0: causal).

The shares are adjusted R² (each group's mean costs a degree of freedom), so a kernel of pure
content scores about 0 however few samples there are.

    python -m experiments.itnet.probes        # trains on MNIST-1D and its shuffled copy
"""

from __future__ import annotations

from dataclasses import replace

import torch


def kernel(mix, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """K(x, y) of an "mlp" mixer on tokens `h` [B, n, dim] (already normalised as the block
    passes them) at positions `pos` [1 or B, n, D]: `[B, n, n, C]`, every pair materialised."""
    if mix.kind not in ("mlp", "montecarlo"):
        raise ValueError(f"the probes read an MLP kernel; this mixer is {mix.kind!r}")
    B, n, _ = h.shape
    a = mix.keys(h)
    P = pos.to(h.dtype).expand(B, n, pos.shape[-1])
    z = torch.cat([P[:, :, None].expand(B, n, n, -1), P[:, None].expand(B, n, n, -1),
                   a[:, :, None].expand(B, n, n, -1), a[:, None].expand(B, n, n, -1)], -1)
    K = mix.op.phi(z)
    if mix.causal:
        K = K.masked_fill((P[:, None, :, 0] > P[:, :, None, 0])[..., None], 0)
    return K


def _explained(K: torch.Tensor, groups: torch.Tensor) -> float:
    """The share of the variance of K [B, n, n, C] (over samples, pairs and channels; each
    channel about its own mean) explained by the means within `groups` ([n, n] int labels of
    the pairs, shared by every sample)."""
    Kc = K - K.mean((0, 1, 2), keepdim=True)
    flat = Kc.permute(1, 2, 0, 3).reshape(-1, K.shape[0] * K.shape[-1])  # [pairs, B·C]
    g = groups.reshape(-1)
    labels, inv = torch.unique(g, return_inverse=True)
    sums = torch.zeros(len(labels), flat.shape[1], dtype=K.dtype).index_add_(0, inv, flat)
    counts = torch.bincount(inv, minlength=len(labels)).to(K.dtype)
    # the group means per channel, pooled over the samples (a function of the group alone)
    per_channel = sums.reshape(len(labels), K.shape[0], K.shape[-1]).sum(1)
    per_channel = per_channel / (counts[:, None] * K.shape[0])
    fitted = per_channel[inv]  # [pairs, C]
    resid = Kc.permute(1, 2, 0, 3).reshape(-1, K.shape[0], K.shape[-1]) - fitted[:, None]
    N, k = flat.shape[0] * K.shape[0], len(labels)  # observations and groups per channel
    return 1.0 - (resid.square().sum() / (N - k)).item() / (Kc.square().sum() / (N - 1)).item()


def probe(mix, h: torch.Tensor, pos: torch.Tensor, near: float = 0.1,
          axes: int | None = None) -> dict[str, float]:
    """The four probes of the docstring on the mixer `mix` at tokens `h`, positions `pos`;
    offsets and distances are those of the first `axes` coordinates of `pos` (None: all; the
    positions themselves where Fourier features follow them)."""
    with torch.no_grad():
        K = kernel(mix, h, pos).double()
        P = pos[0, :, :axes].double()  # (the probes read positions shared by the batch)
        n = P.shape[0]
        d = P[:, None, :] - P[None, :, :]  # [n, n, D]
        step = torch.cdist(P, P).masked_fill(torch.eye(n, dtype=torch.bool), torch.inf).min()
        offset = torch.round(d / step).long()  # offsets on the points' own spacing
        offset_id = torch.unique(offset.reshape(n * n, -1), dim=0, return_inverse=True)[1]
        pair_id = torch.arange(n * n).reshape(n, n)
        dist = d.norm(dim=-1)
        mass = K.abs().sum((0, 3))  # [n, n]
        k_near = max(1, round(near * n * n))
        nearest = torch.argsort(dist.reshape(-1), stable=True)[:k_near]
        locality = (mass.reshape(-1)[nearest].mean() / mass.mean()).item()
        future = (mass[d[..., 0] < 0].sum() / mass.sum()).item()  # y after x: x − y < 0
        return {"stationarity": _explained(K, offset_id.reshape(n, n)),
                "position share": _explained(K, pair_id),
                "locality": locality, "future mass": future}


def trained_probes(task_names: list[str], seed: int, quick: bool, examples: int = 256
                   ) -> list[dict]:
    """ITNet ("mlp" kernel) trained on each task as `experiments.itnet.run` trains it, then the
    probes of its first mixer on held-out examples."""
    from . import models, run, train
    from .montecarlo import first_mixer_inputs
    rows = []
    for name in task_names:
        task, config = run.load(name, quick), run.CONFIGS[name]
        if quick:
            config = replace(config, recipe=replace(config.recipe, epochs=run.QUICK_EPOCHS))
        torch.manual_seed(seed)
        model = models.build("itnet", task, config)
        hist = train.fit(model, task, config.recipe, seed, desc=f"probes {name}")
        lengths = None if task.len_test is None else task.len_test[:examples]
        mix, (h, pos, _) = first_mixer_inputs(model, task.x_test[:examples], lengths)
        axes = 2 if task.kind == "image" else 1
        rows.append({"task": name, "accuracy": hist.accuracy[-1], **probe(mix, h, pos, axes=axes)})
    return rows


def main() -> None:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["mnist1d", "mnist1d_shuffled"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = trained_probes(args.tasks, args.seed, args.quick)
    print("| task | test accuracy | stationarity | position share | locality | future mass |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {100 * r['accuracy']:.1f} % | {r['stationarity']:.2f} | "
              f"{r['position share']:.2f} | {r['locality']:.2f} | {r['future mass']:.2f} |")


if __name__ == "__main__":
    main()
