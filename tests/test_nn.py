"""itdsl.nn (ITNet): each mixer against the integral it stands for, written here in torch with
every pair materialised (forward and gradients, float64), masks, the encoders, and the model
composing with torch (state_dict, padding invariance)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from itdsl import InputError
from itdsl import nn as itnn

D = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mix(kind: str, target: str | None = "reference", **kw) -> itnn.Mix:
    torch.manual_seed(3)
    kw.setdefault("width", 6 if kind == "mlp" else None)
    return itnn.Mix(4, kind=kind, coords=2, keys=2, hidden=5, rank=3, target=target,
                    **kw).double()


def _mlp(seq: torch.nn.Sequential, z: torch.Tensor) -> torch.Tensor:
    """The mlp param's layers applied by hand: Linear, then GELU and Linear for each further
    layer."""
    lins = [m for m in seq if isinstance(m, torch.nn.Linear)]
    assert len(lins) == 3  # (the default: two hidden layers)
    for i, lin in enumerate(lins):
        z = F.linear(z if i == 0 else F.gelu(z), lin.weight, lin.bias)
    return z


def _by_pairs(mix: itnn.Mix, h, pos, mask) -> torch.Tensor:
    """The mixer's integral with every pair (x, y) materialised."""
    B, n, _ = h.shape
    a, v = mix.keys(h), mix.values(h)
    P = pos.expand(B, n, 2)
    w = torch.ones(B, n, dtype=D) if mask is None else mask.to(D)
    if mix.kind == "lowrank":
        A = _mlp(mix.op.A, torch.cat([P, a], -1))
        Bm = _mlp(mix.op.B, torch.cat([P, a], -1))
        K = (A[:, :, None, :] * Bm[:, None, :, :]).sum(-1, keepdim=True)  # [B, x, y, 1]
    else:
        z = torch.cat([P[:, :, None].expand(B, n, n, 2), P[:, None].expand(B, n, n, 2),
                       a[:, :, None].expand(B, n, n, 2), a[:, None].expand(B, n, n, 2)], -1)
        K = _mlp(mix.op.phi, z)  # [B, x, y, C or 1]
    later = P[:, None, :, 0] > P[:, :, None, 0]  # [B, x, y]: y after x
    if mix.kind in ("softmax", "causal"):
        s = K[..., 0].masked_fill(w[:, None, :] == 0, -torch.inf)
        if mix.causal:
            s = s.masked_fill(later, -torch.inf)
        g = torch.softmax(s, -1) @ v
    else:
        if mix.causal:
            K = K.masked_fill(later[..., None], 0)
        wn = w / w.sum(-1, keepdim=True)
        g = (K * (wn[:, None, :, None] * v[:, None, :, :])).sum(2)
    return mix.out(g)


@pytest.mark.parametrize("kind, causal", [("mlp", False), ("softmax", False), ("causal", False),
                                          ("lowrank", False), ("mlp", True), ("lowrank", True)])
def test_each_mixer_is_its_integral(kind, causal):
    """Forward and the gradients of the tokens and of every param, with a padding mask (the
    "mlp" mixer with more value channels than the tokens have)."""
    mix = _mix(kind, causal=causal)
    h = torch.randn(2, 5, 4, generator=_gen(), dtype=D, requires_grad=True)
    pos = torch.rand(1, 5, 2, generator=_gen(1), dtype=D)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    for m in (None, mask):
        got, want = mix(h, pos, m), _by_pairs(mix, h, pos, m)
        torch.testing.assert_close(got, want)
        params = [h, *mix.parameters()]
        gw = torch.randn_like(got, dtype=D)
        for a, b in zip(torch.autograd.grad((got * gw).sum(), params),
                        torch.autograd.grad((want * gw).sum(), params)):
            torch.testing.assert_close(a, b)


def test_the_compiled_strategy_is_the_reference():
    """The default target (lowrank's two passes; the tiled MLP kernels are checked on
    examples/itnet_mixer.it in test_compiled.py, not here: a compile costs 15 s of the
    suite) against the reference semantics of the same mixer, float64, with gradients."""
    h = torch.randn(2, 7, 4, generator=_gen(2), dtype=D, requires_grad=True)
    pos = torch.rand(2, 7, 2, generator=_gen(3), dtype=D)
    mask = torch.rand(2, 7, generator=_gen(4)) > 0.3
    mask[[0, 1], pos[..., 0].argmin(1)] = True  # (else a causal row sees nothing: 0/0)
    for kind in ("lowrank",):
        fast, ref = _mix(kind, target=None), _mix(kind)
        ref.load_state_dict(fast.state_dict())
        a, b = fast(h, pos, mask), ref(h, pos, mask)
        assert fast.op.last_run == "lowrank"
        torch.testing.assert_close(a, b)
        ga = torch.autograd.grad(a.square().sum(), [h, *fast.parameters()])
        gb = torch.autograd.grad(b.square().sum(), [h, *ref.parameters()])
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y)


@pytest.mark.parametrize("importance", ["values", "weights", "uniform"])
def test_montecarlo_estimates_the_mean(importance):
    """S draws per call (∝ w(y)·(‖v(y)‖ + ε), ∝ w(y), or uniform), weighted 1/(S·p): the
    average of many calls is the exact mixer (the "mlp" kind with the same params) on the
    valid tokens, within its standard error."""
    mc = _mix("montecarlo", samples=8, importance=importance)
    exact = _mix("mlp", width=None)
    exact.load_state_dict(mc.state_dict())
    h = torch.randn(1, 6, 4, generator=_gen(5), dtype=D)
    pos = torch.rand(1, 6, 2, generator=_gen(6), dtype=D)
    mask = torch.tensor([[True, True, False, True, True, False]])
    g = _gen(7)
    with torch.no_grad():
        want = exact(h, pos, mask)
        draws = torch.stack([mc(h, pos, mask, generator=g) for _ in range(400)])
    err = (draws.mean(0) - want).abs()
    assert (err <= 5 * draws.std(0) / 20 + 1e-12).all()
    assert (draws.std(0) > 0).any()  # (it does draw)


def test_the_model_composes_with_torch():
    """An ITNet on padded series: the padding does not change the logits, state_dict round
    trips, gradients reach every param."""
    torch.manual_seed(0)
    net = itnn.ITNet(3, dim=8, depth=2, classes=4, coords=1, kind="lowrank", hidden=6).double()
    x = torch.randn(3, 9, 3, generator=_gen(8), dtype=D)
    lengths = torch.tensor([9, 5, 2])
    tokens, pos, mask = itnn.series(x, lengths)
    out = net(tokens, pos, mask)
    assert out.shape == (3, 4)
    noisy = tokens.clone()
    noisy[~mask] = 1e3
    torch.testing.assert_close(net(noisy, pos, mask), out)
    twin = itnn.ITNet(3, dim=8, depth=2, classes=4, coords=1, kind="lowrank", hidden=6).double()
    twin.load_state_dict(net.state_dict())
    torch.testing.assert_close(twin(tokens, pos, mask), out)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("kind", ["causal", "softmax"])
def test_a_query_that_sees_no_valid_token_stays_finite(kind):
    """Left padding under a causal mixer, or a sequence with every token masked: those
    queries see no valid token (0/0 by the definition); the net stays finite, gradients
    too, and the other sequence's logits are what they are alone."""
    torch.manual_seed(0)
    net = itnn.ITNet(3, dim=8, depth=2, classes=3, coords=1, kind=kind, keys=4, hidden=8,
                     target="reference").double()
    tokens, pos, _ = itnn.series(torch.randn(2, 6, 3, generator=_gen(9), dtype=D))
    mask = torch.tensor([[True] * 6, [False, False] + [kind == "causal"] * 4])
    out = net(tokens, pos, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:1], net(tokens[:1], pos, mask[:1]))
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_encoders():
    img = torch.arange(2 * 1 * 4 * 4, dtype=D).reshape(2, 1, 4, 4)
    tok, pos = itnn.pixels(img)
    assert tok.shape == (2, 16, 1) and pos.shape == (1, 16, 2)
    assert tok[1, 5, 0] == img[1, 0, 1, 1] and pos[0, 5].tolist() == [0.375, 0.375]
    tok, pos = itnn.patches(img, 2)
    assert tok.shape == (2, 4, 4) and tok[0, 1].tolist() == [2, 3, 6, 7]
    assert pos[0].tolist() == [[0.25, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.75]]
    with pytest.raises(InputError, match="3×3 patches"):
        itnn.patches(img, 3)
    with pytest.raises(InputError, match="no mixer kind"):
        itnn.Mix(4, kind="conv")
    with pytest.raises(InputError, match="no importance"):
        itnn.Mix(4, kind="montecarlo", importance="norm")
    with pytest.raises(InputError, match="at least one hidden layer"):
        itnn.Mix(4, layers=0)
    with pytest.raises(InputError, match="positions should be"):
        _mix("lowrank")(torch.randn(1, 5, 4, dtype=D), torch.rand(1, 5, 3, dtype=D))


@pytest.mark.parametrize("h,w,message", [
    ((5, 4), None, "tokens should be"),  # one sequence without its batch axis
    ((2, 5, 3), None, "tokens should be"),  # the wrong width
    ((2, 0, 4), None, "no tokens"),
    ((2, 5, 4), (2, 5, 1), "token weights"),
    ((2, 5, 4), (2, 4), "token weights"),
])
def test_malformed_mixer_inputs_are_clear_errors(h, w, message):
    mix = _mix("softmax")
    n = h[1] if len(h) == 3 else h[0]
    with pytest.raises(InputError, match=message):
        mix(torch.randn(*h, dtype=D), torch.rand(1, n, 2, dtype=D),
            None if w is None else torch.ones(*w, dtype=D))
    with pytest.raises(InputError, match="floating-point"):
        mix(torch.ones(2, 5, 4, dtype=torch.long), torch.rand(1, 5, 2, dtype=D))


def test_malformed_positions_dtypes_and_masks_are_clear_errors():
    mix = _mix("softmax")
    h = torch.randn(2, 6, 4, dtype=D)
    for pos in (torch.rand(1, 1, 6, 2, dtype=D), torch.rand(3, 6, 2, dtype=D)):
        with pytest.raises(InputError, match="positions should be"):
            mix(h, pos)  # (were broadcast into extra batch axes)
    with pytest.raises(InputError, match="positions should be a tensor"):
        mix(h, [[0.0, 0.0]] * 6)
    with pytest.raises(InputError, match="tokens of dtype float32 into a mixer of float64"):
        mix(h.float(), torch.rand(1, 6, 2))
    mc = _mix("montecarlo", samples=4)
    with pytest.raises(InputError, match=">= 0"):
        mc(h, torch.rand(1, 6, 2, dtype=D), -torch.ones(2, 6, dtype=D))


def test_series_windows_and_their_padding():
    """A token of `series(x, lengths, window=3)` is its step and its two neighbours (zero
    outside the series and past its length); what lies past a length changes no token."""
    x = torch.arange(1.0, 13.0).reshape(2, 6, 1)
    tokens, pos, mask = itnn.series(x, torch.tensor([6, 4]), window=3)
    assert tokens.shape == (2, 6, 3) and pos.shape == (1, 6, 1)
    assert tokens[0, 0].tolist() == [0, 1, 2] and tokens[0, 5].tolist() == [5, 6, 0]
    assert tokens[1, 3].tolist() == [9, 10, 0]  # step 4 of the second series is padding
    noisy = x.clone()
    noisy[1, 4:] = 1e3
    torch.testing.assert_close(itnn.series(noisy, torch.tensor([6, 4]), window=3)[0][mask],
                               tokens[mask])
    many = torch.randn(2, 5, 2)
    t5 = itnn.series(many, window=5)[0]
    padded = F.pad(many, (0, 0, 2, 2))
    for t in range(5):  # channel-major: each channel's 5 steps
        torch.testing.assert_close(t5[:, t], padded[:, t:t + 5].transpose(1, 2).reshape(2, 10))
    with pytest.raises(InputError, match="odd number"):
        itnn.series(x, window=4)


def test_pixel_windows():
    img = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    tokens, pos = itnn.pixels(img, window=3)
    assert tokens.shape == (1, 16, 9) and pos.shape == (1, 16, 2)
    assert tokens[0, 0].tolist() == [0, 0, 0, 0, 1, 2, 0, 5, 6]  # the corner: zeros outside
    assert tokens[0, 5].tolist() == [1, 2, 3, 5, 6, 7, 9, 10, 11]
    with pytest.raises(InputError, match="odd number"):
        itnn.pixels(img, window=2)


def test_a_montecarlo_mixer_on_a_fully_masked_sequence_gives_zero():
    """A sequence whose every token is masked (w = 0) mixes nothing: 0 before the output
    layer, as the dense kinds give (its importance was 0 everywhere: an error quoting the
    generated operator); the other sequences are untouched."""
    mix = _mix("montecarlo", samples=4)
    h = torch.randn(2, 5, 4, dtype=D, requires_grad=True)
    pos = torch.rand(1, 5, 2, dtype=D)
    w = torch.ones(2, 5, dtype=D)
    w[1] = 0
    out = mix(h, pos, w, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[1], mix.out.bias.expand(5, -1))
    alone = mix(h[:1], pos, w[:1], generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(alone).all() and torch.isfinite(out).all()
    (g,) = torch.autograd.grad(out.sum(), h)
    assert torch.isfinite(g).all() and g[1].abs().max() == 0
