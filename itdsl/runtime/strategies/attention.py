"""attention (`symbolic/strategies/attention.py`): the max step and the sums of a softmax at
once, by torch's scaled_dot_product_attention where the score is all GEMM (q·k, and position
terms that separate into more columns of the factors), else by `_Softmax`, a
tiled online softmax with a flash backward of its own. On the CPU, a forward whose score is
all GEMM under no mask or the causal one (or that separates on each side of the diagonal)
runs as one fused TVM kernel (`lowering/softmax.py`): scores, running max, exponentials and
the value product per tile, nothing n×m stored.
"""

from __future__ import annotations

import functools
import math

import torch

from ...errors import UnsupportedError
from ...lowering import softmax as kernel
from ...lowering.softmax import PairPart
from ...symbolic import pexpr as P
from ...symbolic.plan import X_SIDE
from ...symbolic.strategies.attention import SoftmaxForm
from ...symbolic.strategies.forms import regular
from ..plan_eval import PlanEvaluator, tshape
from . import tuning as T
from .common import Declined, Runner, broadcast_lead, cat, factors, on, put


class AttentionRunner(Runner):
    """The forward steps in order; the max step and the softmax sums at the last of them (the
    per-point steps the sums read come before it)."""

    def run(self, ev: PlanEvaluator) -> None:
        f = self.form
        later = {f.max_step} | {ps.step for ps in f.sums[:-1]}
        for st in self.plan.forward.steps:
            if st.name in later:
                continue
            if st.name == f.sums[-1].step:
                _softmax(ev, f)
            else:
                ev.env[st.name] = ev.run_step(st)


runner = AttentionRunner


def _softmax(ev: PlanEvaluator, f: SoftmaxForm) -> None:
    """The max step and the sums of an attention Plan at once: by torch's
    scaled_dot_product_attention where the score is all GEMM, else by `_Softmax`."""
    over = f.sums[0].over
    A, B = factors(ev, f.terms, over)
    insides = [ps.inside for ps in f.sums if ps.inside != P.ONE]
    if insides:
        V = cat([on(ev, e, over) for e in insides])
    else:
        V = B.new_zeros(*B.shape[:-1], 0)
    A, B, V = broadcast_lead(A, B, V)
    lead = A.shape[:-2]
    if ((f.mask is not None or f.live is not None) and not torch.compiler.is_compiling()
            and not bool(torch.isfinite(V).all() & torch.isfinite(A).all()
                         & torch.isfinite(B).all())):
        # a masked pair's probability is 0 in the GEMMs of SDPA and the tiles, and 0 · inf is
        # NaN where the definition masks the pair out (in the values, or in the gradients by
        # the scores' factors): the kernels, which mask per pair
        raise Declined("a factor or value is NaN or infinite under a mask")
    if f.sdpa and T.USE_SDPA and insides and (torch.compiler.is_compiling() or _sdpa_safe(A, B)):
        return _sdpa(ev, f, A, B, V, lead)
    if (f.split_sdpa and T.USE_SDPA and insides and A.device.type == "cpu"
            and not torch.compiler.is_compiling()):
        # the score's GEMM terms (A, B), then each side's position columns after them; the
        # bound on the scores adds up over the columns (one sync for both sides); values
        # finite: the flash kernel multiplies the probabilities it masks (0) by the values,
        # and an inf would make NaN of rows on the other side of the diagonal
        extras = [factors(ev, t[len(f.terms):], over) for t in f.split]
        base, ok = _score_bound(A, B), torch.isfinite(V).all()
        for a, b in extras:
            ok = ok & _in_range(base + _score_bound(a, b), A.dtype)
        if bool(ok):
            lead = torch.broadcast_shapes(lead, *(t.shape[:-2] for ab in extras for t in ab))
            A, B, V = (t.expand(*lead, *t.shape[-2:]) for t in (A, B, V))
            E = A.shape[-1] + max(a.shape[-1] for a, _ in extras)
            W = max(V.shape[-1], E)
            sides = [_side_factors(A, B, ab, lead, W) for ab in extras]
            return _split_sdpa(ev, f, sides, V, lead, W, E)
    full = lead
    if torch.broadcast_shapes(lead, tuple(ev.bound.batch)) != lead:
        # the call has batch dims the factors lack: those the softmax reads (the position
        # term's and the mask's, from their value on one pair; the live points')
        for e in (f.rest, f.mask):
            if e is not None:
                full = torch.broadcast_shapes(
                    full, ev.tile(slice(0, 1)).value(e, slice(0, 1)).shape[:-3])
        if f.live is not None:
            full = torch.broadcast_shapes(full, on(ev, f.live, over).shape[:-2])
    if full != lead:  # the position term or the mask reads batch dims the factors lack
        A, B, V = (t.expand(*full, *t.shape[-2:]) for t in (A, B, V))
        lead = full
    keys, leaves = [], []
    if f.rest is not None:
        for n in P.toposort([f.rest]):
            key = (n.op, n.name) if n.op in ("param", "ref", "field") else None
            if key is None or key in keys:
                continue
            t = (ev.params[key[1]] if n.op == "param" else ev.env[key[1]] if n.op == "ref"
                 else ev.fields[key[1]])
            keys.append(key)
            leaves.append(t)
    flat = [t.reshape(math.prod(lead), *t.shape[-2:]) for t in (A, B, V)]  # (V may be n × 0)
    live = None  # [N, 1, m]: 1 at the points in the max, 0 at those of weight 0
    if f.live is not None:
        L = on(ev, f.live, over).detach()[..., 0] != 0
        live = L.expand(*lead, L.shape[-1]).reshape(-1, 1, L.shape[-1]).to(A.dtype)
    m0, acc, l = _Softmax.apply((ev, f, keys, lead, live), *flat, *leaves)
    n = A.shape[-2]
    ev.env[f.max_step] = m0.reshape(*lead, n, 1)
    _put_sums(ev, f, acc.reshape(*lead, n, -1), l.reshape(*lead, n, 1))


def _sdpa_safe(A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether SDPA may take these factors (one check, one sync):
    - every factor finite: scores with an inf or NaN factor go to the own tiles, which give
      torch's softmax values (NaN where it does); SDPA's flash kernel answers otherwise;
    - scores small enough for SDPA's backward: it keeps one log-sum-exp per row,
      max + log(Σ exp(s − max)), whose rounding to the spacing of floats at the row max
      puts a relative error of eps·|max| on every recomputed probability — at |s| ~ 1e60 the
      log of the sum is lost entirely and the gradients come out m times too large, where
      the own tiles keep max and sum apart. Σ_c max|A_c|·max|B_c| bounds every |score|;
      above SDPA_SCORE_BOUND relative to eps the tiles take the call.
    (Under torch.compile the check, a branch on values, is left out.)"""
    return bool(_in_range(_score_bound(A, B), A.dtype))


def _score_bound(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Σ_c max|A_c|·max|B_c|, a bound on every |score| (inf or NaN where a factor is)."""
    A, B = A.flatten(0, -2), B.flatten(0, -2)
    if A.shape[0] == 0 or B.shape[0] == 0:
        return A.new_zeros(())  # (no scores)
    return (A.abs().amax(0) * B.abs().amax(0)).sum()


def _in_range(bound: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Whether scores bounded by `bound` keep SDPA's log-sum-exp exact enough (see
    `_sdpa_safe`), and a row max from another computation than the backward's scores (the
    fused kernel's, `_fusable`)."""
    lse = dtype if dtype == torch.float64 else torch.float32  # (halves: kept in float32)
    return bound * torch.finfo(lse).eps <= T.SDPA_SCORE_BOUND


def _sdpa(ev: PlanEvaluator, f: SoftmaxForm, A, B, V, lead) -> None:
    """An all-GEMM score by torch's scaled_dot_product_attention (its flash kernel, forward
    and backward; without a mask, where the fused kernel applies, the forward by it and the
    backward by the flash backward, `_Flash`). It returns the normalised Σ exp(s − lse)·v:
    the Plan's sums are then taken relative to the row's log-sum-exp instead of its max,
    which the ratio does not see: the sums of v are the output, the sum of 1 is 1."""
    n = A.shape[-2]
    # the CPU flash kernel wants one width for the scores' factors and the values (else a
    # path 3–5× slower): zero columns added to the narrower side change no score or value
    E, Ev = A.shape[-1], V.shape[-1]
    # (the scores' bound is checked, `_sdpa_safe`; values with an inf: SDPA's answer)
    fused = (f.causal is None and _fused_applies(*(t.reshape(-1, *t.shape[-2:])
                                                   for t in (A, B, V)))
             and bool(torch.isfinite(V).all()))
    if E < Ev:
        A, B = (torch.nn.functional.pad(t, (0, Ev - E)) for t in (A, B))
    elif Ev < E:
        V = torch.nn.functional.pad(V, (0, E - Ev))
    A4, B4, V4 = (t.reshape(1, -1, t.shape[-2], t.shape[-1]) for t in (A, B, V))
    if fused:  # (no mask: the fused kernel forward, SDPA's flash backward)
        O = _Flash.apply((E, Ev, True), A4, B4, V4)
    else:
        O = torch.nn.functional.scaled_dot_product_attention(
            A4, B4, V4, is_causal=f.causal == "<=", scale=1.0)
        if O.requires_grad and not torch.compiler.is_compiling():
            O.register_hook(_first_derivatives_only)
    O = O.reshape(*lead, n, V.shape[-1])[..., :Ev]
    ev.env[f.max_step] = O.new_zeros(*lead, n, 1)  # (read by nothing but the sums)
    _put_sums(ev, f, O, O.new_ones(*lead, n, 1))


def _side_factors(A, B, extra, lead, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of one side of the diagonal, [1, N, n, W]: the GEMM terms' columns, the
    side's position columns, zero columns up to the width W of both sides and the values
    (SDPA's fast CPU kernel wants one width), each written once."""
    n, E = A.shape[-2], A.shape[-1]
    out = []
    for main, more in zip((A, B), extra):
        buf = main.new_empty(*lead, n, W)
        buf[..., :E] = main
        buf[..., E:E + more.shape[-1]] = more
        buf[..., E + more.shape[-1]:].zero_()
        out.append(buf.reshape(1, -1, n, W))
    return out[0], out[1]


def _split_sdpa(ev: PlanEvaluator, f: SoftmaxForm, sides, V, lead, W: int, E: int) -> None:
    """A score whose position term separates on each side of the diagonal (`split`): the
    softmax over y <= x and over y > x by the fused kernel with each side's factors, or by
    SDPA's CPU flash kernel merged by their log-sum-exps (`_Flash`). The Plan's sums are
    taken relative to the merged log-sum-exp, as in `_sdpa`. The sides are [1, N, n, W],
    their first E columns the factors', the rest zero."""
    n, Ev = V.shape[-2], V.shape[-1]
    Vp = V.new_empty(*lead, n, W)
    Vp[..., :Ev] = V
    Vp[..., Ev:].zero_()
    A, B = (t[0, ..., :E] for t in sides[0])
    fused = _fused_applies(A, B, V.reshape(-1, n, Ev))  # (the data: checked by the caller)
    O = _Flash.apply((E, Ev, fused), *sides[0], Vp.reshape(1, -1, n, W), *sides[1])
    O = O[..., :Ev].reshape(*lead, n, Ev)
    ev.env[f.max_step] = O.new_zeros(*lead, n, 1)  # (read by nothing but the sums)
    _put_sums(ev, f, O, O.new_ones(*lead, n, 1))


def _upper(t: torch.Tensor, queries: bool) -> torch.Tensor:
    """The points reversed and cut: with the queries reversed from the second (all but the
    last point, reversed) and the keys and values reversed but for the last (all but the
    first), the causal mask of SDPA keeps exactly y > x (query r is x = n − 2 − r, key c is
    y = n − 1 − c)."""
    return (t[..., :-1, :] if queries else t[..., 1:, :]).flip(-2)


def _back(t: torch.Tensor, queries: bool) -> torch.Tensor:
    """The gradient of `_upper(x, queries)` with respect to x."""
    out = t.new_zeros(*t.shape[:-2], t.shape[-2] + 1, t.shape[-1])
    (out[..., :-1, :] if queries else out[..., 1:, :]).copy_(t.flip(-2))
    return out


class _Flash(torch.autograd.Function):
    """softmax(s)·V, [1, N, n, W] each, for s = A_lo·B_loᵀ (one pair of factors, no mask) or,
    with a second pair (`split`), A_lo·B_loᵀ on and below the diagonal and A_hi·B_hiᵀ above
    it. `how` (E, Ev, fused): the factors' columns that are not padding, the values', and
    whether the fused kernel runs the forward (the caller checked the data).

    Forward: by the fused kernel (out = acc / l, log-sum-exp L = M + log l); else (a split
    only) by SDPA's CPU flash kernel causally on y <= x and on the reversed points for
    y > x (`_upper`), out = (e^lse_lo·out_lo + e^lse_hi·out_hi) / e^L,
    L = log(e^lse_lo + e^lse_hi). Backward: SDPA's CPU flash backward of each part given
    out and L, whose probabilities e^(s − L) and rows' D = Σ dO·out are the whole softmax's."""

    @staticmethod
    def forward(ctx, how, A_lo, B_lo, V, A_hi=None, B_hi=None):
        (E, Ev, fused), n, split = how, V.shape[-2], A_hi is not None
        if fused:
            hi = (A_hi[0, ..., :E], B_hi[0, ..., :E]) if split else ()
            M, acc, lsum = _fused(A_lo[0, ..., :E], B_lo[0, ..., :E], V[0, ..., :Ev], None, *hi)
            out = V.new_empty(*A_lo.shape[:-1], V.shape[-1])
            out[..., Ev:].zero_()
            torch.div(acc, lsum.unsqueeze(-1), out=out[0, ..., :Ev])
            L = (M + torch.log(lsum))[None]
        else:  # (a split: one pair of factors off the fused kernel is `_sdpa`'s SDPA call)
            flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            o_lo, l_lo = flash(A_lo, B_lo, V, 0.0, True, scale=1.0)
            o_hi, l_hi = torch.zeros_like(o_lo), torch.full_like(l_lo, -math.inf)
            if n > 1:
                o, l = flash(_upper(A_hi, True), _upper(B_hi, False), _upper(V, False),
                             0.0, True, scale=1.0)
                o_hi[..., :-1, :], l_hi[..., :-1] = o.flip(-2), l.flip(-1)
            L = torch.logaddexp(l_lo, l_hi)  # (float32 for halves, as SDPA keeps it)
            out = (torch.exp(l_lo - L).unsqueeze(-1) * o_lo).addcmul_(
                torch.exp(l_hi - L).unsqueeze(-1), o_hi).to(V.dtype).contiguous()
        ctx.split = split
        ctx.save_for_backward(A_lo, B_lo, V, out, L, *((A_hi, B_hi) if split else ()))
        return out

    @staticmethod
    def backward(ctx, dO):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative
            raise _no_second_derivatives(
                "second derivatives of attention computed by torch's scaled_dot_product_"
                "attention are not available")
        # (contiguous: given a strided view, as of a transposed input, the CPU flash backward
        # reads it as if it were contiguous and answers wrong gradients, without an error)
        A_lo, B_lo, V, out, L, *hi = (t.contiguous() for t in ctx.saved_tensors)
        back = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        dO = dO.contiguous()
        dA_lo, dB_lo, dV = back(dO, A_lo, B_lo, V, out, L, 0.0, ctx.split, scale=1.0)
        if not ctx.split:
            return None, dA_lo, dB_lo, dV, None, None
        A_hi, B_hi = hi
        dA_hi, dB_hi = torch.zeros_like(A_hi), torch.zeros_like(B_hi)
        if V.shape[-2] > 1:
            rev = (_upper(dO, True), _upper(A_hi, True), _upper(B_hi, False),
                   _upper(V, False), _upper(out, True), L[..., :-1].flip(-1))
            da, db, dv = back(*rev, 0.0, True, scale=1.0)
            dA_hi, dB_hi = _back(da, True), _back(db, False)
            dV[..., 1:, :] += dv.flip(-2)
        return None, dA_lo, dB_lo, dV, dA_hi, dB_hi


def _first_derivatives_only(grad: torch.Tensor) -> None:
    """SDPA's CPU flash backward has no derivative of its own: a backward that builds a
    graph for a second derivative (`create_graph=True`) is refused here, clearly, rather
    than by torch's error deep in the second backward."""
    if torch.is_grad_enabled():
        raise _no_second_derivatives(
            "second derivatives of attention computed by torch's scaled_dot_product_attention "
            "are not available (its CPU flash backward has no derivative)")


def _no_second_derivatives(what: str) -> UnsupportedError:
    """The error of a backward asked for a graph (`create_graph=True`) it cannot build."""
    return UnsupportedError(what, hint='target="reference" differentiates any number of '
                                       "times; or take the first derivative only")


def _put_sums(ev: PlanEvaluator, f: SoftmaxForm, acc: torch.Tensor, l: torch.Tensor) -> None:
    """The softmax sums into the Plan: `acc` holds the insides side by side, `l` the sum of 1."""
    col = 0
    for ps in f.sums:
        if ps.inside == P.ONE:
            put(ev, ps, l)
        else:
            w = math.prod(tshape(ps.inside.shape))
            put(ev, ps, acc[..., col:col + w])
            col += w


def _row_tiles(n: int, m: int, causal: str | None):
    """Per tile of rows, its tiles of columns (cols, crosses the diagonal). Under a causal
    mask the columns left of the row tile come in unmasked tiles, the square on its diagonal
    is the one masked tile, and the tiles right of it are skipped."""
    for r0 in range(0, n, T.ROWS):
        r1 = min(n, r0 + T.ROWS)
        if causal is None:
            yield slice(r0, r1), [(slice(c0, min(m, c0 + T.COLS)), False)
                                  for c0 in range(0, m, T.COLS)]
            continue
        left = min(r0, m)
        tiles = [(slice(c0, min(left, c0 + T.COLS)), False) for c0 in range(0, left, T.COLS)]
        last = min(m, r1 if causal == "<=" else r1 - 1)
        if last > r0 or not tiles:  # (the first row of a strict mask: all masked)
            tiles.append((slice(r0, max(last, r0 + 1)), True))
        yield slice(r0, r1), tiles


_KERNELS: dict[str, object] = {}  # the fused kernels loaded in this process, by key


def _fused_kernel(width: int, vwidth: int, dtype: str, causal: str | None, split: bool,
                  pair=None, limit: float = math.inf):
    """The fused online-softmax kernel (`lowering/softmax.py`): from the kernel cache, else
    compiled (a fraction of a second) and cached; None where it cannot be built (a score's
    elementwise part TVM does not vectorise)."""
    import hashlib

    from ...cache.disk import versions
    from .. import cache
    text = f"online_softmax;{width};{vwidth};{dtype};{causal};{split};cpu;{versions()}"
    if pair is not None:
        text += (f";live={pair.live};{len(pair.x_leaves)};limit={limit!r};"
                 + cache.canonical(pair.roots()))
    key = hashlib.sha256(text.encode()).hexdigest()[:32]
    if key not in _KERNELS:
        from ..module import _ensure_threads
        _ensure_threads()
        fn = cache.load(key)
        if fn is None:
            from ...errors import LoweringError
            from ...lowering import compile_module
            from ...lowering.softmax import build_online_softmax
            try:
                mod = build_online_softmax(width, vwidth, dtype, causal, split, pair, limit)
            except LoweringError:
                _KERNELS[key] = None
                return None
            exe = compile_module(mod, "cpu")
            cache.store(key, exe)
            fn = exe["main"]
        _KERNELS[key] = fn
    return _KERNELS[key]


def _fused_applies(A: torch.Tensor, B: torch.Tensor, V: torch.Tensor) -> bool:
    """Whether the fused kernel may take factors A [N, n, W], B [N, m, W] and values V
    [N, m, dv], their data aside: on the CPU, in float32 or float64, outside torch.compile,
    from `FUSED_MIN_WORK` on."""
    (N, n, W), m = A.shape, B.shape[-2]
    return (T.USE_FUSED and A.device.type == "cpu" and not torch.compiler.is_compiling()
            and A.dtype in (torch.float32, torch.float64)
            and N * n * m * (W + V.shape[-1]) >= T.FUSED_MIN_WORK)


def _fusable(A: torch.Tensor, B: torch.Tensor, V: torch.Tensor) -> bool:
    """The data (one sync): every factor and value finite, and the scores' bound
    (Σ_c max|A_c|·max|B_c|) in range for a backward that recomputes them in torch against
    the kernel's row max (`_in_range`: their roundings differ by about eps·|score|, which
    exp(s − m) multiplies in); else the tiles, which give torch's values for NaN and inf
    and keep max and scores from one computation."""
    return bool(_in_range(_score_bound(A, B), A.dtype) & torch.isfinite(V).all())


def _padded(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """`t` [N, r, c] with zero rows and columns added up to [N, rows, cols] (itself where it
    is that already, contiguous): only the padding is zeroed."""
    N, r, c = t.shape
    if (r, c) == (rows, cols) and t.is_contiguous():
        return t
    out = t.new_empty(N, rows, cols)
    out[:, :r, :c] = t
    out[:, r:].zero_()
    out[:, :r, c:].zero_()
    return out


def _score_limit(dtype: torch.dtype) -> float:
    """The magnitude of a score beyond which the fused kernel flags its row (`_in_range`'s
    bound for a single score)."""
    return T.SDPA_SCORE_BOUND / torch.finfo(dtype).eps


NO_BAND = 2 ** 30  # (a window wider than any call)


def _fused(A, B, V, causal: str | None, A2=None, B2=None, pair=None, XL=None, YL=None,
           check: bool = False, band: int = NO_BAND):
    """(row max M [N, n], Σ exp(s − M)·V [N, n, dv], Σ exp(s − M) [N, n]) by the fused kernel,
    for s = A·Bᵀ (under the causal mask), or with A2, B2: A·Bᵀ for y <= x and A2·B2ᵀ above,
    or with `pair` (`lowering.softmax.PairPart`) plus its position term and under its mask,
    from the per-point values XL [N, n, kx] and YL [N, ky, m]; `band`: no column further
    than it from a row's point is kept (a window mask's, `_band`). M is -inf on a row with
    every score masked (its sums 0). None where the kernel cannot take the call: it has no
    kernel for the pair part, the data are not `_fusable` (checked with `check`, once the
    kernel is there), or a kept score came out NaN or beyond `_score_limit` (the tiles give
    torch's values there)."""
    N, n, W = A.shape
    m, dv = B.shape[1], V.shape[-1]
    R, KC, CW = kernel.tiles(str(A.dtype).replace("torch.", ""))
    npad, mpad, vpad = -(-n // R) * R, -(-max(m, 1) // KC) * KC, -(-max(dv, 1) // CW) * CW
    fn = _fused_kernel(W, vpad, str(A.dtype).replace("torch.", ""), causal, A2 is not None,
                       pair, _score_limit(A.dtype))
    if fn is None or check and not _fusable(A, B, V):
        return None
    # the factors' columns as [N, mpad/CW, W, CW], the values' as [N, vpad/CW, mpad, CW]
    a = _padded(A, npad, W)
    bt = _padded(B, mpad, W).view(N, mpad // CW, CW, W).transpose(2, 3).contiguous()
    vp = _padded(V, mpad, vpad).view(N, mpad, vpad // CW, CW).transpose(1, 2).contiguous()
    a2, bt2 = (a, bt) if A2 is None else (
        _padded(A2, npad, W),
        _padded(B2, mpad, W).view(N, mpad // CW, CW, W).transpose(2, 3).contiguous())
    if pair is None:
        xl = yl = bad = A.new_zeros(1, 1, 1)
        bad = bad[0]
    else:
        xl = _padded(XL, npad, XL.shape[-1])
        yl = _padded(YL.transpose(1, 2), mpad, YL.shape[1]).transpose(1, 2).contiguous()
        bad = A.new_empty(N, npad)
    M, L = A.new_empty(N, npad), A.new_empty(N, npad)
    acc = A.new_empty(N, npad, vpad)
    fn(a, bt, a2, bt2, vp, xl, yl, bad, M, L, acc, m, band)
    if pair is not None and bool(bad[:, :n].any()):  # (not the padding rows: some keep
        return None  # real columns, with values of the zero padding)
    return M[:, :n], acc[:, :n, :dv], L[:, :n]


class _Softmax(torch.autograd.Function):
    """Tiled online softmax: per tile of rows a running max, sum and Σ exp(s − max)·V over
    the tiles of columns; returns (row max m, Σ exp(s − m)·V, Σ exp(s − m)): by the fused
    kernel where `_fusable` says and it takes the score (`_fused_softmax`), else in torch
    (`_tiles`). The backward recomputes each tile's scores (flash attention) and keeps
    nothing n×m; m is a constant of the Plan (the ratio does not depend on it), as in the
    dense backward."""

    @staticmethod
    def forward(ctx, info, A, B, V, *leaves):
        ev, f, keys, lead, live = info
        got = _fused_softmax(ev, f, lead, live, A, B, V)
        if got is not None:  # the three by one kernel
            m_all, acc_all, l_all = got
            m_all = m_all.nan_to_num(neginf=0.0)
        else:
            m_all, acc_all, l_all = _tiles(ev, f, keys, lead, live, A, B, V, leaves)
        ctx.info = info
        ctx.save_for_backward(A, B, V, m_all, l_all, *leaves)
        return m_all, acc_all, l_all

    @staticmethod
    def backward(ctx, dm, dacc, dl):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative
            raise _no_second_derivatives(
                "second derivatives through itdsl's tiled online softmax are not implemented")
        ev, f, keys, lead, live = ctx.info
        A, B, V, m0, l0, *leaves = ctx.saved_tensors
        want = [t.requires_grad for t in leaves]
        dA, dB, dV = torch.zeros_like(A), torch.zeros_like(B), torch.zeros_like(V)
        dleaves = [torch.zeros_like(t) if w else None for t, w in zip(leaves, want)]
        if dacc is None:
            dacc = V.new_zeros(A.shape[0], A.shape[1], V.shape[-1])
        if dl is None:
            dl = torch.zeros_like(m0)
        if f.mask is not None or f.rest is not None or live is not None:  # (else every row
            #                                                   has a term exp(0))
            empty = l0 == 0  # rows with every score masked: nothing to differentiate (0/0)
            dacc, dl = dacc.masked_fill(empty.unsqueeze(-1), 0.0), dl.masked_fill(empty, 0.0)
        grad_rest = f.rest is not None and any(want)
        for rows, tiles in _row_tiles(A.shape[1], B.shape[1], f.causal):
            dO, Ar, dAr = dacc[:, rows], A[:, rows], dA[:, rows]
            for cols, cross in tiles:
                rest = None
                if grad_rest:
                    with torch.enable_grad():
                        lv = [t.detach().requires_grad_(w) for t, w in zip(leaves, want)]
                        S, keep, rest = _scores(ev, f, keys, lv, lead, A, B, rows, cols, cross,
                                                live, keep_rest=True)
                    S = S.detach()
                else:
                    S, keep = _scores(ev, f, keys, leaves, lead, A, B, rows, cols, cross, live)
                Pm = _probs(S, keep, m0[:, rows])  # the probabilities, recomputed
                dV[:, cols].baddbmm_(Pm.transpose(1, 2), dO)
                dS = torch.baddbmm(dl[:, rows].unsqueeze(-1), dO, V[:, cols].transpose(1, 2))
                dS.mul_(Pm)
                dAr.baddbmm_(dS, B[:, cols])
                dB[:, cols].baddbmm_(dS.transpose(1, 2), Ar)
                if rest is not None:
                    got = iter(torch.autograd.grad(rest, [t for t in lv if t.requires_grad], dS,
                                                   allow_unused=True))
                    for i, w in enumerate(want):
                        g = next(got) if w else None
                        if g is not None:
                            dleaves[i] += g
        return (None, dA, dB, dV, *dleaves)


@functools.lru_cache(maxsize=64)
def _pair_part(f: SoftmaxForm, live: bool) -> PairPart | None:
    """The score's elementwise part for the fused kernel (the causal mask aside, which the
    kernel applies itself); None where it has none, False where the kernel cannot take it."""
    mask = f.mask if f.causal is None else None
    if f.rest is None and mask is None and not live:
        return None
    return PairPart.of(f.rest, mask, X_SIDE, f.sums[0].over, live) or False


def _fused_softmax(ev, f: SoftmaxForm, lead, live, A, B, V):
    """`_Softmax`'s forward by the fused kernel, the score's elementwise part (position term,
    mask, points out of the sums) from its per-point values; None where the kernel does not
    take the call."""
    if not _fused_applies(A, B, V):
        return None
    pair = _pair_part(f, live is not None)
    if pair is False:
        return None
    XL = YL = None
    if pair is not None:
        N, n, m = A.shape[0], A.shape[1], B.shape[1]

        def side(e, s, size):  # [N, size]
            return on(ev, e, s)[..., 0].expand(*lead, size).reshape(N, size).to(A.dtype)
        XL = torch.stack([side(e, X_SIDE, n) for e in pair.x_leaves] or [A.new_zeros(N, n)],
                         -1)
        ys = [side(e, f.sums[0].over, m) for e in pair.y_leaves]
        if live is not None:
            ys.append(live.reshape(N, m))
        YL = torch.stack(ys or [A.new_zeros(N, m)], 1)
    return _fused(A, B, V, f.causal, pair=pair, XL=XL, YL=YL, check=True,
                  band=_band(ev.plan, f))


def _band(plan, f: SoftmaxForm) -> int:
    """The half-width w of a window in the mask, a factor [abs(t − s) < c] (or <=, or
    s − t) over the points of one index domain: every kept pair has |i − j| <= w, and the
    fused kernel skips the column tiles beyond it; NO_BAND where the mask has none."""
    over = f.sums[0].over
    if f.mask is None or not regular(plan, over):
        return NO_BAND
    dom = plan.op.domain(plan.spaces[over].domain)
    if dom.kind.value != "index" or dom.naxes != 1:
        return NO_BAND

    def conj(n):
        return conj(n.args[0]) + conj(n.args[1]) if n.op == "and" else [n]
    w = NO_BAND
    for c in conj(f.mask):
        if c.op not in ("<", "<=") or c.args[0].op != "abs" or c.args[1].op != "const":
            continue
        d, lim = c.args[0].args[0], c.args[1].value
        if (d.op == "-" and all(a.op == "coord" and a.shape == () for a in d.args)
                and {a.side for a in d.args} == {X_SIDE, over} and math.isfinite(lim)):
            k = math.floor(lim)
            w = min(w, max(-1, k - 1 if c.op == "<" and k == lim else k))
    return w


def _tiles(ev, f: SoftmaxForm, keys, lead, live, A, B, V, leaves):
    """`_Softmax`'s forward in torch, tile by tile: (row max, Σ exp(s − m)·V, Σ exp(s − m))."""
    N, n, _ = A.shape
    m_all, l_all = A.new_empty(N, n), A.new_empty(N, n)
    clean = f.mask is None and f.rest is None and live is None  # every score finite
    acc_all = A.new_empty(N, n, V.shape[-1])
    for rows, tiles in _row_tiles(n, B.shape[1], f.causal):
        m_i = l_i = a_i = None
        for cols, cross in tiles:
            S, keep = _scores(ev, f, keys, leaves, lead, A, B, rows, cols, cross, live)
            m_t = S.amax(-1)
            m_new = m_t if m_i is None else torch.maximum(m_i, m_t)
            m_safe = m_new if clean else m_new.nan_to_num(neginf=0.0)  # all masked so far
            _probs(S, keep, m_safe)
            if m_i is None:
                l_i, a_i = S.sum(-1), torch.bmm(S, V[:, cols])
            else:
                scale = torch.exp(m_i - m_safe)
                l_i = torch.addcmul(S.sum(-1), l_i, scale)
                a_i.mul_(scale.unsqueeze(-1)).baddbmm_(S, V[:, cols])
            m_i = m_new
        if not clean:  # a row whose every live score is -inf has no mass: 0/0, as
            dead = m_i == -math.inf  # torch's softmax gives (the clamp at -80 lent
            l_i = l_i.masked_fill(dead, 0.0)  # its terms e^-80 each)
            a_i.masked_fill_(dead.unsqueeze(-1), 0.0)
        m_all[:, rows] = m_i.nan_to_num(neginf=0.0)
        l_all[:, rows], acc_all[:, rows] = l_i, a_i
    return m_all, acc_all, l_all


def _scores(ev, f: SoftmaxForm, keys, leaves, lead, A, B, rows: slice, cols: slice, cross: bool,
            live=None, keep_rest: bool = False):
    """(scores of one tile `[N, R, K]` with masked entries -inf, 1 where kept and 0 where
    masked or None; with `keep_rest`, also the position term as computed, for its gradient).
    `live` `[N, 1, m]`: 0 at the columns out of the max (their weight is 0)."""
    S = A[:, rows] @ B[:, cols].transpose(1, 2)
    rest = keep = None
    if f.rest is not None:
        rest = _tile_value(ev, f.rest, keys, leaves, lead, rows, cols, S.shape)
        S = S + rest if keep_rest else S.add_(rest)
    if f.causal is not None and cross:
        mask = _causal_mask.__wrapped__ if torch.compiler.is_compiling() else _causal_mask
        masked, keep = mask(rows.stop - rows.start, cols.stop - cols.start,
                            cols.start - rows.start + (f.causal == "<"), S.dtype, S.device)
        S = S.masked_fill_(masked, -math.inf)  # (a masked NaN score stays out of the max)
    elif f.mask is not None and f.causal is None:
        with torch.no_grad():
            keep = (_tile_value(ev, f.mask, keys, leaves, lead, rows, cols, S.shape) != 0)
        S = S.masked_fill_(~keep, -math.inf)
        keep = keep.to(S.dtype)
    if live is not None:
        lv = live[:, :, cols]
        S = S.masked_fill_(lv == 0, -math.inf)
        keep = lv if keep is None else keep * lv
    return (S, keep, rest) if keep_rest else (S, keep)


@functools.lru_cache(maxsize=64)
def _causal_mask(R: int, K: int, shift: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask of an R×K tile whose entries with column c + shift > row r are masked: True
    where masked (for the scores), and as a factor (1 or 0, for the probabilities)."""
    masked = torch.ones(R, K, dtype=torch.bool, device=device).triu(1 - shift)
    return masked, (~masked).to(dtype)


def _probs(S: torch.Tensor, keep, m: torch.Tensor) -> torch.Tensor:
    """exp(S − m) in place, 0 where masked. Arguments below −80 are raised to it: exp(−80)
    ≈ 2e-35 is far below any rounding of a sum whose largest term is 1, and it keeps the
    exponential off the slow paths of CPUs for -inf and for results that are subnormal."""
    S.sub_(m.unsqueeze(-1)).clamp_min_(-80.0).exp_()
    return S if keep is None else S.mul_(keep)


def _tile_value(ev, e: P.Node, keys, leaves, lead, rows: slice, cols: slice, shape):
    """A pair expression on one tile, `[N, R, K]`, reading `leaves` for its params, per-point
    steps and fields."""
    given: dict[str, dict] = {"param": {}, "ref": {}, "field": {}}
    for (op, name), t in zip(keys, leaves):
        given[op][name] = t
    view = ev.tile(cols, params=given["param"], env=given["ref"], fields=given["field"])
    v = view.value(e, rows)[..., 0]  # [*B?, R, K]
    while v.dim() < 2:
        v = v.unsqueeze(0)
    v = v.expand(*lead, shape[1], shape[2]) if lead else v.expand(shape[1], shape[2])
    return v.reshape(shape)
