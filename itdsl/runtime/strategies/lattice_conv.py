"""lattice_conv (`symbolic/strategies/lattice_conv.py`): D-dimensional convolutions on index(D)
lattices by the library (F.conv1d/2d/3d, torch.fft). torch autograd gives the gradients.

- A stencil convolution samples its kernel K(u, v, t) once — by the Plan evaluator, on the
  call with the output's lattice shrunk to one point (K does not depend on that point) —
  into the library's weight layout, then calls F.convNd with the read's stride and
  dilation; the read's offset becomes padding (or cropping), so that a read outside the
  field's lattice is 0, as the definition says, and the output covers the output lattice.
- A lag convolution samples K(p − q) (and its bracket) at every offset p − q of the two
  lattices: a direct depthwise convolution over the bracket's support when that spans few
  taps, else an FFT zero padded to n_p + n_q − 1 per axis (no wrap-around).

The sampled weights are kept per param version, sizes, dtype and device while no gradient
is recorded (inference); while autograd records they are sampled on every call, so the
gradients reach the params.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ...settings import memory_budget
from ...symbolic import pexpr as P
from ...symbolic.plan import X_SIDE, Plan, Step
from ...symbolic.strategies.forms import inline
from ...symbolic.strategies.lattice_conv import LagConv, StencilConv
from ..binding import Bound
from ..plan_eval import PlanEvaluator, evaluate_plan, tshape
from . import tuning as T
from .common import Runner, on, output, put

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
HALF = (torch.float16, torch.bfloat16)  # no CPU FFT in these: transformed in float32


# ---- one convolution, padded or cropped to the output -----------------------------------------


def conv(x: torch.Tensor, w: torch.Tensor, groups: int, stride, dilation, left,
         n_out) -> torch.Tensor:
    """out[b, o, p] = Σ_{i, k} w[o, i, k]·x̃[b, i, c·p + δ·k] for p in [0, n_out) per axis, with
    x̃ = x shifted by `left` (zeros before it and past its end; a negative `left` crops)."""
    D = len(n_out)
    L = x.shape[2:]
    k = w.shape[2:]
    extent = [c * (n - 1) + dl * (kk - 1) + 1 for c, n, dl, kk in zip(stride, n_out, dilation, k)]
    left = list(left)
    for i, (lf, e, ln) in enumerate(zip(left, extent, L)):
        if lf >= e or lf <= -ln:  # every read along this axis is outside: zeros of the
            x, left[i] = x.narrow(2 + i, 0, 0), 0  # extent (not a padding as far as the offset)
    L = x.shape[2:]
    right = [e - lf - ln for e, lf, ln in zip(extent, left, L)]
    if min(left) < 0 or min(right) < 0:
        x = x[(slice(None), slice(None)) + tuple(slice(max(0, -lf), ln - max(0, -r))
                                                 for lf, r, ln in zip(left, right, L))]
    left = [max(v, 0) for v in left]
    right = [max(v, 0) for v in right]
    fn = CONV[D]
    if all(r <= lf for r, lf in zip(right, left)) and all(s > 0 for s in x.shape[2:]):
        out = fn(x, w, stride=tuple(stride), dilation=tuple(dilation), padding=tuple(left),
                 groups=groups)  # symmetric: the extra outputs on the right are cut below
    else:
        pads = [v for lf, r in reversed(list(zip(left, right))) for v in (lf, r)]
        out = fn(F.pad(x, pads), w, stride=tuple(stride), dilation=tuple(dilation),
                 groups=groups)
    for i, n in enumerate(n_out):
        if out.shape[2 + i] != n:
            out = out.narrow(2 + i, 0, n)
    return out


# ---- stencil convolutions ---------------------------------------------------------------------


def _axes_of(plan: Plan, side: str, var: str, bound: Bound) -> tuple[int, ...]:
    """The sizes of the axes a side's variable runs over (a rule's own nodes: n per axis)."""
    fac = plan.spaces[side].factor(var)
    dom = plan.op.domain(fac.domain)
    if fac.quad is not None and fac.quad.rule.entry.own_nodes:
        return (fac.quad.n,) * dom.naxes
    return bound.axes[dom.name]


def shrunk(plan: Plan, params: dict, bound: Bound, lattice: str) -> PlanEvaluator:
    """A Plan evaluator of the call with the output's lattice variable `lattice` on one point
    (for what does not depend on it: a stencil's kernel, a bias of the channels)."""
    dom = plan.spaces[X_SIDE].factor(lattice).domain
    small = dataclasses.replace(bound, sizes={**bound.sizes, dom: 1},
                                axes={**bound.axes, dom: (1,) * len(bound.axes[dom])})
    return PlanEvaluator(plan, params, small)


def sample_stencil(plan: Plan, params: dict, bound: Bound, f: StencilConv) -> torch.Tensor:
    """K at every (u, v, t) as `[n_u, n_v, *taps, C_K]` (n_u, n_v: 1 where there is no such
    variable; n_v 1 too where v is summed over, not read from the field; the taps in the
    weights' order, flipped on the axes read at p − t): the Plan evaluator, on the call with
    the output's lattice shrunk to one point."""
    sy = plan.spaces[f.over]
    ev = shrunk(plan, params, bound, f.lattice)
    nx, ny = ev.sides[X_SIDE].n, ev.sides[f.over].n
    ts = tshape(f.kernel.shape)
    # rows of u at once: what sampling holds within the memory budget
    rows = max(1, memory_budget() // max(1, ny * f.pair_values * ev.dtype.itemsize))
    if X_SIDE in f.kernel.deps and nx > rows:
        vals = torch.cat([ev.value(f.kernel, slice(lo, min(nx, lo + rows)))
                          for lo in range(0, nx, rows)], dim=-len(ts) - 2)
    else:
        vals = ev.value(f.kernel)
    vals = vals.reshape(vals.shape[-len(ts) - 2:])  # (K reads no batched tensor)
    K = vals.expand(nx, ny, *ts).reshape(nx, ny, -1)
    # the integral's side, unflattened: one dim per variable (the taps: one per axis)
    dims, names = [], []
    for fac in sy.factors:
        axes = _axes_of(plan, f.over, fac.var, bound)
        if fac.var == f.taps:
            dims += list(axes)
            names += [f"t{i}" for i in range(len(axes))]
        else:
            dims.append(math.prod(axes))
            names.append("v")
    K = K.reshape(nx, *dims, K.shape[-1])
    order = (["v"] if "v" in names else []) + [f"t{i}" for i in range(f.dim)]
    K = K.permute(0, *(1 + names.index(n) for n in order), K.dim() - 1)
    if "v" not in names:
        K = K.unsqueeze(1)
    elif f.field_channel != "v":  # v in K only: its sum is the kernel
        K = K.sum(1, keepdim=True)
    flips = [2 + i for i in range(f.dim) if f.flip[i]]
    return K.flip(flips) if flips else K


def stencil_weight(f: StencilConv, K: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The library's weight `[C_out, C_in / groups, *taps]` and groups, from K `[n_u, n_i,
    *taps, C_K]`. Channels: grouped (u, c), depthwise over c (c, u) with n_i inputs per
    group, or one group (u, c)."""
    nu, ni, kc, cf = K.shape[0], K.shape[1], K.shape[-1], f.channels
    taps = K.shape[2:-1]
    if f.field_channel == "u":
        if cf > 1:
            w = K.expand(*K.shape[:-1], cf).movedim(-1, 1)  # [n_u, C, 1, *taps]
            return w.reshape(nu * cf, 1, *taps), nu * cf
        return K.movedim(-1, 1).reshape(nu * kc, 1, *taps), nu
    if cf > 1:
        w = K.expand(*K.shape[:-1], cf).movedim(-1, 0)  # [C, n_u, n_i, *taps]
        return w.reshape(cf * nu, ni, *taps), cf
    return K.movedim(-1, 1).reshape(nu * kc, ni, *taps), 1


def _field_input(plan: Plan, bound: Bound, f: StencilConv) -> tuple[torch.Tensor, tuple]:
    """The field as the library's input `[B, C_in, *lattice]` (channels as the weight
    wants them), and its batch dims."""
    op = plan.op
    x = bound.fields[f.field]  # [*B, N, C]
    lead = x.shape[:-2]
    cf = x.shape[-1]
    dims, chan_at = [], None
    for name in op.input(f.field).domains:
        if name == f.field_lattice:
            dims += list(bound.axes[name])
        else:
            chan_at = len(dims)
            dims.append(math.prod(bound.axes[name]))
    x = x.reshape(math.prod(lead), *dims, cf)
    if chan_at is None:
        x = x.unsqueeze(1)
    elif chan_at > 0:  # the channel domain after the lattice
        x = x.movedim(1 + chan_at, 1)
    x = x.movedim(-1, 2)  # [B, n_f, C, *lattice]
    if f.field_channel != "u" and cf > 1:
        x = x.transpose(1, 2)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:]), lead


def _to_side(plan: Plan, f: StencilConv, out: torch.Tensor, nu: int,
             lead: tuple) -> torch.Tensor:
    """The library's output `[B, C_out, *lattice]` as the output side's values `[*B, n, C]`."""
    sx = plan.spaces[X_SIDE]
    n_out = out.shape[2:]
    co = out.shape[1] // nu
    if f.field_channel != "u" and f.channels > 1:  # channels (c, u)
        out = out.reshape(out.shape[0], co, nu, *n_out).transpose(1, 2)
    else:
        out = out.reshape(out.shape[0], nu, co, *n_out)
    out = out.movedim(2, -1)  # [B, n_u, *lattice, C]
    if f.out_channel is not None and sx.vars.index(f.out_channel) > sx.vars.index(f.lattice):
        out = out.movedim(1, -2)  # the lattice first: [B, *lattice, n_u, C]
    return out.reshape(*lead, nu * math.prod(n_out), co)


def _taps_origin(plan: Plan, f: StencilConv) -> tuple[int, ...]:
    """The first tap's offset on each axis (a stencil's −(k − 1)/2, an index's 0, whatever
    its size): known from the declarations, so computed once (not in code torch.compile
    traces, which would turn the domain's numpy points into tensors)."""
    dom = plan.op.domain(plan.spaces[f.over].factor(f.taps).domain)
    sizes = dom.fixed or (1,) * dom.naxes
    return tuple(int(a.kind.entry.points(a, k)[0]) for a, k in zip(dom.axes, sizes))


# ---- lag convolutions -------------------------------------------------------------------------


def sample_lag(ev: PlanEvaluator, f: LagConv, np_: tuple, nq: tuple):
    """K(d) (masked) and the bracket at every offset d = p − q, d[i] in −(n_q[i] − 1) …
    n_p[i] − 1: `[*S, C_K]` and `[*S]` (None: no bracket), S[i] = n_p[i] + n_q[i] − 1."""
    S = [a + b - 1 for a, b in zip(np_, nq)]
    ranges = [torch.arange(-(b - 1), a, device=ev.device) for a, b in zip(np_, nq)]
    d = torch.stack(torch.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, len(S))
    d = d.to(ev.dtype)
    view = ev.at({X_SIDE: d, f.sum.over: torch.zeros(1, len(S), dtype=ev.dtype,
                                                     device=ev.device)})
    k = d.shape[0]
    g = view.value(f.sum.kernel)
    g = g.reshape(g.shape[-len(tshape(f.sum.kernel.shape)) - 2:])
    g = g.expand(k, 1, *g.shape[2:]).reshape(*S, -1)
    mask = None
    if f.sum.mask is not None:
        m = view.value(f.sum.mask)
        mask = (m.reshape(m.shape[-3:]).expand(k, 1, 1) != 0).reshape(S)
        g = torch.where(mask[..., None], g, torch.zeros((), dtype=g.dtype, device=g.device))
    return g, mask


def lag_kernel(ev: PlanEvaluator, f: LagConv, np_: tuple, nq: tuple) -> tuple:
    """("direct", taps over the bracket's support `[*k, C]` flipped, left padding) or
    ("fft", the kernel's rfftn `[C, *S']`, S)."""
    g, mask = sample_lag(ev, f, np_, nq)
    D = len(np_)
    if not _finite(g):
        return ("spread",)  # an inf or NaN of K: the library call would spread it
    if mask is not None:
        idx = mask.nonzero()
        if idx.shape[0] == 0:
            return ("zero",)
        lo = (idx.amin(0) - torch.tensor(nq, device=idx.device) + 1).tolist()
        hi = (idx.amax(0) - torch.tensor(nq, device=idx.device) + 1).tolist()
        if math.prod(h - low + 1 for low, h in zip(lo, hi)) <= T.LATTICE_DIRECT_TAPS:
            box = tuple(slice(low + b - 1, h + b) for low, h, b in zip(lo, hi, nq))
            taps = g[box].flip(list(range(D)))  # w[k] = g(hi − k)
            return ("direct", taps, hi)
    # the linear convolution needs a + b − 1 points per axis; any more are exact too (the
    # wrap-around lands on the first b − 1 outputs, which are dropped): the next size whose
    # FFT is fast (a prime such as 127 is several times slower than 128)
    S = [_fft_size(a + b - 1) for a, b in zip(np_, nq)]
    G = g.movedim(-1, 0)
    G = G.float() if G.dtype in HALF else G
    fg = torch.fft.rfftn(G, s=S, dim=list(range(1, D + 1)))
    if not _finite(torch.view_as_real(fg)):
        return ("spread",)  # finite K whose transform overflows: the evaluator
    return ("fft", fg, S)


def _fft_size(n: int) -> int:
    """The smallest 2^i·3^j·5^k ≥ n."""
    best = 1 << max(0, (n - 1).bit_length())
    f5 = 1
    while f5 < best:
        f35 = f5
        while f35 < best:
            m = f35
            while m < n:
                m *= 2
            best = min(best, m)
            f35 *= 3
        f5 *= 5
    return best


class Spread(Exception):
    """An inf or NaN that a library call would spread where the definition does not."""


def _finite(t: torch.Tensor) -> bool:
    """Every value of `t` is finite (a kernel: checked once per param version), or
    torch.compile is tracing (a branch on values is left out of its graph)."""
    return torch.compiler.is_compiling() or bool(torch.isfinite(t).all())


def _sum_finite(t: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """The sum of `t` is finite (data, on every call: one reduction; an overflow of the sum
    counts as not finite, and the evaluator then is exact too), or torch.compile is tracing."""
    return torch.compiler.is_compiling() or math.isfinite(t.sum(dtype=dtype).item())


def lag_apply(kernel: tuple, Y: torch.Tensor, np_: tuple, nq: tuple) -> torch.Tensor:
    """Σ_q g(p − q)·Y[q]: `Y` `[B, C, *n_q]` -> `[B, C, *n_p]`. Raises `Spread` where Y holds
    an inf or NaN that the convolution would spread (but torch.compile's graph does not):
    over the masked taps of a direct one (weight 0 · inf), over every output of an FFT."""
    D = len(np_)
    if kernel[0] == "spread":
        raise Spread
    if kernel[0] == "zero":  # (a bracket masks the whole product, an inf of Y too)
        return Y.new_zeros(*Y.shape[:2], *np_)
    if kernel[0] == "direct":
        if not _sum_finite(Y, torch.float32 if Y.dtype in HALF else None):
            raise Spread
        taps, hi = kernel[1], kernel[2]
        w = taps.expand(*taps.shape[:-1], Y.shape[1]).movedim(-1, 0).unsqueeze(1)
        return conv(Y, w.contiguous(), Y.shape[1], (1,) * D, (1,) * D, hi, np_)
    fg, S = kernel[1], kernel[2]
    # rfftn and irfftn one axis at a time, so that no transform runs over rows that are all
    # padding (the last axis first: the other axes' padding is not there yet) or over rows
    # of the result that are dropped (out[p] lies at p + n_q − 1: kept after each inverse)
    dtype = Y.dtype
    Y = (Y.float() if dtype in HALF else Y).contiguous()  # (strided: slower transforms)
    fy = torch.fft.rfft(Y, n=S[-1], dim=D + 1)
    rest = list(range(2, D + 1))  # the other axes, transformed together
    if rest:
        fy = torch.fft.fftn(fy, s=S[:-1], dim=rest)
    # the transform at frequency 0 is the sum of Y's points: an inf or NaN of Y makes it,
    # and the sum of those, one (as may an overflow: then the evaluator, exact too). Finite
    # Y near the float's largest value can still overflow at other frequencies: not checked
    if not _sum_finite(torch.view_as_real(fy[(...,) + (0,) * D])):
        raise Spread
    out = fy * fg
    if rest:
        out = torch.fft.ifftn(out, dim=rest)
        for i in range(D - 1):
            out = out.narrow(2 + i, nq[i] - 1, np_[i])
    out = torch.fft.irfft(out, n=S[-1], dim=D + 1).narrow(D + 1, nq[-1] - 1, np_[-1])
    return out.to(dtype)


# ---- what does not depend on the output's lattice ------------------------------------------


def _static(e: P.Node, plan: Plan, lattice: str) -> P.Node | None:
    """`e` with refs inlined if it is a function of the coordinates of the output's other
    variables and of params only (no input, no integral, not of `lattice`); else None."""
    e = inline(e, plan)
    for n in P.toposort([e]):
        if n.op in ("field", "read", "cot", "ref"):
            return None
        if n.op in ("coord", "pos") and n.var == lattice:
            return None
    return e


def split_static(plan: Plan, steps: list[Step], needed: set[str], lattice: str
                 ) -> tuple[list[Step], dict[str, P.Node]]:
    """The forward steps with the largest parts of the output's per-point steps that do not
    depend on its lattice (a bias `c(u)`: per point of U, not of U × P) made steps of their
    own, and those parts by step name (computed on one point of the lattice, then spread)."""
    out, static = [], {}
    for st in steps:
        if st.name not in needed or st.kind != "point" or st.side != X_SIDE:
            out.append(st)
            continue
        whole = _static(st.expr, plan, lattice)
        if whole is not None:
            static[st.name] = whole
            out.append(st)
            continue
        mapping: dict = {}
        inside: set = set()  # parts of a part already split off
        for n in reversed(P.toposort([st.expr])):  # parents first: the largest parts
            if n in inside or n in mapping or X_SIDE not in n.deps or P.cost([n]) == 0:
                continue
            part = _static(n, plan, lattice)
            if part is None:
                continue
            name = f"{st.name}_static{len(mapping)}"
            static[name] = part
            out.append(Step("point", name, X_SIDE, part))
            mapping[n] = P.ref(name, X_SIDE, n.shape)
            inside.update(P.toposort(list(n.args)))
        expr = P.substitute([st.expr], mapping)[0] if mapping else st.expr
        out.append(Step(st.kind, st.name, st.side, expr, st.over, st.mask))
    return out, static


def spread(plan: Plan, bound: Bound, small: torch.Tensor, lattice: str, nts: int
           ) -> torch.Tensor:
    """A value of the output's side on one point of its lattice `[*B?, n_small, *ts]`
    spread over the whole lattice: `[*B?, n, *ts]`."""
    sx = plan.spaces[X_SIDE]
    sizes = [1 if fac.var == lattice else math.prod(bound.axes[fac.domain])
             for fac in sx.factors]
    full = [math.prod(bound.axes[fac.domain]) for fac in sx.factors]
    lead, ts = small.shape[:small.dim() - nts - 1], small.shape[small.dim() - nts:]
    small = small.expand(*lead, math.prod(sizes), *ts).reshape(*lead, *sizes, *ts)
    return small.expand(*lead, *full, *ts).reshape(*lead, -1, *ts)


# ---- the runner -------------------------------------------------------------------------------


def _needed(plan: Plan, steps: list[Step], parts: dict) -> set[str]:
    """The forward steps the output needs, a convolution's own (its kernel is sampled, the
    field read by the library) left out."""
    steps = {st.name: st for st in steps}
    out: set[str] = set()
    todo = ["out"]
    while todo:
        name = todo.pop()
        if name in out or name not in steps:
            continue
        out.add(name)
        f = parts.get(name)
        roots = (steps[name].roots if f is None else [f.outside] if isinstance(f, StencilConv)
                 else [f.sum.outside, f.sum.inside])
        todo += [n.name for n in P.toposort(roots) if n.op == "ref"]
    return out


def _reads_points(e: P.Node, side: str = X_SIDE) -> bool:
    """`e` reads the coordinates, positions or weights of `side`'s points, or a field at a
    computed point (whose bounds are the lattices' sizes)."""
    return any((n.op in ("coord", "pos", "weight") and n.side == side) or n.op == "read"
               for n in P.toposort([e]))


class LatticeConvRunner(Runner):
    """The forward steps in torch, each convolution by the library; the sampled kernels kept
    while they are valid and no gradient is recorded."""

    def __init__(self, plan: Plan):
        super().__init__(plan)
        self.parts = {f.step: f for f in self.form}
        self.origins = {f.step: _taps_origin(plan, f) for f in self.form
                        if isinstance(f, StencilConv)}
        self.steps = list(plan.forward.steps)
        self.needed = _needed(plan, self.steps, self.parts)
        lattices = {f.lattice for f in self.form if isinstance(f, StencilConv)}
        # the output's steps that do not depend on its lattice, computed on one point of it
        self.lattice = lattices.pop() if len(lattices) == 1 else None
        self.static: dict[str, P.Node] = {}
        self.light = False
        if self.lattice is not None:
            self.steps, self.static = split_static(plan, self.steps, self.needed, self.lattice)
            self.needed = _needed(plan, self.steps, self.parts)
            # no step left reads the output's points: the evaluator of the other steps need
            # not lay them out (U × P, flattened: as much work as a small convolution)
            roots = [r for st in self.steps if st.name in self.needed
                     and st.name not in self.static
                     for r in ([self.parts[st.name].outside] if st.name in self.parts
                               else st.roots)]
            self.light = (all(isinstance(f, StencilConv) for f in self.form)
                          and not any(_reads_points(r) for r in roots))
        # points of the call (a points domain's coordinates, a weights field): what is
        # sampled from them is sampled on every call, never kept
        self.reads_call = any(
            plan.op.domain(fac.domain).kind.entry.given
            or (fac.quad is not None and fac.quad.rule.entry.from_input)
            for sp in plan.spaces.values() for fac in sp.factors)
        # the fields whose NaN or inf a stencil's library call would spread where the
        # definition does not: through a tap a bracket masks (weight 0 · inf; a bracket
        # factor of K masks taps, one inside a sum, as a `per` spline's choice of its stencil
        # point's spline, does not). A lag convolution checks the values it convolves.
        self.finite_only = sorted(
            {f.field for f in self.form
             if isinstance(f, StencilConv) and any(n.op in P.BRACKETS
                                                   for n in P.factors(f.kernel))})
        self._light: dict[tuple, PlanEvaluator] = {}  # per sizes, dtype and device: one
        self._kept: dict[str, tuple[tuple, object]] = {}

    def _light_evaluator(self, params: dict, bound: Bound) -> PlanEvaluator:
        """An evaluator of the steps that read no point of the output: the call with one
        point of the lattice (no input kept), viewed with all of them (their coordinates
        never read), made once per sizes, dtype and device; a view of it per call."""
        # nothing kept while torch.compile traces (its graph is made once) or where the sides
        # read the call's points (a points domain's coordinates, a weights field)
        kept = not (torch.compiler.is_compiling() or self.reads_call)
        key = (tuple(sorted(bound.axes.items())), bound.dtype, bound.device) if kept else None
        ev = self._light.get(key)
        if ev is None:
            small = shrunk(self.plan, params,
                           dataclasses.replace(bound, fields={}) if kept else bound,
                           self.lattice)
            n = math.prod([math.prod(bound.axes[d]) for d in self.plan.spaces[X_SIDE].domains])
            ev = small.at({X_SIDE: torch.zeros((), dtype=small.dtype,
                                               device=small.device).expand(n, 1)})
            if key is not None:
                self._light = {key: ev}
        return ev.tile(None, params=params, fields=bound.fields)

    def __call__(self, params: dict[str, torch.Tensor], bound: Bound,
                 generator: torch.Generator | None = None,
                 weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if weights:  # (a sampled rule is not a convolution's: the Plan recognises none)
            return evaluate_plan(self.plan, params, bound, generator, weights=weights)[0]
        if self.finite_only and not torch.compiler.is_compiling() and not all(
                bool(torch.isfinite(bound.fields[name]).all()) for name in self.finite_only):
            # NaN or inf where a library call would spread it: the Plan evaluator, which
            # masks as the definition does (under torch.compile the check, a branch on
            # values, is left out)
            return evaluate_plan(self.plan, params, bound, generator)[0]
        if self.light:
            ev = self._light_evaluator(params, bound)
        else:
            ev = PlanEvaluator(self.plan, params, bound, generator)
        ev.expand_batch = False  # a value the same for every batch entry stays one value
        try:
            self.run(ev, bound)
        except Spread:  # (the evaluator again, as above)
            return evaluate_plan(self.plan, params, bound, generator)[0]
        return output(self.plan, ev, bound)

    def run(self, ev: PlanEvaluator, bound: Bound) -> None:
        params = ev.params
        keep = self._keeps(params) and not self.reads_call
        if keep and not self._same_params(params):  # (a write through `.data` keeps the
            self._kept.clear()  # version counter: the values themselves are compared)
        for st in self.steps:
            if st.name not in self.needed:
                continue
            f = self.parts.get(st.name)
            if st.name in self.static:
                ev.env[st.name] = self._static(ev, bound, st, keep)
            elif f is None:
                ev.env[st.name] = ev.run_step(st)
            elif isinstance(f, StencilConv):
                put(ev, f, self._stencil(ev, bound, f, keep))
            else:
                put(ev, f.sum, self._lag(ev, bound, f, keep))

    @staticmethod
    def _key(ev: PlanEvaluator, bound: Bound, domains) -> tuple:
        return (tuple((p._version, p.data_ptr()) for p in ev.params.values()),
                tuple(bound.axes.get(d) for d in domains), ev.dtype, ev.device)

    def _kept_or(self, step: str, key: tuple | None, make):
        if key is not None:
            kept = self._kept.get(step)
            if kept is not None and kept[0] == key:
                return kept[1]
        value = make()
        if key is not None:
            self._kept[step] = (key, value)
        return value

    def _static(self, ev: PlanEvaluator, bound: Bound, st: Step, keep: bool) -> torch.Tensor:
        """A step of the output's side that does not depend on its lattice: on one point of
        the lattice, then spread (kept like the weights)."""
        plan, e = self.plan, self.static[st.name]
        nts = len(tshape(e.shape))

        def make():
            small = shrunk(plan, ev.params, bound, self.lattice)
            v = small.eval_level(e, X_SIDE)  # [*B?, X, 1, *ts]
            return spread(plan, bound, v.squeeze(-nts - 1), self.lattice, nts)

        key = self._key(ev, bound, plan.spaces[X_SIDE].domains) if keep else None
        return self._kept_or(st.name, key, make)

    def _stencil(self, ev: PlanEvaluator, bound: Bound, f: StencilConv,
                 keep: bool) -> torch.Tensor:
        plan = self.plan
        sx, sy = plan.spaces[X_SIDE], plan.spaces[f.over]
        chans = [s.factor(v).domain for s, v in ((sx, f.out_channel), (sy, f.in_channel),
                                                 (sy, f.taps)) if v is not None]

        def make():
            K = sample_stencil(plan, ev.params, bound, f)
            w, groups = stencil_weight(f, K)
            return w.contiguous(), groups, K.shape[0]

        key = self._key(ev, bound, chans) if keep else None
        w, groups, nu = self._kept_or(f.step, key, make)
        t0 = self.origins[f.step]
        x, lead = _field_input(plan, bound, f)
        taps = w.shape[2:]
        left = [dl * (t + k - 1) - d if flip else -(dl * t + d)
                for t, k, dl, d, flip in zip(t0, taps, f.dilation, f.offset, f.flip)]
        n_out = bound.axes[sx.factor(f.lattice).domain]
        out = conv(x, w, groups, f.stride, f.dilation, left, n_out)
        return _to_side(plan, f, out, nu, lead)

    def _lag(self, ev: PlanEvaluator, bound: Bound, f: LagConv, keep: bool) -> torch.Tensor:
        plan = self.plan
        pdom, qdom = plan.spaces[X_SIDE].domain, plan.spaces[f.sum.over].domain
        np_, nq = bound.axes[pdom], bound.axes[qdom]
        key = self._key(ev, bound, (pdom, qdom)) if keep else None
        kernel = self._kept_or(f.step, key, lambda: lag_kernel(ev, f, np_, nq))
        Y = on(ev, f.sum.inside, f.sum.over)  # [*B?, m, C]
        width = {1, Y.shape[-1]} | ({kernel[1].shape[-1]} if kernel[0] == "direct" else
                                    {kernel[1].shape[0]} if kernel[0] == "fft" else set())
        C = max(width)
        Y = Y.expand(*Y.shape[:-1], C)
        lead = Y.shape[:-2]
        Y = Y.reshape(math.prod(lead), *nq, C).movedim(-1, 1)
        out = lag_apply(kernel, Y, np_, nq)  # [B, C, *n_p]
        return out.movedim(1, -1).reshape(*lead, -1, C)


runner = LatticeConvRunner
