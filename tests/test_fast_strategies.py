"""attention, recurrence, convolution and lowrank: each runs its own algorithm (tiled online
softmax, chunked scans, conv1d/FFT, two passes) and equals the reference and the dense
lowering, forward and gradients, over sizes, params, batch dims, causal or not.

The tile and chunk sizes of the algorithms are shrunk in most tests so that a few dozen
points already cross many tiles, chunks and recursion levels.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from util import EXAMPLES, gradcheck_op

import itdsl
import itdsl.runtime.strategies.tuning as S
from itdsl.frontend import load_source
from itdsl.runtime.strategies import Runner
from itdsl.runtime.strategies.recurrence import decay_scan

D = torch.float64

# (file, operator, strategy, the form's kind)
OPERATORS = [
    ("attention.it", "attention", "attention", "SoftmaxForm"),
    ("attention.it", "causal_attention", "attention", "SoftmaxForm"),
    ("linear_attention.it", "linear_attention", "lowrank", "LowRankSum"),
    ("linear_attention.it", "causal_linear_attention", "recurrence", "LowRankSum"),
    ("ema.it", "ema", "recurrence", "DecaySum"),
    ("bump_conv.it", "bump_conv", "convolution", "ConvSum"),
]
IDS = [o[1] for o in OPERATORS]


@pytest.fixture
def small_tiles(monkeypatch):
    """Small tiles, and plain attention by itdsl's own online softmax (its torch tiles), not
    torch's SDPA nor the fused kernel (tested on its own below)."""
    monkeypatch.setattr(S, "USE_FUSED", False)
    monkeypatch.setattr(S, "ROWS", 8)
    monkeypatch.setattr(S, "COLS", 16)
    monkeypatch.setattr(S, "CHUNK", 4)
    monkeypatch.setattr(S, "SEGMENT", 3)
    monkeypatch.setattr(S, "USE_SDPA", False)


@functools.cache
def _ops(file: str, name: str):
    """(library, dense compiled, reference), float64, the same params."""
    lib = itdsl.compile_file(EXAMPLES / file, target="cpu")[name].double()
    dense = itdsl.compile_file(EXAMPLES / file, target="cpu", strategy="dense")[name].double()
    ref = itdsl.compile_file(EXAMPLES / file, target="reference")[name].double()
    dense.load_state_dict(lib.state_dict())
    ref.load_state_dict(lib.state_dict())
    return lib, dense, ref


def _inputs(op, n: int, m: int, batch: tuple, gen: torch.Generator, scale: float = 1.0) -> dict:
    kw = {}
    sizes = {}
    for k, d in enumerate(op.ir.domains):
        sizes[d.name] = n if k == 0 else m
    for i in op.ir.inputs:
        kw[i.name] = scale * torch.randn(*batch, sizes[i.domain], i.width or 1, generator=gen,
                                         dtype=D)
    return kw


def _check(lib, ref, kw, rtol=1e-9):
    tensors = [v.requires_grad_(True) for v in kw.values()]
    out, want = lib(**kw), ref(**kw)
    torch.testing.assert_close(out, want, rtol=rtol, atol=1e-10)
    dout = torch.randn(out.shape, dtype=D)
    got = torch.autograd.grad(out, tensors + list(lib.parameters()), dout)
    exp = torch.autograd.grad(want, tensors + list(ref.parameters()), dout)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-10)
    return out


@pytest.mark.parametrize("file,name,strategy,kind", OPERATORS, ids=IDS)
def test_examples_run_their_own_algorithm(file, name, strategy, kind):
    lib, dense, _ = _ops(file, name)
    assert lib.strategy == strategy and isinstance(lib._runner, Runner)
    form = lib.plan.form
    assert type(form if not isinstance(form, tuple) else form[0]).__name__ == kind
    assert dense._runner is None
    text = itdsl.compile_file(EXAMPLES / file).explain(name)
    assert "runs as (torch, no generated kernel" in text


@pytest.mark.parametrize("file,name,strategy,kind", OPERATORS, ids=IDS)
@settings(max_examples=6, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), m=st.integers(1, 40), batch=st.sampled_from([(), (2,), (2, 1)]),
       seed=st.integers(0, 2**16), shift=st.floats(-0.5, 0.5))
def test_property_equals_reference_and_dense(small_tiles, file, name, strategy, kind, n, m,
                                             batch, seed, shift):
    lib, dense, ref = _ops(file, name)
    one_domain = len(lib.ir.domains) == 1
    if name == "bump_conv" and abs(0.2 * (n - 1) - round(0.2 * (n - 1))) < 1e-6:
        n += 1  # the bracket's edge on a grid point: rounding decides it, in either path
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lib.parameters():  # other params: each call its own
            p.add_(shift)
        state = lib.state_dict()
    ref.load_state_dict(state)
    dense.load_state_dict(state)
    try:
        kw = _inputs(lib, n, n if one_domain else m, batch, gen)
        out = _check(lib, ref, kw)
        with torch.no_grad():
            torch.testing.assert_close(out, dense(**kw), rtol=1e-9, atol=1e-10)
    finally:
        with torch.no_grad():
            for p in lib.parameters():
                p.sub_(shift)
        ref.load_state_dict(lib.state_dict())
        dense.load_state_dict(lib.state_dict())


@pytest.mark.parametrize("file,name,strategy,kind", OPERATORS, ids=IDS)
def test_gradcheck(small_tiles, file, name, strategy, kind):
    lib, _, _ = _ops(file, name)
    kw = _inputs(lib, 9, 5, (2,), torch.Generator().manual_seed(1))  # 2 row tiles
    # (fast mode: random projections of the Jacobian, numerical against analytical; the
    # full Jacobians of these inputs took 4-16 s each, the tests above compare every
    # gradient with the reference's elementwise)
    assert gradcheck_op(lib, kw, fast_mode=True)


def test_attention_with_many_tiles_and_extreme_scores(small_tiles):
    """Scores up to ~±400: the running max keeps exp finite; far-below-max terms are 0."""
    for name in ("attention", "causal_attention"):
        lib, _, ref = _ops("attention.it", name)
        kw = _inputs(lib, 37, 37, (3,), torch.Generator().manual_seed(2), scale=7.0)
        out = _check(lib, ref, kw, rtol=1e-7)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["attention", "causal_attention"])
@pytest.mark.parametrize("fused", [False, True])
def test_plain_attention_by_sdpa_equals_the_reference(monkeypatch, name, fused):
    """Plain attention is handed to torch's scaled_dot_product_attention (its sums taken
    relative to the log-sum-exp), or without a mask its forward to the fused kernel and its
    backward to SDPA's flash backward (`fused`): the output and every gradient are the
    reference's."""
    monkeypatch.setattr(S, "USE_FUSED", fused)
    monkeypatch.setattr(S, "FUSED_MIN_WORK", 0)
    lib, _, ref = _ops("attention.it", name)
    assert lib._runner.form.sdpa
    kw = _inputs(lib, 23, 23 if name == "causal_attention" else 17, (2, 1),
                 torch.Generator().manual_seed(11))
    _check(lib, ref, kw)
    assert gradcheck_op(lib, _inputs(lib, 6, 6, (2,), torch.Generator().manual_seed(12)),
                        fast_mode=True)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_float32_matches_sdpa(monkeypatch, fused):
    monkeypatch.setattr(S, "USE_SDPA", False)  # itdsl's own: the fused kernel, or the tiles
    monkeypatch.setattr(S, "USE_FUSED", fused)
    monkeypatch.setattr(S, "FUSED_MIN_WORK", 0)
    lib = itdsl.compile_file(EXAMPLES / "attention.it", target="cpu")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 700, 64, generator=g) for _ in range(3))
    for name, causal in (("attention", False), ("causal_attention", True)):
        out = lib[name](q=q, k=k, v=v)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


# attention over montecarlo draws of the keys (DRAWS of them)
MC_ATTENTION = """operator att {
    domain T = index
    input q : T -> R^4
    input k : T -> R^4
    input v : T -> R^3
    kernel a(t: T, s: T) = exp(dot(q(t), k(s)))
    output o(t: T) = integral(s: T) a(t, s) * v(s) with montecarlo(DRAWS) / integral(s: T) a(t, s) with montecarlo(DRAWS)
}"""


def _fused_calls(monkeypatch, what=lambda a, kw, out: out) -> list:
    """The calls of the fused kernel's runner (`_fused`) from here on, each recorded as
    `what(args, kwargs, answer)` (by default the answer: None where it left the call to the
    tiles); the kernel at every size (`FUSED_MIN_WORK` 0)."""
    import itdsl.runtime.strategies.attention as A
    monkeypatch.setattr(S, "FUSED_MIN_WORK", 0)
    calls = []
    kernel = A._fused

    def spy(*a, **kw):
        out = kernel(*a, **kw)
        calls.append(what(a, kw, out))
        return out
    monkeypatch.setattr(A, "_fused", spy)
    return calls


def _softmax_sums(A, B, V, causal, A2=None, B2=None):
    """(row max, Σ exp(s − max)·V, Σ exp(s − max)) by torch, from the scores as a matrix."""
    s = A @ B.transpose(1, 2)
    n, m = s.shape[-2:]
    i, j = torch.arange(n)[:, None], torch.arange(m)[None]
    if A2 is not None:
        s = torch.where(j <= i, s, A2 @ B2.transpose(1, 2))
    if causal:
        s = s.masked_fill(j > i - int(causal == "<"), -torch.inf)
    mx = s.amax(-1) if m else s.new_full((s.shape[0], n), -torch.inf)
    p = (s - mx.nan_to_num(neginf=0.0)[..., None]).exp()
    return mx, p @ V, p.sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal,split", [(None, False), ("<=", False), ("<", False),
                                          (None, True)])
@pytest.mark.parametrize("N,n,m,W,dv", [(2, 100, 100, 64, 64), (1, 300, 517, 7, 3),
                                        (1, 517, 300, 66, 20), (3, 1, 1, 5, 0),
                                        (2, 49, 257, 1, 17), (1, 2, 0, 4, 4)])
def test_the_fused_online_softmax_kernel(dtype, causal, split, N, n, m, W, dv):
    """The fused kernel (lowering/softmax.py) against torch's softmax sums of the scores as a
    matrix: row max, Σ exp(s − max)·v and Σ exp(s − max), over sizes that cross its tiles
    (48 rows, 256 columns) and leave them partly filled, widths not a multiple of its
    vectors, no values, no columns, rows with every column masked (j < i at i = 0: max
    -inf, sums 0), and the split score (one pair of factors on and below the diagonal,
    another above)."""
    import itdsl.runtime.strategies.attention as A
    if split and n != m:
        pytest.skip("a split score is over one domain")
    g = torch.Generator().manual_seed(n + m + W)
    A1, A2 = (torch.randn(N, n, W, generator=g, dtype=dtype) / 2 for _ in range(2))
    B1, B2 = (torch.randn(N, m, W, generator=g, dtype=dtype) / 2 for _ in range(2))
    V = torch.randn(N, m, dv, generator=g, dtype=dtype)
    more = (A2, B2) if split else ()
    got = A._fused(A1, B1, V, causal, *more)
    want = _softmax_sums(A1, B1, V, causal, *more)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        tol = {}
        if dtype == torch.float32:  # (sums of up to 517 terms: rounding relative to their size)
            size = b[b.isfinite()].abs().max() if b.isfinite().any() else 1.0
            tol = {"rtol": 1e-5, "atol": 1e-6 * float(size)}
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("name", ["attention", "causal_attention"])
@settings(max_examples=5, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 120), m=st.integers(1, 300), batch=st.sampled_from([(), (2,)]),
       seed=st.integers(0, 2**16))
def test_attention_by_the_fused_kernel_equals_the_reference(monkeypatch, name, n, m, batch,
                                                            seed):
    """Attention off SDPA on the CPU: the forward by the fused kernel, the backward by the
    tiles' flash backward from its row maxima; output and gradients are the reference's."""
    monkeypatch.setattr(S, "USE_SDPA", False)
    calls = _fused_calls(monkeypatch)
    lib, _, ref = _ops("attention.it", name)
    kw = _inputs(lib, n, n if name == "causal_attention" else m, batch,
                 torch.Generator().manual_seed(seed), scale=2.0)
    _check(lib, ref, kw)
    assert calls and all(c is not None for c in calls)  # (the kernel's answers)


def test_the_fused_kernel_leaves_nan_inf_and_huge_scores_to_the_tiles(monkeypatch):
    """An inf in the values, a NaN in a factor, or scores whose bound nears the dtype's range
    (here 2e38, with float32's largest 3.4e38): the tiles, which give torch's softmax
    values (NaN where torch's softmax has them; the one-hot row of the huge score)."""
    monkeypatch.setattr(S, "USE_SDPA", False)
    calls = _fused_calls(monkeypatch)  # the kernel's answers (None: left to the tiles)
    lib = itdsl.compile_file(EXAMPLES / "attention.it", target="cpu")["attention"]
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(20, 64, generator=g) for _ in range(3))
    lib(q=q, k=k, v=v)
    assert calls and calls[0] is not None
    for bad in ("v", "q", "huge"):
        qq, kk, vv = q.clone(), k.clone(), v.clone()
        if bad == "v":
            vv[3, 1] = torch.inf
        elif bad == "q":
            qq[2, 0] = torch.nan
        else:
            qq[0, 0], kk[0, 0] = 4e19, 4e19  # q·k / 8 = 2e38
        calls.clear()
        out = lib(q=qq, k=kk, v=vv)
        assert all(c is None for c in calls)
        want = torch.softmax(qq.double() @ kk.double().T / 8, -1) @ vv.double()
        torch.testing.assert_close(out, want.float(), equal_nan=True)


# (a score's elementwise part, its torch form from the offsets d = t − s, the param slope and
# b, one value per point; its mask)
PAIR_PARTS = [
    ("- slope * exp(-abs(t - s) / 4)", "* [abs(t - s) < 16]",
     lambda d, sl, bt, bs: -sl * (-d.abs() / 4).exp(), lambda d, bt, bs: d.abs() < 16),
    ("", "* [abs(t - s) < 5]", lambda d, sl, bt, bs: 0 * d, lambda d, bt, bs: d.abs() < 5),
    ("- slope * abs(t - s) * abs(t - s) * abs(t - s)", "",
     lambda d, sl, bt, bs: -sl * d.abs() ** 3, None),
    ("+ log(1 + slope * abs(t - s))", "* [s <= t]",
     lambda d, sl, bt, bs: (1 + sl * d.abs()).log(), lambda d, bt, bs: d >= 0),
    ("- b(s) * abs(t - s) + b(t)", "* [b(s) > -1]",
     lambda d, sl, bt, bs: -bs * d.abs() + bt, lambda d, bt, bs: bs > -1),
]


@pytest.mark.parametrize("rest,mask,term,keep", PAIR_PARTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_position_terms_and_masks_in_the_fused_kernel(monkeypatch, rest, mask, term, keep,
                                                      dtype):
    """A score's elementwise part (a position term, a mask; of coordinates, params and
    per-point inputs) evaluated per pair in the fused kernel: output and the gradients of q,
    b and the slope (the tiles' flash backward) against torch's softmax of the formula,
    over more than a tile of rows and columns."""
    calls = _fused_calls(monkeypatch, lambda a, kw, out: kw.get("pair"))
    src = f"""operator w {{
        domain T = index
        input  q : T -> R^6
        input  k : T -> R^6
        input  v : T -> R^3
        input  b : T -> R
        param  slope : R = 0.3
        kernel a(t: T, s: T) = exp(dot(q(t), k(s)) / 2 {rest}) {mask}
        output o(t: T) = integral(s: T) a(t, s) * v(s) / integral(s: T) a(t, s)
    }}"""
    op = itdsl.compile_source(src, target="cpu")["w"].to(dtype)
    n = 300
    g = torch.Generator().manual_seed(6)
    q, k = (torch.randn(2, n, 6, generator=g, dtype=dtype, requires_grad=True)
            for _ in range(2))
    v = torch.randn(2, n, 3, generator=g, dtype=dtype)
    b = torch.rand(2, n, generator=g, dtype=dtype, requires_grad=True)
    out = op(q=q, k=k, v=v, b=b)
    assert len(calls) == 1 and calls[0] is not None  # the fused kernel, with the part
    t = torch.arange(n, dtype=dtype)
    d, bt, bs = t[:, None] - t[None, :], b[:, :, None], b[:, None, :]
    score = q @ k.transpose(1, 2) / 2 + term(d, op.slope, bt, bs)
    if keep is not None:
        score = score.masked_fill(~keep(d, bt, bs), -torch.inf)
    want = torch.softmax(score, -1) @ v
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(out, want, **tol)
    ins = (q, b, op.slope)
    got = torch.autograd.grad(out.sum(), ins, allow_unused=True, materialize_grads=True)
    wants = torch.autograd.grad(want.sum(), ins, allow_unused=True, materialize_grads=True)
    for x, y in zip(got, wants, strict=True):
        torch.testing.assert_close(x, y, **({} if dtype == torch.float64 else
                                            {"rtol": 1e-3, "atol": 1e-4}))


def test_points_montecarlo_did_not_draw_stay_out_of_the_fused_kernel(monkeypatch):
    """montecarlo over the keys: the points not drawn have weight 0 and stay out of the max
    (`live`, a value per column the kernel reads); output and gradients are the softmax over
    the draws (repeated draws counted)."""
    calls = _fused_calls(monkeypatch, lambda a, kw, out: kw.get("pair"))
    src = MC_ATTENTION.replace("DRAWS", "40")
    n = 300
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(n, w, generator=g, dtype=D) for w in (4, 4, 3))
    idx = torch.randint(n, (40,), generator=torch.Generator().manual_seed(7))
    op = itdsl.compile_source(src, target="cpu")["att"].double()
    ql = q.clone().requires_grad_(True)
    out = op(q=ql, k=k, v=v, generator=torch.Generator().manual_seed(7))
    assert calls and calls[0] is not None and calls[0].live
    qw = q.clone().requires_grad_(True)
    want = torch.softmax(qw @ k[idx].T, -1) @ v[idx]
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), ql)[0],
                               torch.autograd.grad(want.sum(), qw)[0])


@pytest.mark.parametrize("n", [47, 300])
def test_the_padding_rows_do_not_flag_a_call(monkeypatch, n):
    """sqrt(t − s) is NaN above the diagonal, which the causal mask drops; the kernel's rows
    beyond n (padding to whole tiles of 48) keep columns the real rows do not, and their
    NaN must not send the call to the tiles."""
    ran = _fused_calls(monkeypatch)
    src = """operator w {
        domain T = index
        input  q : T -> R^4
        input  k : T -> R^4
        input  v : T -> R^2
        param  slope : R = 0.5
        kernel a(t: T, s: T) = exp(dot(q(t), k(s)) - slope * sqrt(t - s)) * [s <= t]
        output o(t: T) = integral(s: T) a(t, s) * v(s) / integral(s: T) a(t, s)
    }"""
    op = itdsl.compile_source(src, target="cpu")["w"].double()
    g = torch.Generator().manual_seed(8)
    q, k = (torch.randn(n, 4, generator=g, dtype=D) for _ in range(2))
    v = torch.randn(n, 2, generator=g, dtype=D)
    out = op(q=q, k=k, v=v)
    assert ran and ran[0] is not None  # the kernel's answer, not the tiles'
    t = torch.arange(n, dtype=D)
    d = t[:, None] - t[None, :]
    score = (q @ k.T - 0.5 * d.clamp_min(0).sqrt()).masked_fill(d < 0, -torch.inf)
    torch.testing.assert_close(out, torch.softmax(score, -1) @ v)


def test_large_position_terms_keep_their_gradients(monkeypatch):
    """A position term that makes scores large (exp(|t − s|/2) up to e^75): the backward
    recomputes the scores in torch against the row max, so one from the kernel (rounded
    otherwise, by about eps·|score|) would put NaN and inf in the gradients; the kernel
    flags such rows and the tiles run the call. Float32 against float64 torch."""
    ran = _fused_calls(monkeypatch)
    src = """operator w {
        domain T = index
        input  q : T -> R^4
        input  k : T -> R^4
        input  v : T -> R^2
        kernel a(t: T, s: T) = exp(dot(q(t), k(s)) + exp(abs(t - s) / 2)) * [abs(t - s) < 150]
        output o(t: T) = integral(s: T) a(t, s) * v(s) / integral(s: T) a(t, s)
    }"""
    op = itdsl.compile_source(src, target="cpu")["w"]
    n = 300
    g = torch.Generator().manual_seed(9)
    q, k = (torch.randn(n, 4, generator=g, dtype=D, requires_grad=True) for _ in range(2))
    v = torch.randn(n, 2, generator=g, dtype=D, requires_grad=True)
    qf, kf, vf = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    out = op(q=qf, k=kf, v=vf)
    assert ran and ran[0] is None  # flagged
    t = torch.arange(n, dtype=D)
    d = (t[:, None] - t[None, :]).abs()
    want = torch.softmax((q @ k.T + (d / 2).exp()).masked_fill(d >= 150, -torch.inf), -1) @ v
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    got = torch.autograd.grad(out.sum(), (qf, kf, vf))
    wants = torch.autograd.grad(want.sum(), (q, k, v))
    for x, y in zip(got, wants, strict=True):
        torch.testing.assert_close(x.double(), y, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("mask,width,keep", [
    ("[abs(t - s) < 40]", 39, lambda d: d.abs() < 40),
    ("[abs(s - t) <= 40.5]", 40, lambda d: d.abs() <= 40.5),
    ("[abs(t - s) < 300] * [s <= t + 7]", 299, lambda d: (d.abs() < 300) & (d >= -7)),
    ("[abs(t - s) < 0.5]", 0, lambda d: d == 0),
    ("[t - s < 40]", None, lambda d: d < 40),
])
def test_a_window_mask_skips_the_tiles_beyond_it(monkeypatch, mask, width, keep):
    """A window [abs(t − s) < c] on one index domain: the fused kernel reads only the column
    tiles within c of a row tile (its half-width passed as `band`; none where the mask has
    no abs window); output and gradients are torch's, at n = 700 (15 row tiles, 3 column
    tiles, the window crossing their edges)."""
    import itdsl.runtime.strategies.attention as A
    bands = _fused_calls(monkeypatch, lambda a, kw, out: kw.get("band"))
    src = f"""operator w {{
        domain T = index
        input  q : T -> R^4
        input  k : T -> R^4
        input  v : T -> R^2
        kernel a(t: T, s: T) = exp(dot(q(t), k(s))) * {mask}
        output o(t: T) = integral(s: T) a(t, s) * v(s) / integral(s: T) a(t, s)
    }}"""
    op = itdsl.compile_source(src, target="cpu")["w"].double()
    n = 700
    g = torch.Generator().manual_seed(10)
    q, k = (torch.randn(n, 4, generator=g, dtype=D, requires_grad=True) for _ in range(2))
    v = torch.randn(n, 2, generator=g, dtype=D)
    out = op(q=q, k=k, v=v)
    assert bands == [A.NO_BAND if width is None else width]
    t = torch.arange(n, dtype=D)
    want = torch.softmax((q @ k.T).masked_fill(~keep(t[:, None] - t[None, :]), -torch.inf),
                         -1) @ v
    torch.testing.assert_close(out, want)
    got = torch.autograd.grad(out.sum(), (q, k))
    wants = torch.autograd.grad(want.sum(), (q, k))
    for x, y in zip(got, wants, strict=True):
        torch.testing.assert_close(x, y)


def test_a_nan_from_the_position_term_goes_to_the_tiles(monkeypatch):
    """log(slope·(t − s)) is NaN below the diagonal: the kernel flags the rows and the call
    runs on the tiles, which give torch's NaN rows; a term of a vector of pairs (not a
    scalar function of per-point values) never reaches the kernel."""
    src = """operator w {
        domain T = index
        input  q : T -> R^4
        input  k : T -> R^4
        input  v : T -> R^2
        param  slope : R = 0.5
        kernel a(t: T, s: T) = exp(dot(q(t), k(s)) + log(slope * (s - t)))
        output o(t: T) = integral(s: T) a(t, s) * v(s) / integral(s: T) a(t, s)
    }"""
    op = itdsl.compile_source(src, target="cpu")["w"]
    n = 60
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(n, 4, generator=g) for _ in range(2))
    v = torch.randn(n, 2, generator=g)
    calls = _fused_calls(monkeypatch)  # the kernel's answers (None: left to the tiles)
    out = op(q=q, k=k, v=v)
    assert calls  # tried, flagged
    t = torch.arange(n, dtype=torch.float32)
    want = torch.softmax(q @ k.T + (0.5 * (t[None, :] - t[:, None])).log(), -1) @ v
    torch.testing.assert_close(out, want, equal_nan=True, rtol=1e-4, atol=1e-5)
    assert torch.isnan(out[1:]).all() and not torch.isnan(out[0]).any()
    from itdsl.lowering.softmax import PairPart
    from itdsl.symbolic import pexpr as P
    x, y = P.coord("x", "t", (2,)), P.coord("y0", "s", (2,))
    assert PairPart.of(P.dot(x, y), None, "x", "y0", False) is None


TABLE_KINDS = ("attention", "recurrence", "convolution", "lowrank")


def _table():
    from test_recognize import CASES
    return [(c[0], c[1], c[2]) for c in CASES if c[2] in TABLE_KINDS]


@pytest.mark.parametrize("name,source,strategy", _table(), ids=[c[0] for c in _table()])
def test_table_kernels(small_tiles, name, source, strategy):
    """Every kernel of the recogniser's table with one of these strategies: its algorithm
    (or, for the few forms it does not take, the dense kernels) equals the reference."""
    text = "operator k {\n" + source + "\n}\n"
    lib = itdsl.compile_source(text, target="cpu")["k"].double()
    ref = itdsl.compile_source(text, target="reference")["k"].double()
    ref.load_state_dict(lib.state_dict())
    assert lib.plan.verdict.strategy == strategy
    # the strategy that runs: the recognised one, or dense where its algorithm does not take
    # the form (and the Plan says so)
    assert lib.strategy == strategy or (lib.strategy == "dense" and lib.plan.notes)
    from util import random_inputs
    inputs = random_inputs(load_source(text)["k"], sizes=(19, 23, 7))
    tensors = [v.requires_grad_(True) for v in inputs.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point()]
    out, want = lib(**inputs), ref(**inputs)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
    dout = torch.randn(out.shape, dtype=D)
    got = torch.autograd.grad(out, tensors + list(lib.parameters()), dout, allow_unused=True)
    exp = torch.autograd.grad(want, tensors + list(ref.parameters()), dout, allow_unused=True)
    for a, b in zip(got, exp):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_most_table_kernels_take_their_algorithm():
    """The forms left to the dense kernels are the ones named here (and explain says so)."""
    dense = set()
    for name, source, _ in _table():
        prog = itdsl.compile_source("operator k {\n" + source + "\n}\n", target="cpu")
        if prog["k"]._runner is None:
            dense.add(name)
            assert prog["k"].strategy == "dense"
            assert "its algorithm does not take this form" in prog.explain("k")
    assert dense == {"attn-two-exp-factors", "cumsum-spelled-otherwise", "derivative-fallback",
                     "cos-points1", "cos-sum-points3", "poly4-width8"}, dense


# ---- long sequences ------------------------------------------------------------------------


def test_ema_is_stable_for_a_hundred_thousand_steps():
    """T = 10⁵ in float32, fast and slow decays: finite, and equal to the recurrence
    y_t = λ y_{t-1} + f_t run step by step in float64."""
    op = itdsl.compile_file(EXAMPLES / "ema.it", target="cpu")["ema"]
    with torch.no_grad():
        op.a.copy_(torch.linspace(-9.0, 6.0, 16))  # softplus(a): 1e-4 .. 6
    T = 100_000
    f = torch.randn(T, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = op(f=f)
    assert torch.isfinite(out).all()
    lam = np.exp(-np.log1p(np.exp(op.a.detach().double().numpy())))
    y, want = np.zeros(16), np.empty((T, 16))
    fn = f.double().numpy()
    for t in range(T):
        y = lam * y + fn[t]
        want[t] = y
    np.testing.assert_allclose(out.double().numpy(), want, rtol=2e-3, atol=2e-3)


def test_causal_linear_attention_is_stable_for_a_hundred_thousand_steps():
    src = (EXAMPLES / "linear_attention.it").read_text().replace("R^32", "R^4")
    op = itdsl.compile_source(src, target="cpu")["causal_linear_attention"]
    T = 100_000
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(T, 4, generator=g) for _ in range(3))
    with torch.no_grad():
        out = op(q=q, k=k, v=v)
    assert torch.isfinite(out).all()
    phi, psi = torch.nn.functional.softplus(q.double()), torch.nn.functional.softplus(k.double())
    state = torch.cumsum(psi[:, :, None] * v.double()[:, None, :], 0)  # [T, 4, 4]
    want = (torch.einsum("tr,trc->tc", phi, state)
            / torch.einsum("tr,tr->t", phi, torch.cumsum(psi, 0))[:, None])
    torch.testing.assert_close(out.double(), want, rtol=1e-3, atol=1e-4)


def test_scan_never_forms_a_growing_exponential():
    """A decay of 50 per step over 10⁴ steps: exp(50·t) would overflow at t = 2."""
    u = torch.randn(10_000, 3, dtype=torch.float32, generator=torch.Generator().manual_seed(4))
    r = torch.tensor([-50.0, -1e-3, 0.0])
    y = decay_scan(u, r, chunk=16)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, 0], u[:, 0], rtol=1e-5, atol=1e-5)  # only the step itself
    torch.testing.assert_close(y[:, 2], torch.cumsum(u[:, 2], 0), rtol=1e-4, atol=1e-3)
    want = torch.zeros(3)
    lam = torch.exp(r)
    for t in range(200):  # the start, step by step (float32 sums of up to 200 terms of
        want = lam * want + u[t]  # size 1: rounding of a few 1e-5 near a cancellation)
        torch.testing.assert_close(y[t], want, rtol=1e-5, atol=5e-5)


def test_convolution_by_fft_equals_direct(monkeypatch):
    lib, _, ref = _ops("bump_conv.it", "bump_conv")
    kw = _inputs(lib, 202, 202, (2,), torch.Generator().manual_seed(6))  # no point on the edge
    assert lib._runner.form[0].half_width == 0.2  # 2·41 + 1 = 83 taps <= DIRECT_TAPS: direct
    direct = lib(**kw)
    monkeypatch.setattr(S, "DIRECT_TAPS", 3)
    fft = _check(lib, ref, kw)
    torch.testing.assert_close(fft, direct, rtol=1e-9, atol=1e-12)


def test_global_convolution_runs_by_fft():
    text = """operator k {
        domain T = grid(0, 1)
        input f : T -> R^3
        param s : R = 0.3
        kernel g(t: T, u: T) = exp(-(t - u)^2 / (2 * s^2)) * cos(7 * (t - u))
        output o(t: T) = integral(u: T) g(t, u) * f(u) with simpson
    }"""
    lib = itdsl.compile_source(text, target="cpu")["k"].double()
    ref = itdsl.compile_source(text, target="reference")["k"].double()
    ref.load_state_dict(lib.state_dict())
    assert lib.strategy == "convolution" and lib._runner.form[0].half_width is None
    kw = {"f": torch.randn(2, 257, 3, dtype=D)}
    _check(lib, ref, kw)


def test_fft_convolution_near_the_float32_range():
    """Taps exp(0.85·d) up to 3e36 on 100 points: every output is finite (up to 1e37), but
    the FFT's sums of unscaled float32 signals reach past 3.4e38 (NaN before each signal was
    scaled by a power of 2). Against the float64 reference."""
    text = """operator grow {
        domain T = index
        input  f : T -> R^2
        param  a : R = 0.85
        output o(x: T) = integral(y: T) exp(a * (x - y)) * f(y)
    }"""
    f = torch.randn(100, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    want = itdsl.compile_source(text, target="reference")["grow"].double()(f=f)
    op = itdsl.compile_source(text, target="cpu")["grow"]
    got = op(f=f.float())
    assert op.last_run == "convolution" and op._runner.form[0].half_width is None  # the FFT
    assert want.abs().max() > 1e36
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6 * want.abs().max().item())


def test_lowrank_memory_is_linear():
    """linear_attention at n = m = 20,000 in float64 would need 3.2 GB for one n×m matrix."""
    lib, _, _ = _ops("linear_attention.it", "linear_attention")
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(20_000, 32, generator=g, dtype=D) for _ in range(3))
    with torch.no_grad():
        out = lib(q=q, k=k, v=v)
    phi, psi = torch.nn.functional.softplus(q), torch.nn.functional.softplus(k)
    want = (phi @ (psi.T @ v)) / (phi @ psi.sum(0))[:, None]
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)


def test_attention_relative_position_params_get_gradients(small_tiles):
    text = """operator k {
        domain T = index
        input q : T -> R^8
        input k : T -> R^8
        input v : T -> R^8
        param slope : R = 0.3
        kernel a(t: T, s: T) = exp(dot(q(t), k(s)) / 4 - slope * abs(t - s - 3)) * [s <= t]
        output o(t: T) = integral(s: T) a(t, s) * v(s) / integral(s: T) a(t, s)
    }"""  # (|t − s − 3| changes sign under the mask: a position term per tile)
    lib = itdsl.compile_source(text, target="cpu")["k"].double()
    ref = itdsl.compile_source(text, target="reference")["k"].double()
    assert lib._runner is not None and lib._runner.form.rest is not None
    kw = _inputs(lib, 29, 29, (2,), torch.Generator().manual_seed(8))
    _check(lib, ref, kw)
    assert gradcheck_op(lib, _inputs(lib, 10, 10, (), torch.Generator().manual_seed(9)))


def test_cuda_target_needs_cuda_tensors():
    if torch.cuda.is_available():  # pragma: no cover - not on these machines
        pytest.skip("a GPU is present")
    op = itdsl.compile_file(EXAMPLES / "attention.it", target="cuda")["attention"]
    with pytest.raises(itdsl.LoweringError, match="no CUDA device"):
        op(q=torch.randn(5, 64), k=torch.randn(6, 64), v=torch.randn(6, 64))


def test_a_row_with_every_score_masked():
    """A strict causal mask leaves the first row nothing: 0/0 there, as in the reference;
    the other rows, and their gradients, equal a plain masked softmax (the reference's own
    autograd and the dense kernels let that row's NaN into some gradients; this does not)."""
    text = """operator k {
        domain T = index
        input q : T -> R^4
        input k : T -> R^4
        input v : T -> R^4
        kernel a(t: T, s: T) = exp(dot(q(t), k(s))) * [s < t]
        output o(t: T) = integral(s: T) a(t, s) * v(s) / integral(s: T) a(t, s)
    }"""
    lib = itdsl.compile_source(text, target="cpu")["k"].double()
    assert lib._runner is not None and lib._runner.form.causal == "<"
    kw = _inputs(lib, 9, 9, (), torch.Generator().manual_seed(10))
    for t in kw.values():
        t.requires_grad_(True)
    q, k, v = kw["q"], kw["k"], kw["v"]
    keep = torch.ones(9, 9, dtype=torch.bool).tril(-1)[1:]
    want = torch.softmax((q[1:] @ k.T).masked_fill(~keep, -torch.inf), -1) @ v
    out = lib(**kw)
    assert torch.isnan(out[0]).all()
    torch.testing.assert_close(out[1:], want, rtol=1e-9, atol=1e-10)
    got = torch.autograd.grad(out[1:].sum(), [q, k, v])
    exp = torch.autograd.grad(want.sum(), [q, k, v])
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


RATIO = """operator k {
    domain T = %s
    input q : T -> R^4
    input k : T -> R^4
    input v : T -> R^4
    kernel a(t: T, s: T) = exp(dot(q(t), k(s)) / 2) * %s
    output o(t: T) = integral(s: T) a(t, s) * %s %s / integral(s: T) a(t, s) %s
}"""


@pytest.mark.parametrize("sdpa", [True, False])
def test_values_hoisted_after_the_max_step(monkeypatch, sdpa):
    """Per-point steps of the values (`tanh(v(s))`) come after the max step in the Plan:
    the sums are computed where they are all ready."""
    monkeypatch.setattr(S, "USE_SDPA", sdpa)
    for mask in ("1", "[s <= t]"):
        text = RATIO % ("index", mask, "tanh(v(s)) * exp(sum(k(s)))", "", "")
        lib = itdsl.compile_source(text, target="cpu")["k"].double()
        ref = itdsl.compile_source(text, target="reference")["k"].double()
        assert lib._runner is not None
        _check(lib, ref, _inputs(lib, 13, 13, (2,), torch.Generator().manual_seed(13)))


def test_causal_bracket_over_gauss_nodes_is_not_a_position_mask():
    """y on Gauss nodes: [s <= t] compares coordinates, not positions (evaluated per tile)."""
    text = """operator k {
        domain T = grid(0, 1)
        input q : T -> R
        kernel a(t: T, s: T) = exp(q(t) * s) * [s <= t]
        output o(t: T) = integral(s: T) a(t, s) * cos(3 * s) with gauss(5) / integral(s: T) a(t, s) with gauss(5)
    }"""
    lib = itdsl.compile_source(text, target="cpu")["k"].double()
    ref = itdsl.compile_source(text, target="reference")["k"].double()
    assert lib._runner is not None and lib._runner.form.causal is None
    q = torch.randn(9, dtype=D, generator=torch.Generator().manual_seed(14))
    out, want = lib(q=q), ref(q=q)
    assert torch.isnan(want[0]) and torch.isnan(out[0])  # no node below t = 0
    torch.testing.assert_close(out[1:], want[1:], rtol=1e-9, atol=1e-10)


def test_point_coordinates_in_a_position_term_get_their_gradient():
    text = """operator k {
        domain X = points(2)
        domain Y = points(2)
        input q : X -> R^4
        input k : Y -> R^4
        input v : Y -> R^4
        kernel a(x: X, y: Y) = exp(dot(q(x), k(y)) - sqrt(sum((x - y)^2) + 1))
        output o(x: X) = integral(y: Y) a(x, y) * v(y) / integral(y: Y) a(x, y)
    }"""
    lib = itdsl.compile_source(text, target="cpu")["k"].double()
    ref = itdsl.compile_source(text, target="reference")["k"].double()
    g = torch.Generator().manual_seed(15)
    kw = {"X": torch.rand(7, 2, dtype=D, generator=g), "Y": torch.rand(9, 2, dtype=D, generator=g)}
    kw.update(q=torch.randn(7, 4, dtype=D, generator=g), k=torch.randn(9, 4, dtype=D, generator=g),
              v=torch.randn(9, 4, dtype=D, generator=g))
    _check(lib, ref, kw)


@pytest.mark.parametrize("mask", ["1", "[s <= t]"])
def test_montecarlo_draws_follow_the_generator(mask):
    text = RATIO % ("index", mask, "v(s)", "with montecarlo(6)", "with montecarlo(6)")
    lib = itdsl.compile_source(text, target="cpu")["k"].double()
    ref = itdsl.compile_source(text, target="reference")["k"].double()
    assert lib._runner is not None
    kw = _inputs(lib, 12, 12, (), torch.Generator().manual_seed(16))
    outs = [op(generator=torch.Generator().manual_seed(0), **kw) for op in (lib, lib, ref)]
    assert outs[0].equal(outs[1])
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-9, atol=1e-10)


def test_scans_cross_chunks_and_segments_with_gradients(small_tiles):
    """n = 70 with chunks of 4 and segments of 3 chunks: many of both, forward and
    gradients against the reference."""
    for name in ("causal_linear_attention", "ema"):
        lib, _, ref = _ops("linear_attention.it" if name != "ema" else "ema.it", name)
        _check(lib, ref, _inputs(lib, 70, 70, (2,), torch.Generator().manual_seed(17)))


@pytest.mark.parametrize("sdpa", [True, False])
def test_torch_compile_fullgraph_over_the_strategies(monkeypatch, sdpa):
    """The strategies are plain torch (and one autograd.Function): torch.compile traces them
    whole, forward and backward."""
    monkeypatch.setattr(S, "USE_SDPA", sdpa)
    att = itdsl.compile_file(EXAMPLES / "attention.it", target="cpu")["causal_attention"]
    lin = itdsl.compile_file(EXAMPLES / "linear_attention.it", target="cpu")[
        "causal_linear_attention"]
    conv = itdsl.compile_file(EXAMPLES / "bump_conv.it", target="cpu")["bump_conv"]
    ema = itdsl.compile_file(EXAMPLES / "ema.it", target="cpu")["ema"]

    def f(q, k, v, x):
        return (att(q=q, k=k, v=v).sum() + lin(q=q[..., :32], k=k[..., :32], v=v[..., :32]).sum()
                + conv(f=x).sum() + ema(f=x.repeat(1, 1, 2)).sum())

    g = torch.Generator().manual_seed(18)
    q, k, v = (torch.randn(2, 70, 64, generator=g, requires_grad=True) for _ in range(3))
    x = torch.randn(2, 50, 8, generator=g, requires_grad=True)
    eager = f(q, k, v, x)
    want = torch.autograd.grad(eager, [q, x])
    out = torch.compile(f, fullgraph=True)(q, k, v, x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-3)
    for a, b in zip(torch.autograd.grad(out, [q, x]), want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_second_derivatives_through_the_own_tiles_raise(small_tiles):
    """Not implemented, so an error, never silent numbers."""
    lib, _, _ = _ops("attention.it", "causal_attention")
    kw = _inputs(lib, 9, 9, (), torch.Generator().manual_seed(19))
    q = kw["q"].requires_grad_(True)
    with pytest.raises(itdsl.UnsupportedError, match="second derivatives"):
        torch.autograd.grad(lib(**kw).square().sum(), [q], create_graph=True)


@pytest.mark.parametrize("n", [11, 21, 101, 151])
def test_bracket_edges_on_grid_points_decide_pair_by_pair(n):
    """[abs(t − s) < 0.1] on grid(0, 1) with n − 1 a multiple of 10: the edge falls on grid
    points and each pair's t − s rounds on its own. The convolution agrees with the reference
    and the dense kernels pair by pair, forward and gradients."""
    text = """operator c {
        domain T = grid(0, 1)
        input f : T -> R^2
        param w : R = 0.3
        output g(t: T) = integral(s: T) [abs(t - s) < 0.1] * f(s) with sum
            + integral(s: T) exp(-w * (t - s)^2) * [t - s >= -0.2] * [t - s < 0.3] * f(s)
    }"""
    ops = {k: itdsl.compile_source(text, target=t, strategy=s)["c"].double()
           for k, t, s in (("conv", "cpu", None), ("ref", "reference", None),
                           ("dense", "cpu", "dense"))}
    assert ops["conv"].strategy == "convolution" and ops["conv"].plan.form[0].edges
    for op in ops.values():
        op.load_state_dict(ops["conv"].state_dict())
    f = torch.randn(3, n, 2, dtype=D)
    outs, grads = {}, {}
    for k, op in ops.items():
        x = f.clone().requires_grad_(True)
        outs[k] = op(f=x)
        grads[k], = torch.autograd.grad(outs[k].square().sum(), x)
    assert ops["conv"].last_run == "convolution"
    for k in ("ref", "dense"):
        torch.testing.assert_close(outs["conv"], outs[k], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads["conv"], grads[k], rtol=1e-12, atol=1e-12)


ALIBI_SDPA = """operator alibi {
    domain T = index
    input  q : T -> R^WQ
    input  k : T -> R^WQ
    input  v : T -> R^WV
    param  slope : R = 0.25
    kernel a(t: T, s: T) = exp(dot(q(t), k(s)) / 2 - slope * (t - s))MASK
    output o(t: T) = integral(s: T) a(t, s) * v(s) / integral(s: T) a(t, s)
}
"""



def _alibi(bias: str, mask: str, per_point: bool = False):
    """(compiled for the CPU, reference) of ALIBI_SDPA with q, k of width 4 and v of 3, the
    position term `bias` and the factor `mask`; with `per_point`, an input b : T -> R in
    place of the param slope. Neither cast: the caller picks the dtype."""
    src = ALIBI_SDPA.replace("WQ", "4").replace("WV", "3")
    if per_point:
        src = src.replace("    param  slope : R = 0.25", "    input  b : T -> R")
    src = src.replace("slope * (t - s)", bias).replace("MASK", mask)
    return (itdsl.compile_source(src, target="cpu")["alibi"],
            itdsl.compile_source(src, target="reference")["alibi"])

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("wq,wv", [(8, 8), (4, 12), (12, 4)])
@pytest.mark.parametrize("fused", [False, True])
def test_separable_position_terms_and_unequal_widths_run_by_sdpa(monkeypatch, causal, wq, wv,
                                                                 fused):
    """ALiBi's linear bias slope·(s − t) separates into two more columns of the scores'
    factors, so the score is all GEMM and torch's SDPA runs it (with the factors or the
    values padded with zero columns to one width, which its fast CPU kernel wants), or,
    without the mask (`fused`), the fused kernel the forward (on the factors' wq + 2 columns
    and the values' wv, no padding) and SDPA's flash backward the gradients; the output and
    the gradients of q, k, v and the slope are a plain torch softmax's."""
    import itdsl.runtime.strategies.attention as A
    src = (ALIBI_SDPA.replace("WQ", str(wq)).replace("WV", str(wv))
           .replace("MASK", " * [s <= t]" if causal else ""))
    op = itdsl.compile_source(src, target="cpu")["alibi"].double()
    assert op._runner.form.sdpa and op._runner.form.rest is None
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[-1], v.shape[-1]))
        return sdpa(q, k, v, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(S, "USE_FUSED", fused)
    monkeypatch.setattr(S, "FUSED_MIN_WORK", 0)
    kernel = A._fused
    monkeypatch.setattr(A, "_fused", lambda *a, **kw: calls.append(
        ("fused", a[0].shape[-1], a[2].shape[-1])) or kernel(*a, **kw))
    g = torch.Generator().manual_seed(5)
    n = 23
    q, k = (torch.randn(2, n, wq, generator=g, dtype=D, requires_grad=True) for _ in range(2))
    v = torch.randn(2, n, wv, generator=g, dtype=D, requires_grad=True)
    out = op(q=q, k=k, v=v)
    if fused and not causal:
        assert calls == [("fused", wq + 2, wv)]
    else:
        assert calls and calls[0][0] == calls[0][1]  # one width: the fast kernel
    t = torch.arange(n, dtype=D)
    slope = op.slope
    score = q @ k.transpose(1, 2) / 2 - slope * (t[:, None] - t[None, :])
    if causal:
        score = score.masked_fill(t[None, :] > t[:, None], -torch.inf)
    want = torch.softmax(score, -1) @ v
    torch.testing.assert_close(out, want)
    g_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, slope), g_out)
    wants = torch.autograd.grad(want, (q, k, v, slope), g_out)
    for a, b in zip(got, wants, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bias,mask,sdpa", [
    ("abs(t - s)", "[s <= t]", True), ("abs(2 * (s - t)) / 3", "[t >= s]", True),
    ("relu(t - s) + 5 * relu(s - t)", "[s <= t]", False),  # (relu(s − t), 0 here, stays)
    ("abs(t - s)", "[s < t]", False),  # (strict: the own tiles, but no position term per tile)
    ("abs(t - s)", "", False), ("abs(slope * (t - s))", "[s <= t]", False)])
def test_a_causal_mask_makes_an_absolute_position_term_linear(bias, mask, sdpa):
    """Under [s <= t], ALiBi's slope·|t − s| is slope·(t − s) (and relu(t − s) is t − s):
    the score separates, so SDPA runs the causal form; without a mask, where the sign is not
    fixed by the mask alone (the slope may be negative), or where the term would become 0
    (relu(s − t): folding it away would drop what it multiplies), the term stays per tile.
    Output and the gradients of q, k, v and the slope are a plain torch softmax of the
    formula as written."""
    src = (ALIBI_SDPA.replace("WQ", "6").replace("WV", "5").replace("slope * (t - s)", "(BIAS)")
           .replace("BIAS", "slope * " + bias if "slope" not in bias else bias)
           .replace("MASK", f" * {mask}" if mask else ""))
    op = itdsl.compile_source(src, target="cpu")["alibi"].double()
    form, strict = op._runner.form, mask == "[s < t]"
    assert form.sdpa is sdpa and (form.rest is None) is (sdpa or strict)
    said = "taken as linear in the positions" in itdsl.compile_source(src).explain("alibi")
    assert said is bool(form.linearised) and said is (mask != "" and "slope *" not in bias)
    g = torch.Generator().manual_seed(11)
    n = 19
    q, k = (torch.randn(2, n, 6, generator=g, dtype=D, requires_grad=True) for _ in range(2))
    v = torch.randn(2, n, 5, generator=g, dtype=D, requires_grad=True)
    out = op(q=q, k=k, v=v)
    t = torch.arange(n, dtype=D)
    d, slope = t[:, None] - t[None, :], op.slope
    pos = {"abs(t - s)": slope * d.abs(), "abs(2 * (s - t)) / 3": slope * (2 * -d).abs() / 3,
           "relu(t - s) + 5 * relu(s - t)": slope * d.relu() + 5 * (-d).relu(),
           "abs(slope * (t - s))": (slope * d).abs()}[bias]
    S = q @ k.transpose(1, 2) / 2 - pos
    if mask:
        S = S.masked_fill(t[None, :] > t[:, None] - int(strict), -torch.inf)
    rows = slice(1 if strict else 0, None)  # (a strict mask keeps nothing of the first row)
    want = torch.softmax(S[:, rows], -1) @ v
    torch.testing.assert_close(out[:, rows], want)
    assert not strict or out[:, 0].isnan().all()  # 0/0, as torch's softmax gives
    g_out = torch.randn_like(want)
    got = torch.autograd.grad(out[:, rows], (q, k, v, slope), g_out)
    wants = torch.autograd.grad(want, (q, k, v, slope), g_out)
    for a, b in zip(got, wants, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("pos", ["exp(-abs(t - s))", "exp(s - t)", "sqrt(abs(t - s))",
                                 "log(1 + relu(t - s))", "exp(s * s / 100 - t * t / 100)",
                                 "abs(t - s) * abs(t - s)", "relu(s - t)"])
def test_position_terms_that_stay_per_tile_under_a_causal_mask(pos):
    """A causal mask makes |t − s| linear only in a linear context, where the summand then
    separates into columns that stay in range: exp(−|t − s|) is not taken as exp(s)·exp(−t)
    (each factor overflows past s ≈ 88 in float32, and 0·inf gave NaN from the 89th row on;
    nor exp(s²/100)·exp(−t²/100), whose coordinates hoisting moved into point steps),
    sqrt(|t − s|) stays as written (sqrt(t − s) is NaN at the masked pairs, and the slope's
    gradient took it in), |t − s|² is not taken as columns t², ts, s² (float32 rounding of
    eps·n²), and slope·relu(s − t), 0 under the mask, is not dropped (the slope's gradient is
    0, not missing). Output and the gradients of q and the slope, in float32 at n = 120 and
    float64 at n = 9, against torch's softmax of the formula as written."""
    for dtype, n in ((torch.float32, 120), (D, 9)):
        op = _alibi(f"slope * {pos}", " * [s <= t]")[0].to(dtype)
        assert not op._runner.form.linearised and op._runner.form.rest is not None
        g = torch.Generator().manual_seed(2)
        q, k, v = (torch.randn(n, w, generator=g, dtype=D) for w in (4, 4, 3))
        q.requires_grad_(True)
        out = op(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype))
        got = torch.autograd.grad(out.sum(), (q, op.slope))
        t = torch.arange(n, dtype=D)
        d = t[:, None] - t[None, :]
        slope = op.slope.detach().double().requires_grad_(True)
        term = {"exp(-abs(t - s))": (-d.abs()).exp(), "exp(s - t)": (-d).exp(),
                "sqrt(abs(t - s))": d.abs().sqrt(), "log(1 + relu(t - s))": d.relu().log1p(),
                "exp(s * s / 100 - t * t / 100)": ((t[None] ** 2 - t[:, None] ** 2) / 100).exp(),
                "abs(t - s) * abs(t - s)": d.abs() ** 2, "relu(s - t)": (-d).relu()}[pos]
        S = (q @ k.T / 2 - slope * term).masked_fill(d < 0, -torch.inf)
        want = torch.softmax(S, -1) @ v
        wants = torch.autograd.grad(want.sum(), (q, slope))
        tol = {} if dtype == D else {"rtol": 1e-4, "atol": 1e-5}
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), want.detach(), **tol)
        # (the slope's gradient of exp(s − t) in float32 is NaN, in torch too: its factor
        # exp(s − t) overflows at the masked pairs, times their gradient 0)
        check = 1 if pos.startswith("exp(s") and dtype == torch.float32 else 2
        for a, b in zip(got[:check], wants[:check], strict=True):
            torch.testing.assert_close(a.double(), b, **tol)


SPLIT = {"abs(t - s)": lambda d: d.abs(), "abs(2 * (s - t)) / 3": lambda d: (2 * d).abs() / 3,
         "abs(t - s) - (t - s) / 10": lambda d: d.abs() - d / 10}


@pytest.mark.parametrize("bias", list(SPLIT))
@pytest.mark.parametrize("lead", [(), (2, 3)])
@pytest.mark.parametrize("fused", [True, False])
def test_a_position_term_signed_on_each_side_of_the_diagonal_runs_as_two_sdpa_calls(
        monkeypatch, bias, lead, fused):
    """No mask, slope·|t − s|: below and on the diagonal it is slope·(t − s), above it
    slope·(s − t), each separating into columns of q and k. The forward: the fused kernel
    with each side's factors (`fused`), or SDPA's flash kernel on the two parts (causally,
    and on the reversed points) merged by their log-sum-exps; the backward of each part is
    the flash backward given the merged output and log-sum-exp. Output and the gradients of
    q, k, v and the slope against torch's softmax of the formula as written, at 1 point (no
    part above the diagonal), 2, and more than a tile of rows (the fused kernel's 48, its
    columns' 256)."""
    import itdsl.runtime.strategies.attention as A
    src = (ALIBI_SDPA.replace("WQ", "6").replace("WV", "5")
           .replace("slope * (t - s)", f"slope * ({bias})").replace("MASK", ""))
    op = itdsl.compile_source(src, target="cpu")["alibi"].double()
    form = op._runner.form
    assert form.split_sdpa and not form.sdpa and form.rest is not None
    assert "twice" in itdsl.compile_source(src).explain("alibi")
    calls = []
    split = A._Flash.apply
    monkeypatch.setattr(A._Flash, "apply", lambda *a: calls.append(1) or split(*a))
    kernel = A._fused
    monkeypatch.setattr(A, "_fused", lambda *a, **kw: calls.append(2) or kernel(*a, **kw))
    monkeypatch.setattr(S, "ROWS", 16)  # (were the own tiles to run: several tiles of rows)
    monkeypatch.setattr(S, "USE_FUSED", fused)
    monkeypatch.setattr(S, "FUSED_MIN_WORK", 0)
    g = torch.Generator().manual_seed(12)
    for n in (1, 2, 40, 300):
        q, k = (torch.randn(*lead, n, 6, generator=g, dtype=D, requires_grad=True)
                for _ in range(2))
        v = torch.randn(*lead, n, 5, generator=g, dtype=D, requires_grad=True)
        calls.clear()
        out = op(q=q, k=k, v=v)
        assert calls == ([1, 2] if fused else [1])
        t = torch.arange(n, dtype=D)
        S_ = q @ k.transpose(-1, -2) / 2 - op.slope * SPLIT[bias](t[:, None] - t[None, :])
        want = torch.softmax(S_, -1) @ v
        torch.testing.assert_close(out, want)
        g_out = torch.randn(want.shape, generator=g, dtype=D)
        got = torch.autograd.grad(out, (q, k, v, op.slope), g_out)
        wants = torch.autograd.grad(want, (q, k, v, op.slope), g_out)
        for a, b in zip(got, wants, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bias", ["slope * relu(t - s) + relu(s - t)", "abs(slope * (t - s))",
                                  "slope * exp(-abs(t - s))", "slope * abs(t - s) * abs(t - s)"])
def test_position_terms_not_split_at_the_diagonal(bias):
    """Split only where each side makes the term linear: relu(t − s) is 0 above the diagonal
    (never folded away), the sign of slope·(t − s) is unknown, exp and a product of two
    differences are not linear. These run on the own tiles, the term per tile."""
    op = _alibi(f"({bias})", "")[0].double()
    assert op._runner.form.split is None and op._runner.form.rest is not None
    n = 9
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(n, w, generator=g, dtype=D) for w in (4, 4, 3))
    t = torch.arange(n, dtype=D)
    d = (t[:, None] - t[None, :]).double()
    slope = op.slope.detach()
    term = {"slope * relu(t - s) + relu(s - t)": slope * d.relu() + (-d).relu(),
            "abs(slope * (t - s))": (slope * d).abs(),
            "slope * exp(-abs(t - s))": slope * (-d.abs()).exp(),
            "slope * abs(t - s) * abs(t - s)": slope * d.abs() ** 2}[bias]
    want = torch.softmax(q @ k.T / 2 - term, -1) @ v
    torch.testing.assert_close(op(q=q, k=k, v=v), want)


def test_split_sdpa_float32_inf_and_second_derivatives():
    """float32: the columns hold slope·t and slope·s, so scores round to about
    eps·slope·n (the README's caveat for position columns); an inf in q sends the call to
    the own tiles (torch's NaN rows, not SDPA's answer); a second derivative is refused."""
    import itdsl.runtime.strategies.attention as A
    src = (ALIBI_SDPA.replace("WQ", "8").replace("WV", "8")
           .replace("slope * (t - s)", "slope * abs(t - s)").replace("MASK", ""))
    op = itdsl.compile_source(src, target="cpu")["alibi"]
    n = 300
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, n, 8, generator=g, dtype=D) for _ in range(3))
    t = torch.arange(n, dtype=D)
    want = torch.softmax(q @ k.transpose(1, 2) / 2 - 0.25 * (t[:, None] - t[None, :]).abs(),
                         -1) @ v
    out = op(q=q.float(), k=k.float(), v=v.float())
    torch.testing.assert_close(out.double(), want, rtol=0, atol=4e-7 * 0.25 * n)
    q[0, 3, 0] = torch.inf
    calls = []
    split = A._Flash.apply
    A._Flash.apply = lambda *a: calls.append(1) or split(*a)
    try:
        got = op.double()(q=q, k=k, v=v)
    finally:
        A._Flash.apply = split
    assert not calls
    ref = itdsl.compile_source(src, target="reference")["alibi"].double()
    torch.testing.assert_close(got, ref(q=q, k=k, v=v), equal_nan=True)
    qq = q[:, :5].clone().nan_to_num(posinf=1.0).requires_grad_(True)
    out = op(q=qq, k=k[:, :5], v=v[:, :5])
    with pytest.raises(itdsl.UnsupportedError, match="second derivatives"):
        torch.autograd.grad(out.sum(), qq, create_graph=True)


@pytest.mark.parametrize("bias", ["slope * abs(t - s)", "slope * (t - s)"])
@pytest.mark.parametrize("mask", ["", "* [s <= t]"])
def test_an_infinite_value_gives_torchs_softmax_values(mask, bias):
    """SDPA's flash kernel and the tiles' GEMMs multiply the probabilities they mask (0) by
    the values: an inf value would put NaN in the rows of the split's other side, or, under
    a causal mask, in the rows before its point, where the bracket masks it out. Without a
    mask such calls go to the own tiles (torch's values: inf where the point has weight),
    under one to the kernels, which mask per pair: the reference's values and gradients."""
    op, ref = (m.double() for m in _alibi(bias, mask))
    g = torch.Generator().manual_seed(6)
    n = 30
    q, k, v = (torch.randn(n, w, generator=g, dtype=D, requires_grad=True) for w in (4, 4, 3))
    with torch.no_grad():
        v[10, 2] = torch.inf
    got, want = op(q=q, k=k, v=v), ref(q=q, k=k, v=v)
    assert not want.isnan().any() and want[:, 2].isinf().sum() == (n if not mask else n - 10)
    torch.testing.assert_close(got, want)
    if mask:  # the queries before the inf point: finite gradients (later, v − o = NaN)
        assert op.last_run == "kernels"
        cot = torch.randn(got.shape, generator=g, dtype=D)
        grads = torch.autograd.grad(got, (q, k, v), cot)
        assert torch.isfinite(grads[0][:10]).all() and torch.isfinite(grads[2]).all()
        for a, b in zip(grads, torch.autograd.grad(want, (q, k, v), cot), strict=True):
            torch.testing.assert_close(a, b, equal_nan=True)


def test_split_sdpa_in_bfloat16_and_with_a_batched_position_column():
    """In bfloat16 the output keeps the dtype and differentiates (the log-sum-exps are
    float32); a position column with batch dims that q, k and v lack (a per-point slope
    b(s) of a batch of 3) broadcasts the factors to its batch."""
    op, ref = _alibi("slope * abs(t - s)", "")
    ref = ref.double()
    g = torch.Generator().manual_seed(7)
    n = 20
    q, k, v = (torch.randn(2, n, w, generator=g, dtype=D) for w in (4, 4, 3))
    qb = q.bfloat16().requires_grad_(True)
    out = op.bfloat16()(q=qb, k=k.bfloat16(), v=v.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref(q=q, k=k, v=v), rtol=0, atol=0.05)
    (gq,) = torch.autograd.grad(out.float().sum(), qb)
    assert gq.dtype == torch.bfloat16 and torch.isfinite(gq).all()
    op, ref = (m.double() for m in _alibi("b(s) * abs(t - s)", "", per_point=True))
    assert op._runner.form.split_sdpa
    b = torch.rand(3, n, generator=g, dtype=D, requires_grad=True)
    got, want = op(q=q[0], k=k[0], v=v[0], b=b), ref(q=q[0], k=k[0], v=v[0], b=b)
    assert got.shape == (3, n, 3)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), b)[0],
                               torch.autograd.grad(want.sum(), b)[0])


def test_an_infinite_key_at_a_point_not_drawn_leaves_the_query_gradients_finite():
    """A key of inf at a point montecarlo did not draw: the runner's GEMMs would multiply the
    masked probability 0 by it in dq; the call goes to the kernels, which mask per pair."""
    src = MC_ATTENTION.replace("DRAWS", "6")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(10, w, generator=g, dtype=D) for w in (4, 4, 3))
    idx = torch.randint(10, (6,), generator=torch.Generator().manual_seed(7))
    dead = next(j for j in range(10) if j not in idx.tolist())
    k[dead, 0] = torch.inf
    P = torch.softmax(q @ k[idx].T, -1)  # the draws, repeated ones counted
    grads = []
    for strategy in (None, "dense"):
        op = itdsl.compile_source(src, target="cpu", **(
            {"strategy": strategy} if strategy else {}))["att"].double()
        ql = q.clone().requires_grad_(True)
        out = op(q=ql, k=k, v=v, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(out, P @ v[idx])
        grads.append(torch.autograd.grad(out.sum(), ql)[0])
    qw = q.clone().requires_grad_(True)
    want = torch.autograd.grad((torch.softmax(qw @ k[idx].T, -1) @ v[idx]).sum(), qw)[0]
    for got in grads:
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bias, mask", [("b(s) * abs(t - s)", ""),
                                        ("b(s) * (t - s)", "* [s <= t]"),
                                        ("b(s) * b(t)", "* [b(s) > 0.3]")])
def test_the_tiles_take_a_position_term_or_mask_with_batch_dims_of_its_own(bias, mask,
                                                                         monkeypatch):
    """The tiles (SDPA off) run a call whose position term or mask reads a field of a batch
    of 3 that q, k and v lack (the output's batch)."""
    import itdsl.runtime.strategies.tuning as T
    monkeypatch.setattr(T, "USE_SDPA", False)
    op, ref = (m.double() for m in _alibi(bias, mask, per_point=True))
    g = torch.Generator().manual_seed(7)
    n = 20
    q, k, v = (torch.randn(n, w, generator=g, dtype=D, requires_grad=True) for w in (4, 4, 3))
    b = torch.rand(3, n, generator=g, dtype=D, requires_grad=True)
    got, want = op(q=q, k=k, v=v, b=b), ref(q=q, k=k, v=v, b=b)
    assert op.last_run == "attention" and got.shape == (3, n, 3)
    torch.testing.assert_close(got, want)
    cot = torch.randn(got.shape, generator=g, dtype=D)
    for a, e in zip(torch.autograd.grad(got, (q, k, v, b), cot),
                    torch.autograd.grad(want, (q, k, v, b), cot), strict=True):
        torch.testing.assert_close(a, e)


def test_the_tiles_run_once_where_only_a_term_outside_the_ratio_is_batched(monkeypatch):
    """g(t) of a batch of 16 added to an attention of unbatched q, k, v: the tiles run the
    softmax once (the batch of what they read), not once per entry of the call's batch."""
    import itdsl.runtime.strategies.attention as A
    import itdsl.runtime.strategies.tuning as T
    monkeypatch.setattr(T, "USE_SDPA", False)
    seen, apply = [], A._Softmax.apply
    monkeypatch.setattr(A._Softmax, "apply", lambda info, *t: seen.append(t[0].shape[0])
                        or apply(info, *t))
    src = """operator att {
        domain T = index
        input q : T -> R^4
        input k : T -> R^4
        input v : T -> R^3
        input g : T -> R^3
        kernel a(t: T, s: T) = exp(dot(q(t), k(s)) + cos(0.1 * (t - s)))
        output o(t: T) = g(t) + integral(s: T) a(t, s) * v(s) / integral(s: T) a(t, s)
    }"""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, w, generator=gen, dtype=D) for w in (4, 4, 3))
    gg = torch.randn(16, 12, 3, generator=gen, dtype=D)
    got = itdsl.compile_source(src, target="cpu")["att"].double()(q=q, k=k, v=v, g=gg)
    t = torch.arange(12, dtype=D)
    want = gg + torch.softmax(q @ k.T + torch.cos(0.1 * (t[:, None] - t[None])), -1) @ v
    assert seen == [1]
    torch.testing.assert_close(got, want)


def test_second_derivatives_through_sdpa_are_a_clear_error():
    """SDPA's CPU backward has no derivative: create_graph=True is refused with an itdsl
    error (the tiles refuse it the same way)."""
    src = ALIBI_SDPA.replace("WQ", "4").replace("WV", "4").replace("MASK", "")
    op = itdsl.compile_source(src, target="cpu")["alibi"].double()
    assert op._runner.form.sdpa
    q, k, v = (torch.randn(7, 4, dtype=D, requires_grad=True) for _ in range(3))
    out = op(q=q, k=k, v=v)
    with pytest.raises(itdsl.UnsupportedError, match="second derivatives") as e:
        torch.autograd.grad(out.sum(), q, create_graph=True)
    assert 'target="reference"' in e.value.render()
    (g,) = torch.autograd.grad(op(q=q, k=k, v=v).sum(), q)  # first derivatives as before
    assert torch.isfinite(g).all()


GAUSS_ATTENTION = """operator ga {
    domain I = index
    domain J = index
    input  q : I -> R^4
    input  k : J -> R^4
    input  v : J -> R
    input  bias : J -> R
    kernel a(x: I, y: J) = exp(-sqnorm(q(x) - k(y)) + bias(y))
    output o(x: I) = integral(y: J) a(x, y) * v(y) / integral(y: J) a(x, y)
}
"""


@pytest.mark.parametrize("huge", [False, True])
def test_scores_too_large_for_sdpas_log_sum_exp_go_to_the_tiles(monkeypatch, huge):
    """SDPA's backward recomputes probabilities from one stored log-sum-exp per row, rounded
    to the float spacing at the row max: with a coordinate of 1e30 (scores near -1e60) the
    log of the sum is lost and its gradients came out m times too large. Such calls go to
    the own tiles: output and gradients are torch's softmax of the written formula."""
    op = itdsl.compile_source(GAUSS_ATTENTION, target="cpu")["ga"].double()
    assert op._runner.form.sdpa
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 2, 4, generator=g, dtype=D)
    if huge:
        q[0, 0, 0] = 1e30
    q.requires_grad_()
    k = torch.randn(5, 4, generator=g, dtype=D, requires_grad=True)
    v, bias = (torch.randn(3, 5, generator=g, dtype=D, requires_grad=True) for _ in range(2))
    out = op(q=q, k=k, v=v, bias=bias)
    assert bool(calls) != huge
    S = -((q[:, :, None, :] - k[None, None]) ** 2).sum(-1) + bias[:, None, :]
    want = (torch.softmax(S, -1) @ v[..., None])[..., 0]
    torch.testing.assert_close(out, want)
    g_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), g_out)
    wants = torch.autograd.grad(want, (q, k, v, bias), g_out)
    if huge:  # Σ_y dS·2(q − k) with q = 1e30: 0 in exact arithmetic, rounding of 1e30·eps
        assert got[0][0, 0, 0].abs() <= 1e30 * 1e-13
        got[0][0, 0, 0] = wants[0][0, 0, 0]
    for a, b in zip(got, wants, strict=True):
        torch.testing.assert_close(a, b)
