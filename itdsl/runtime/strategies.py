"""Strategies that run through a library call instead of the dense pair kernels.

matmul (an Integral Neural Network layer): each integral of the output is
`sum_j A[i, j] V[j]` with `A[i, j] = w_j K(x_i, y_j)` depending on coordinates and
params only, and V on the points of y. A is sampled once into an n x m matrix (torch
computes it from the Plan's hoisted per-point tensors), then the integral is a GEMM.
While the params are unchanged (and no gradient is being recorded) the matrix is kept,
per grid sizes: calling with other sizes resamples the layer. Everything is torch, so
autograd differentiates it.
"""

from __future__ import annotations

import functools
import math

import torch

from ..errors import UnsupportedError
from ..symbolic import pexpr as P
from ..symbolic.library import (
    ConvSum,
    DecaySum,
    LowRankSum,
    MatmulTerm,
    PairSum,
    SoftmaxForm,
    reads_inputs,
)
from ..symbolic.plan import Plan, Step
from .binding import Bound
from .plan_eval import PlanEvaluator, _Side, _ts


def _split_static(plan: Plan) -> list[Step]:
    """The forward steps, with the parts of a per-point step that read no input (a bias
    spline `c(u)`, say) made steps of their own, so that they can be kept too."""
    out = []
    for st in plan.forward.steps:
        if st.kind != "point" or not reads_inputs(st.expr, plan):
            out.append(st)
            continue
        mapping: dict = {}
        inside: set = set()  # parts of a part already split off
        for n in reversed(P.toposort([st.expr])):  # parents first: the largest parts
            if (n is st.expr or n in inside or n in mapping or P.cost([n]) == 0
                    or reads_inputs(n, plan)):
                continue
            name = f"{st.name}_static{len(mapping)}"
            out.append(Step("point", name, st.side, n))
            mapping[n] = P.ref(name, st.side, n.shape)
            inside.update(P.toposort(list(n.args)))
        expr = P.substitute([st.expr], mapping)[0]
        out.append(Step(st.kind, st.name, st.side, expr, st.over, st.mask))
    return out


def _output(plan: Plan, ev: PlanEvaluator, bound: Bound) -> torch.Tensor:
    """The output step `[*B?, n, *ts]` with the call's batch dims (a scalar field squeezed)."""
    out = ev.env["out"]
    nts = len(_ts(plan.out_shape))
    lead = torch.broadcast_shapes(out.shape[:-nts - 1], bound.batch)
    out = out.expand(*lead, *out.shape[-nts - 1:])
    return out[..., 0] if plan.out_shape == () else out


class MatmulRunner:
    """Runs a matmul Plan's forward in torch; keeps each sampled matrix while it is valid."""

    def __init__(self, plan: Plan, terms: list[MatmulTerm]):
        self.plan, self.terms = plan, terms
        self._kept: dict[str, tuple[tuple, torch.Tensor]] = {}
        self.steps = _split_static(plan)
        # steps of params and coordinates only: sampled once per version, like the matrix
        self._static = {st.name for st in self.steps
                        if st.kind in ("point", "const") and not reads_inputs(st.expr, plan)}

    def __call__(self, params: dict[str, torch.Tensor], bound: Bound,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        ev = PlanEvaluator(self.plan, params, bound, generator)
        ev.expand_batch = False  # the sampled matrix is one for every batch entry
        by_step = {t.step: t for t in self.terms}
        keep = not (torch.is_grad_enabled() and any(p.requires_grad for p in params.values()))
        version = (tuple(p._version for p in params.values()), tuple(sorted(bound.sizes.items())),
                   bound.dtype, bound.device)
        for st in self.steps:
            t = by_step.get(st.name)
            if t is None:
                kept = self._kept.get(st.name) if keep else None
                if kept is not None and kept[0] == version:
                    ev.env[st.name] = kept[1]
                    continue
                ev.env[st.name] = ev.run_step(st)
                if keep and st.name in self._static:
                    self._kept[st.name] = (version, ev.env[st.name].detach())
                continue
            ts = _ts(st.shape)
            A = self._matrix(ev, t, version if keep else None)  # [*B?, n, m]
            m = ev.sides[t.over].n
            V = ev.eval_level(t.values, t.over).squeeze(-len(ts) - 2)  # [*B?, m | 1, *ts]
            V = V.expand(*V.shape[:-len(ts) - 1], m, *ts)
            V = V.reshape(*V.shape[:-len(ts)], -1)  # [*B, m, C]
            if A.dim() == 2:  # one matrix for the whole batch: a single GEMM
                out = (A @ V.movedim(-2, 0).reshape(m, -1)).reshape(
                    A.shape[0], *V.shape[:-2], V.shape[-1]).movedim(0, -2)
            else:
                out = torch.matmul(A, V)  # [*B, n, C]
            ev.env[st.name] = ev._full(out.reshape(*out.shape[:-1], *ts), "x", len(ts))
        return _output(self.plan, ev, bound)

    def _matrix(self, ev: PlanEvaluator, t: MatmulTerm, version) -> torch.Tensor:
        if version is not None:
            kept = self._kept.get(t.step)
            if kept is not None and kept[0] == version:
                return kept[1]
        A = ev.eval_nodes([t.kernel], None)[t.kernel]  # [*B?, n|1, m|1, 1]
        n, m = ev.sides["x"].n, ev.sides[t.over].n
        A = A[..., 0].expand(*A.shape[:-3], n, m)
        if version is not None:
            self._kept[t.step] = (version, A.detach())
        return A


# ---- lowrank, recurrence, convolution, attention ------------------------------------------------
#
# Each runs the Plan's forward steps with the PlanEvaluator (per-point and per-call steps in
# torch, so autograd differentiates them) and computes each pair sum by its strategy's
# algorithm. Layouts: a side's values are `[*B?, n, W]` (W channels, flattened).

CHUNK = 64  # scan chunk: parallel inside, recurrent across
SEGMENT = 64  # chunks per segment of a causal low-rank scan (segments run one by one)
ROWS, COLS = 256, 512  # attention tiles (rows of x, columns of y)
DIRECT_TAPS = 96  # a convolution with more taps than this runs by FFT
USE_SDPA = True  # plain attention by torch's scaled_dot_product_attention (else `_Softmax`)


def _on(ev: PlanEvaluator, e: P.Node, side: str) -> torch.Tensor:
    """`e` (of one side's points, or per call) as `[*B?, n, W]`."""
    v = ev.eval_level(e, side)
    nts = len(_ts(e.shape))
    while v.dim() < nts + 2:
        v = v.unsqueeze(0)
    v = v.squeeze(-nts - 1) if side == "x" else v.squeeze(-nts - 2)
    v = v.reshape(*v.shape[:v.dim() - nts], -1)
    return v.expand(*v.shape[:-2], ev.sides[side].n, v.shape[-1])


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    lead = torch.broadcast_shapes(*(t.shape[:-1] for t in parts))
    return torch.cat([t.expand(*lead, t.shape[-1]) for t in parts], dim=-1)


def _lead(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Broadcast the batch dims of `[*B, n, W]` tensors (n and W kept)."""
    lead = torch.broadcast_shapes(*(t.shape[:-2] for t in ts))
    return tuple(t.expand(*lead, *t.shape[-2:]) for t in ts)


def _factors(ev: PlanEvaluator, terms, over: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A [*B?, n, R] and B [*B?, m, R] with kernel(x, y) = Σ_r A[x, r] B[y, r]."""
    As, Bs = [], []
    for t in terms:
        a, b = _on(ev, t.a, "x"), _on(ev, t.b, over)
        w = max(a.shape[-1], b.shape[-1])
        As.append(a.expand(*a.shape[:-1], w))
        Bs.append(b.expand(*b.shape[:-1], w))
    return _cat(As), _cat(Bs)


def causal_lowrank(A: torch.Tensor, B: torch.Tensor, Y: torch.Tensor, strict: bool,
                   chunk: int | None = None) -> torch.Tensor:
    """out[t] = Σ_{s <= t (or s < t)} (A[t]·B[s]) Y[s]: per chunk a masked L×L product, across
    chunks a running state Σ B[s] Y[s]ᵀ (an exclusive cumulative sum of the chunks' states)."""
    A, B, Y = _lead(A, B, Y)
    n = A.shape[-2]
    chunk = chunk or CHUNK
    seg = SEGMENT * chunk
    if n > seg:  # segments one after another, the state carried: a bounded working set
        outs, state = [], None
        for lo in range(0, n, seg):
            a, b, y = (t[..., lo:lo + seg, :] for t in (A, B, Y))
            out = causal_lowrank(a, b, y, strict, chunk)
            if state is not None:
                out = out + a @ state
            step = b.transpose(-1, -2) @ y
            state = step if state is None else state + step
            outs.append(out)
        return torch.cat(outs, dim=-2)
    nc = -(-n // chunk)
    pad = nc * chunk - n
    if pad:
        A, B, Y = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (A, B, Y))
    Ac, Bc, Yc = (t.reshape(*t.shape[:-2], nc, chunk, t.shape[-1]) for t in (A, B, Y))
    S = Ac @ Bc.transpose(-1, -2)  # [*B, nc, L, L]
    keep = torch.ones(chunk, chunk, dtype=torch.bool, device=A.device).tril(-1 if strict else 0)
    out = (S * keep) @ Yc
    Z = Bc.transpose(-1, -2) @ Yc  # [*B, nc, R, C]: each chunk's state
    H = Z.cumsum(-3) - Z  # the state before each chunk
    out = out + Ac @ H
    return out.reshape(*out.shape[:-3], nc * chunk, out.shape[-1])[..., :n, :]


def decay_scan(u: torch.Tensor, r: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """y[t] = Σ_{s <= t} exp(r·(t − s)) u[s] along dim -2 (r per channel, <= 0 for a decay).
    Inside a chunk the L×L matrix exp(r·Δ) (Δ >= 0); across chunks the same scan over the
    chunks' end states with rate r·L, recursively. Only exp(r·Δ) of Δ >= 0 is ever formed,
    never exp(r·t)·exp(−r·s), so long sequences stay finite."""
    n, C = u.shape[-2], u.shape[-1]
    r = r.expand(C)
    chunk = chunk or CHUNK
    L = min(chunk, n)
    nc = -(-n // L)
    if nc * L != n:
        u = torch.nn.functional.pad(u, (0, 0, 0, nc * L - n))
    d = torch.arange(L, dtype=u.dtype, device=u.device)
    D = d[:, None] - d[None, :]
    G = torch.where((D >= 0)[..., None], torch.exp(D.clamp_min(0)[..., None] * r), 0)  # [L,L,C]
    uc = u.reshape(*u.shape[:-2], nc, L, C)
    intra = torch.einsum("tsc,...ksc->...ktc", G, uc)
    if nc > 1:
        H = decay_scan(intra[..., -1, :], r * L, chunk)  # [*, nc, C]: state at each chunk's end
        H = torch.nn.functional.pad(H[..., :-1, :], (0, 0, 1, 0))
        intra = intra + torch.exp((d + 1)[:, None] * r) * H[..., None, :]
    return intra.reshape(*u.shape[:-2], nc * L, C)[..., :n, :]


class LibraryRunner:
    """Runs the forward of a lowrank, recurrence, convolution or attention Plan in torch,
    each pair sum by its strategy's algorithm; torch autograd gives the gradients (attention:
    a flash backward of its own, see `_Softmax`)."""

    def __init__(self, plan: Plan, form):
        self.plan, self.form = plan, form
        self.later: set[str] = set()  # steps computed together with a later one
        if isinstance(form, SoftmaxForm):
            # at its last sum: the per-point steps the sums read come before that one
            last = form.sums[-1].step
            self.sums = {last: form}
            self.later = {form.max_step} | {ps.step for ps in form.sums[:-1]}
        else:
            self.sums = {f.sum.step: f for f in form}
        # low-rank sums with one kernel (a normalised ratio's two integrals): one scan, the
        # insides side by side
        self.groups: dict[str, list[LowRankSum]] = {}
        for f in form if isinstance(form, list) else ():
            if isinstance(f, LowRankSum):
                key = (f.terms, f.causal, f.sum.over)
                self.groups.setdefault(key, []).append(f)
        self.groups = {f.sum.step: g for g in self.groups.values() for f in g}

    def __call__(self, params: dict[str, torch.Tensor], bound: Bound,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        ev = PlanEvaluator(self.plan, params, bound, generator)
        ev.expand_batch = False
        done: set[str] = set(self.later)
        for st in self.plan.forward.steps:
            if st.name in done:
                continue
            f = self.sums.get(st.name)
            if f is None:
                ev.env[st.name] = ev.run_step(st)
            elif isinstance(f, SoftmaxForm):
                _softmax(ev, f)
            elif isinstance(f, LowRankSum):
                group = [g for g in self.groups[st.name]
                         if g is f or _ready(ev, g.sum.inside, g.sum.outside)]
                Ys = [_on(ev, g.sum.inside, g.sum.over) for g in group]
                Ys = _lead(*Ys) if len(Ys) > 1 else Ys
                out = _lowrank(ev, f, torch.cat(Ys, dim=-1))
                col = 0
                for g, Y in zip(group, Ys):
                    _put(ev, g.sum, out[..., col:col + Y.shape[-1]])
                    col += Y.shape[-1]
                    done.add(g.sum.step)
            else:
                Y = _on(ev, f.sum.inside, f.sum.over)
                _put(ev, f.sum, _decay(ev, f, Y) if isinstance(f, DecaySum) else _conv(ev, f, Y))
        return _output(self.plan, ev, bound)


def _put(ev: PlanEvaluator, ps: PairSum, out: torch.Tensor) -> None:
    """A sum's value (`[*B, n, W]`, before its outside factor) into the Plan's layout."""
    if ps.outside != P.ONE:
        out = out * _on(ev, ps.outside, "x")
    ts = _ts(ev.plan.forward.step(ps.step).shape)
    out = out.expand(*out.shape[:-1], math.prod(ts))
    ev.env[ps.step] = out.reshape(*out.shape[:-1], *ts)


def _ready(ev: PlanEvaluator, *nodes: P.Node) -> bool:
    """Every step `nodes` read has been computed."""
    return all(n.attrs[0] in ev.env for n in P.toposort(nodes) if n.op == "ref")


def _lowrank(ev: PlanEvaluator, f: LowRankSum, Y: torch.Tensor) -> torch.Tensor:
    A, B = _factors(ev, f.terms, f.sum.over)
    if f.causal is None:
        B, Y = _lead(B, Y)
        return A @ (B.transpose(-1, -2) @ Y)  # two passes: Σ_y ψ(y) f(y)ᵀ, then φ(x)·that
    return causal_lowrank(A, B, Y, strict=f.causal == "<")


def _coords_at(ev: PlanEvaluator, e: P.Node, at: dict[str, torch.Tensor]) -> torch.Tensor:
    """`e` (of coordinates and params only) with the sides placed at the given coordinates."""
    saved = dict(ev.sides)
    try:
        for side, c in at.items():
            ev.sides[side] = _Side(c.shape[0], c, None)
        v = ev.eval_nodes([e], None)[e]
    finally:
        ev.sides.clear()
        ev.sides.update(saved)
    return v


def _decay(ev: PlanEvaluator, f: DecaySum, Y: torch.Tensor) -> torch.Tensor:
    over = f.sum.over
    c = ev.sides[over].coords  # [n, 1]
    step = (c[1] - c[0]) if c.shape[0] > 1 else torch.ones_like(c[0])
    pts = torch.stack([c[0], c[0] + step])  # x0 and the next point
    total = None
    for coef, expo in f.exps:
        E = _coords_at(ev, expo, {"x": pts, over: c[:1]})  # [2, 1, W]
        E = E.reshape(2, -1) if E.dim() >= 2 else E.reshape(1, -1).expand(2, -1)
        rate, g0 = E[1] - E[0], torch.exp(E[0])
        k = _on(ev, coef, "x")[..., :1, :].reshape(-1) * g0  # c_k · exp(E_k(0))
        W = max(Y.shape[-1], rate.shape[-1], k.shape[-1])
        u = Y.expand(*Y.shape[:-1], W)
        y = decay_scan(u, rate.expand(W))
        if f.causal == "<":
            y = y - u
        y = y * k.expand(W)
        total = y if total is None else total + y
    return total


def _conv(ev: PlanEvaluator, f: ConvSum, Y: torch.Tensor) -> torch.Tensor:
    """out[i] = Σ_j g(i − j) Y[j]: the taps g sampled at grid points, then a depthwise conv1d
    (few taps) or an FFT (many)."""
    over, ps = f.sum.over, f.sum
    c = ev.sides[over].coords
    n = c.shape[0]
    D = n - 1
    if f.half_width is not None and n > 1:
        dom = ev.plan.op.domain(ev.plan.spaces[over].domain)
        h = 1.0 if dom.kind.value == "index" else (dom.hi - dom.lo) / (n - 1)  # the spacing
        D = min(n - 1, int(math.ceil(f.half_width / h - 1e-9)) + 1)

    def taps(xs, ys):
        vals = _coords_at(ev, ps.kernel, {"x": xs, over: ys})
        if ps.mask is not None:
            m = _coords_at(ev, ps.mask, {"x": xs, over: ys})
            vals = torch.where(m != 0, vals, torch.zeros((), dtype=vals.dtype, device=vals.device))
        while vals.dim() < 3:
            vals = vals.unsqueeze(0)
        vals = vals.expand(xs.shape[0], ys.shape[0], vals.shape[-1])
        return vals.reshape(xs.shape[0] * ys.shape[0], -1)  # [k, W]

    pos = taps(c[:D + 1], c[:1])  # g(0..D)
    neg = taps(c[:1], c[1:D + 1]) if D > 0 else pos[:0]  # g(-1..-D)
    g = torch.cat([neg.flip(0), pos], dim=0)  # g(-D..D)
    W = max(g.shape[-1], Y.shape[-1])
    g, Y = g.expand(2 * D + 1, W), Y.expand(*Y.shape[:-1], W)
    lead = Y.shape[:-2]
    x = Y.reshape(-1, n, W).transpose(1, 2)  # [N, W, n]
    if 2 * D + 1 <= DIRECT_TAPS:
        out = torch.nn.functional.conv1d(x, g.flip(0).t().unsqueeze(1), padding=D, groups=W)
    else:
        size = n + 2 * D
        fx = torch.fft.rfft(x, n=size)
        fg = torch.fft.rfft(g.t(), n=size)  # [W, size//2+1]
        out = torch.fft.irfft(fx * fg, n=size)[..., D:D + n]
    return out.transpose(1, 2).reshape(*lead, n, W)


def _softmax(ev: PlanEvaluator, f: SoftmaxForm) -> None:
    """The max step and the sums of an attention Plan at once: by torch's
    scaled_dot_product_attention for plain attention, else by `_Softmax`."""
    over = f.sums[0].over
    A, B = _factors(ev, f.terms, over)
    insides = [ps.inside for ps in f.sums if ps.inside != P.ONE]
    if insides:
        V = _cat([_on(ev, e, over) for e in insides])
    else:
        V = B.new_zeros(*B.shape[:-1], 0)
    A, B, V = _lead(A, B, V)
    lead = A.shape[:-2]
    if f.sdpa and USE_SDPA and insides:
        return _sdpa(ev, f, A, B, V, lead)
    keys, leaves = [], []
    if f.rest is not None:
        for n in P.toposort([f.rest]):
            key = (n.op, n.attrs[0]) if n.op in ("param", "ref", "field") else None
            if key is None or key in keys:
                continue
            t = (ev.params[key[1]] if n.op == "param" else ev.env[key[1]] if n.op == "ref"
                 else ev.bound.fields[key[1]])
            keys.append(key)
            leaves.append(t)
    flat = [t.reshape(math.prod(lead), *t.shape[-2:]) for t in (A, B, V)]  # (V may be n × 0)
    m0, acc, l = _Softmax.apply((ev, f, keys, lead), *flat, *leaves)
    n = A.shape[-2]
    ev.env[f.max_step] = m0.reshape(*lead, n, 1)
    _put_sums(ev, f, acc.reshape(*lead, n, -1), l.reshape(*lead, n, 1))


def _sdpa(ev: PlanEvaluator, f: SoftmaxForm, A, B, V, lead) -> None:
    """Plain attention by torch's scaled_dot_product_attention (its flash kernel, forward
    and backward). It returns the normalised Σ exp(s − lse)·v: the Plan's sums are then
    taken relative to the row's log-sum-exp instead of its max, which the ratio does not
    see: the sums of v are the output, the sum of 1 is 1."""
    n, m = A.shape[-2], B.shape[-2]
    O = torch.nn.functional.scaled_dot_product_attention(
        A.reshape(1, -1, n, A.shape[-1]), B.reshape(1, -1, m, B.shape[-1]),
        V.reshape(1, -1, m, V.shape[-1]), is_causal=f.causal == "<=", scale=1.0)
    O = O.reshape(*lead, n, V.shape[-1])
    ev.env[f.max_step] = O.new_zeros(*lead, n, 1)  # (read by nothing but the sums)
    _put_sums(ev, f, O, O.new_ones(*lead, n, 1))


def _put_sums(ev: PlanEvaluator, f: SoftmaxForm, acc: torch.Tensor, l: torch.Tensor) -> None:
    """The softmax sums into the Plan: `acc` holds the insides side by side, `l` the sum of 1."""
    col = 0
    for ps in f.sums:
        if ps.inside == P.ONE:
            _put(ev, ps, l)
        else:
            w = math.prod(_ts(ps.inside.shape))
            _put(ev, ps, acc[..., col:col + w])
            col += w


def _row_tiles(n: int, m: int, causal: str | None):
    """Per tile of rows, its tiles of columns (cols, crosses the diagonal). Under a causal
    mask the columns left of the row tile come in unmasked tiles, the square on its diagonal
    is the one masked tile, and the tiles right of it are skipped."""
    for r0 in range(0, n, ROWS):
        r1 = min(n, r0 + ROWS)
        if causal is None:
            yield slice(r0, r1), [(slice(c0, min(m, c0 + COLS)), False)
                                  for c0 in range(0, m, COLS)]
            continue
        left = min(r0, m)
        tiles = [(slice(c0, min(left, c0 + COLS)), False) for c0 in range(0, left, COLS)]
        last = min(m, r1 if causal == "<=" else r1 - 1)
        if last > r0 or not tiles:  # (the first row of a strict mask: all masked)
            tiles.append((slice(r0, max(last, r0 + 1)), True))
        yield slice(r0, r1), tiles


class _Softmax(torch.autograd.Function):
    """Tiled online softmax: per tile of rows a running max, sum and Σ exp(s − max)·V over
    the tiles of columns; returns (row max m, Σ exp(s − m)·V, Σ exp(s − m)). The backward
    recomputes each tile's scores (flash attention) and keeps nothing n×m; m is a constant of
    the Plan (the ratio does not depend on it), as in the dense backward."""

    @staticmethod
    def forward(ctx, info, A, B, V, *leaves):
        ev, f, keys, lead = info
        N, n, _ = A.shape
        m_all, l_all = A.new_empty(N, n), A.new_empty(N, n)
        clean = f.mask is None and f.rest is None  # then every score is finite
        acc_all = A.new_empty(N, n, V.shape[-1])
        for rows, tiles in _row_tiles(n, B.shape[1], f.causal):
            m_i = l_i = a_i = None
            for cols, cross in tiles:
                S, keep = _scores(ev, f, keys, leaves, lead, A, B, rows, cols, cross)
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
        ctx.info = info
        ctx.save_for_backward(A, B, V, m_all, l_all, *leaves)
        return m_all, acc_all, l_all

    @staticmethod
    def backward(ctx, dm, dacc, dl):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative
            raise UnsupportedError(
                "second derivatives through itdsl's tiled online softmax are not implemented",
                hint="plain q·k attention (torch's SDPA) has them, and so has "
                     'target="reference"')
        ev, f, keys, lead = ctx.info
        A, B, V, m0, l0, *leaves = ctx.saved_tensors
        want = [t.requires_grad for t in leaves]
        dA, dB, dV = torch.zeros_like(A), torch.zeros_like(B), torch.zeros_like(V)
        dleaves = [torch.zeros_like(t) if w else None for t, w in zip(leaves, want)]
        if dacc is None:
            dacc = V.new_zeros(A.shape[0], A.shape[1], V.shape[-1])
        if dl is None:
            dl = torch.zeros_like(m0)
        if f.mask is not None or f.rest is not None:  # (else every row has a term exp(0))
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
                                                keep_rest=True)
                    S = S.detach()
                else:
                    S, keep = _scores(ev, f, keys, leaves, lead, A, B, rows, cols, cross)
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


def _scores(ev, f: SoftmaxForm, keys, leaves, lead, A, B, rows: slice, cols: slice, cross: bool,
            keep_rest: bool = False):
    """(scores of one tile `[N, R, K]` with masked entries -inf, 1 where kept and 0 where
    masked or None; with `keep_rest`, also the position term as computed, for its gradient)."""
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
    saved = []
    for (op, name), t in zip(keys, leaves):
        where = ev.params if op == "param" else ev.env if op == "ref" else ev.bound.fields
        saved.append((where, name, where[name]))
        where[name] = t
    ev.cols = cols
    try:
        v = ev.eval_nodes([e], rows)[e]  # [*B?, R, K, 1]
    finally:
        ev.cols = None
        for where, name, t in saved:
            where[name] = t
    v = v[..., 0]
    while v.dim() < 2:
        v = v.unsqueeze(0)
    v = v.expand(*lead, shape[1], shape[2]) if lead else v.expand(shape[1], shape[2])
    return v.reshape(shape)
