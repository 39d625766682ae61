"""Lattice convolutions: a D-dimensional convolution (D = 1, 2, 3) on an `index(D)` lattice.

Two forms, each read off the built Plan of a version-1 program (its forward sum steps, their
factors, leaves and read indices; refs to per-point and per-call steps inlined, so what is
hoisted is seen as written). No sympy: the structure is enough.

- **Stencil** (`StencilConv`): I[u?, p] = Σ_{v?, t} K(u, v, t; params) · f(v?, c·p ± δ·t + d)
  with p a point of an index(D) lattice (the output's), t of a stencil (or an index(D) domain)
  and, on each lattice axis i, the field read at c·p[i] ± δ·t[i] + d (c ≥ 1 the stride, δ ≥ 1
  the dilation, d an offset; `p − t` is a flipped kernel). K reads no field and neither p
  nor anything of it: only the channel variables' coordinates (u on the output, v on the
  integral), the stencil offset and the params (and the quadrature weights of V's and T's
  rules). The field's channels decide the library call: a channel domain V read at v
  mixes channels (a full convolution, weight[u, v, taps] = w_v·w_t·K(u, v, t)); read at the
  output's u, one group per u; the R^C channels of the field, K elementwise: depthwise
  (groups = C). Factors of the output point only (any, p's included) multiply the result.
- **Lag** (`LagConv`): I[p] = Σ_q [mask(p − q)] · K(p − q; params) · v(q) with p and q on
  index(D) lattices (sizes may differ) and K, the mask functions of p − q: every
  occurrence of p's and q's coordinates in them is inside a linear combination whose
  coefficients of p[i] and q[i] cancel (`p − q`, `2·p[0] − 2·q[0]`). A kernel that is not
  of this form (`(1 + p[0]·q[1])·…`) is not taken, even where it might be translation
  invariant after some algebra: then dense. v(q) is everything of q only (the field,
  quadrature weights).

The runtime (`runtime/strategies/lattice_conv.py`) samples K (stencil: on a call whose
output lattice is one point; lag: at every offset p − q) and calls F.conv1d/2d/3d, or
torch.fft for a global lag kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...frontend import ir
from ...frontend.ast import DomainKind
from .. import pexpr as P
from ..pexpr import Node
from ..plan import X_SIDE, Plan, Step, StepKind
from ..show import show
from .entry import LIBRARY, Call, Match, Miss, Rule, Strategy, short
from .forms import PairSum, inline, pair_sums
from .matmul import pair_values

# ---- the analysis the rules read: the built Plan ----------------------------------------------


class OnPlan:
    """What the rules of a version-1 program read: the operator and its Plan, built once
    (without a strategy) when a rule first asks for it."""

    def __init__(self, op: ir.Operator):
        self.op = op
        self._plan: Plan | None = None

    @property
    def plan(self) -> Plan:
        if self._plan is None:
            from ..build import build_plan
            self._plan = build_plan(self.op)
        return self._plan


# ---- structure of plan expressions ------------------------------------------------------------


Key = tuple[str, str, str, int | None]  # (coord | pos, side, var, component or None)


def linear(e: Node) -> dict[Key | None, float] | None:
    """`e` as Σ coeff·leaf + const (the const under None), the leaves coordinates or
    positions of point variables or their components; None if it is not of that form."""
    op = e.op
    if op == "const":
        return {None: e.value}
    if op in ("coord", "pos"):
        return {(op, e.side, e.var, None): 1.0}
    if op == "component" and e.args[0].op in ("coord", "pos"):
        a = e.args[0]
        return {(a.op, a.side, a.var, e.attr("index")): 1.0}
    if op in ("+", "-"):
        a, b = linear(e.args[0]), linear(e.args[1])
        if a is None or b is None:
            return None
        out = dict(a)
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + (v if op == "+" else -v)
        return out
    if op == "neg":
        a = linear(e.args[0])
        return None if a is None else {k: -v for k, v in a.items()}
    if op == "*":
        a, b = linear(e.args[0]), linear(e.args[1])
        if a is None or b is None:
            return None
        for s, t in ((a, b), (b, a)):
            if set(s) <= {None}:
                c = s.get(None, 0.0)
                return {k: c * v for k, v in t.items()}
        return None
    if op == "/" and e.args[1].is_const and e.args[1].value != 0:
        a = linear(e.args[0])
        return None if a is None else {k: v / e.args[1].value for k, v in a.items()}
    return None


def lag_only(e: Node, over: str) -> str | None:
    """None if `e` depends on the two sides only through p − q (see the module's docstring);
    else what breaks it."""
    memo: dict[int, str | None] = {}

    def balanced(lin: dict) -> bool:
        terms = {k: v for k, v in lin.items() if k is not None and v != 0}
        if any(k[0] != "coord" for k in terms):
            return False
        xs = {k[3]: v for k, v in terms.items() if k[1] == X_SIDE}
        ys = {k[3]: v for k, v in terms.items() if k[1] == over}
        return set(xs) == set(ys) and all(xs[i] + ys[i] == 0 for i in xs)

    def go(n: Node) -> str | None:
        if id(n) in memo:
            return memo[id(n)]
        if not ({X_SIDE, over} & n.deps):
            why = None
        elif n.op in ("field", "read", "weight", "cot", "ref", "pos"):
            why = f"it reads `{short(show(n), 60)}`"
        elif n.op == "coord":
            why = f"`{n.var}` appears outside a difference of the two points"
        else:
            lin = linear(n)
            if lin is not None and balanced(lin):
                why = None
            elif lin is not None and not n.shape:
                why = (f"`{short(show(n), 60)}` is not a function of the difference of the "
                       "two points")
            else:
                why = next((w for w in map(go, n.args) if w is not None), None)
        memo[id(n)] = why
        return why

    return go(e)


def leaves(e: Node) -> list[Node]:
    return [n for n in P.toposort([e]) if not n.args or n.op == "read"]


# ---- the stencil form -------------------------------------------------------------------------


@dataclass(frozen=True)
class StencilConv:
    """I[u?, p] = outside(x) · Σ_{v?, t} K(u, v, t) · f(v?, c·p ± δ·t + d): a library
    convolution with weights K sampled on U × V × T."""

    step: str
    over: str
    field: str  # the input read at the affine point
    field_lattice: str  # the lattice domain of the field the read moves on
    kernel: Node  # K: every factor but the read and those of x only (refs inlined)
    outside: Node  # the factors of x only (multiplied after the convolution)
    lattice: str  # p: the output's lattice variable
    taps: str  # t: the stencil's variable (on the integral's side)
    stride: tuple[int, ...]  # c, per axis
    dilation: tuple[int, ...]  # δ, per axis
    flip: tuple[bool, ...]  # read at c·p − δ·t (a flipped kernel), per axis
    offset: tuple[int, ...]  # d, per axis
    out_channel: str | None  # u: the output's other variable (a channel domain), if any
    in_channel: str | None  # v: the integral's other variable, if any
    field_channel: str | None  # the field's channel domain read at "v" (channels mix), at
    #                            "u" (one group per u), or None (the field has none)
    channels: int  # the field's R^C width (1 for R)
    kernel_channels: int  # K's width (1: a scalar)
    pair_values: int = 1  # values per (u, (v, t)) sampling K holds at once (matmul's count)
    given: tuple[str, ...] = ()  # the call's arguments K reads: coordinates of a points
    #                              domain (a channel axis's nodes), a weights field

    @property
    def dim(self) -> int:
        return len(self.stride)

    @property
    def mode(self) -> str:
        """How channels combine: "full" (V mixes through the integral), "grouped" (one
        group per u), "depthwise" (K per R^C channel) or "plain" (one channel)."""
        if self.field_channel == "v":
            return "full"
        if self.field_channel == "u":
            return "grouped"
        return "depthwise" if self.channels > 1 else "plain"

    def read_text(self) -> str:
        def axis(i: int) -> str:
            c, dl, d = self.stride[i], self.dilation[i], self.offset[i]
            p = self.lattice + (f"[{i}]" if self.dim > 1 else "")
            t = self.taps + (f"[{i}]" if self.dim > 1 else "")
            text = (f"{c}·{p}" if c != 1 else p) + (" − " if self.flip[i] else " + ")
            text += f"{dl}·{t}" if dl != 1 else t
            return text + (f" {'+' if d > 0 else '−'} {abs(d)}" if d else "")
        return ", ".join(axis(i) for i in range(self.dim))


def _plain_var(part: list[Node]) -> tuple[str, str] | None:
    """(side, var) if the indices `part` are the positions of one variable on its domain."""
    p = part[0]
    if len(part) == 1:
        return (p.side, p.var) if p.op == "pos" else None
    base = p.args[0] if p.op == "component" else None
    if base is None or base.op != "pos":
        return None
    if all(q.op == "component" and q.args[0] is base and q.attr("index") == i
           for i, q in enumerate(part)):
        return base.side, base.var
    return None


@dataclass(frozen=True)
class _LatticeRead:
    p: str
    t: str
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    flip: tuple[bool, ...]
    offset: tuple[int, ...]


def _lattice_read(part: list[Node], over: str) -> _LatticeRead | Miss:
    """The read of one index(D) lattice at c·p ± δ·t + d per axis (p of the output, t of the
    integral), or why not."""
    D = len(part)
    ps, ts, cs, ds, flips, offs = set(), set(), [], [], [], []
    for i, e in enumerate(part):
        lin = linear(e)
        if lin is None:
            return Miss(f"axis {i} of the read is not an integer affine point")
        terms = {k: v for k, v in lin.items() if k is not None and v != 0}
        xs = [(k, v) for k, v in terms.items() if k[1] == X_SIDE]
        ys = [(k, v) for k, v in terms.items() if k[1] == over]
        if len(xs) != 1 or len(ys) != 1 or len(terms) != 2:
            return Miss(f"axis {i} of the read is not c·p ± t + d with p of the output and t "
                        "of the integral")
        (kx, c), (ky, s) = xs[0], ys[0]
        comp = None if D == 1 else i
        if kx[3] != comp or ky[3] != comp or ky[0] != "coord":
            return Miss(f"axis {i} of the read mixes the axes of the points")
        d = lin.get(None, 0.0)
        if not (c >= 1 and c == int(c) and abs(s) >= 1 and s == int(s) and d == int(d)):
            return Miss(f"axis {i} of the read is {c:g}·p + {s:g}·t + {d:g}: the stride must be a "
                        "positive integer, the stencil's coefficient a nonzero integer")
        ps.add(kx[2])
        ts.add(ky[2])
        cs.append(int(c))
        ds.append(int(abs(s)))
        flips.append(s < 0)
        offs.append(int(d))
    if len(ps) != 1 or len(ts) != 1:
        return Miss("the axes of the read move with different points")
    return _LatticeRead(ps.pop(), ts.pop(), tuple(cs), tuple(ds), tuple(flips), tuple(offs))


def _width(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


def stencil_conv(plan: Plan, st: Step) -> StencilConv | Miss:
    """The stencil form of the sum step `st`, or why it is not one."""
    op, over = plan.op, st.over
    sx, sy = plan.spaces[X_SIDE], plan.spaces[over]
    facs = P.factors(st.expr)
    reads = [f for f in facs if f.op == "read"]
    if not reads:
        return Miss("the integrand reads no field at a computed point")
    if len(reads) > 1:
        return Miss(f"the integrand reads fields at computed points {len(reads)} times")
    read = reads[0]
    outside, kernel = P.ONE, P.ONE
    for f in facs:
        if f is read:
            continue
        if over in f.deps:
            kernel = P.mul(kernel, f)
        else:
            outside = P.mul(outside, f)
    K = inline(kernel, plan)
    for n in leaves(K):
        if n.op in ("field", "read", "cot"):
            return Miss(f"K reads the input `{n.name}`")
        if n.op == "ref" and n.side is not None:
            return Miss(f"K reads the result of the integral `{n.name}`")
    field = op.input(read.name)
    index = [inline(i, plan) for i in read.args]
    at, lat, chan, lat_dom = 0, None, None, None
    for name in field.domains:
        dom = op.domain(name)
        part = index[at:at + len(dom.axes)]
        at += len(dom.axes)
        plain = _plain_var(part)
        if plain is not None:
            if chan is not None:
                return Miss(f"the field `{field.name}` has more than one channel domain")
            chan = plain
            continue
        if dom.kind is not DomainKind.INDEX:
            return Miss(f"`{field.name}` is read at a computed point of `{name}`, not of an "
                        "index lattice")
        if lat is not None:
            return Miss(f"`{field.name}` is read at computed points of two lattices")
        lat, lat_dom = _lattice_read(part, over), name
        if isinstance(lat, Miss):
            return Miss(f"`{field.name}` on `{name}`: {lat.why}")
    if lat is None:
        return Miss(f"no axis of the read of `{field.name}` moves with the integral's points")
    p, t = lat.p, lat.t
    pdom = op.domain(sx.factor(p).domain)
    tdom = op.domain(sy.factor(t).domain)
    D = len(lat.stride)
    if pdom.kind is not DomainKind.INDEX or len(pdom.axes) != D:
        return Miss(f"`{p}` is not a point of an index({D}) lattice")
    if tdom.kind not in (DomainKind.STENCIL, DomainKind.INDEX) or len(tdom.axes) != D:
        return Miss(f"`{t}` is not a point of a stencil or lattice of {D} axes")
    if tdom.name == pdom.name:
        return Miss(f"the taps `{t}` range over the output's lattice `{pdom.name}`")
    others_x = [v for v in sx.vars if v != p]
    others_y = [v for v in sy.vars if v != t]
    if len(others_x) > 1 or len(others_y) > 1:
        return Miss("more than one channel variable on a side")
    u = others_x[0] if others_x else None
    v = others_y[0] if others_y else None
    given: set[str] = set()  # the call's arguments K reads (then sampled on every call)
    for var, side in ((u, sx), (v, sy)):
        if var is None:
            continue
        dom = op.domain(side.factor(var).domain)
        if dom.kind.entry.given:
            given.add(dom.name)
        if side.factor(var).domain == pdom.name:
            return Miss(f"the channel variable `{var}` ranges over the output's lattice "
                        f"`{pdom.name}`")
    for fac in sy.factors:
        rule = fac.quad.rule.entry
        if rule.sampled:
            return Miss(f"the `{fac.quad.rule.value}` rule of `{fac.var}` draws its points "
                        "per call")
        if rule.from_input:
            given.add(fac.quad.weights)
    for n in leaves(K):
        if n.op in ("coord", "pos") and n.side == X_SIDE and n.var == p:
            return Miss(f"K depends on the output point `{p}`: not a convolution")
    field_channel = None
    if chan is not None:
        side, var = chan
        if side == over and var == v:
            field_channel = "v"
        elif side == X_SIDE and var == u:
            field_channel = "u"
        else:
            return Miss(f"the channel domain of `{field.name}` is read at `{var}`, neither the "
                        "integral's channel variable nor the output's")
    return StencilConv(step=st.name, over=over, field=field.name, field_lattice=lat_dom,
                       kernel=K, outside=outside,
                       lattice=p, taps=t, stride=lat.stride, dilation=lat.dilation,
                       flip=lat.flip, offset=lat.offset, out_channel=u, in_channel=v,
                       field_channel=field_channel, channels=_width(read.shape),
                       kernel_channels=_width(K.shape), pair_values=pair_values(K, over),
                       given=tuple(sorted(given)))


# ---- the lag form -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LagConv:
    """I[p] = outside(p) · Σ_q [mask(p − q)] · K(p − q) · inside(q) on index(D) lattices."""

    sum: PairSum  # kernel and mask with refs inlined: functions of p − q
    dim: int

    @property
    def step(self) -> str:
        return self.sum.step


def lag_conv(plan: Plan, st: Step) -> LagConv | Miss:
    """The lag form of the sum step `st`, or why it is not one."""
    op, over = plan.op, st.over
    sx, sy = plan.spaces[X_SIDE], plan.spaces[over]
    if len(sx.factors) != 1 or len(sy.factors) != 1:
        return Miss("a side is a product of domains")
    pdom, qdom = op.domain(sx.domain), op.domain(sy.domain)
    for d in (pdom, qdom):
        if d.kind is not DomainKind.INDEX:
            return Miss(f"`{d.name}` is not an index lattice")
    if len(pdom.axes) != len(qdom.axes):
        return Miss(f"`{pdom.name}` and `{qdom.name}` have different numbers of axes")
    rule = sy.quad.rule.entry
    if not rule.on_domain_points or rule.sampled:
        return Miss(f"the `{sy.quad.rule.value}` rule does not integrate over the points of "
                    f"`{qdom.name}`")
    ps = next(s for s in pair_sums(plan) if s.step == st.name)
    kernel = inline(ps.kernel, plan)
    mask = None if ps.mask is None else inline(ps.mask, plan)
    if kernel is P.ONE and mask is None:
        return Miss("the integrand has no factor of both points")
    for what, e in (("K", kernel), ("the bracket", mask)):
        if e is None:
            continue
        why = lag_only(e, over)
        if why is not None:
            return Miss(f"{what} is not a function of {sx.var} − {sy.var}: {why}")
    return LagConv(PairSum(ps.step, over, ps.outside, kernel, ps.inside, mask), len(pdom.axes))


# ---- rules and the form -----------------------------------------------------------------------


def _sums(plan: Plan) -> list[Step] | Miss:
    if any(st.kind is StepKind.MAX for st in plan.forward.steps):
        return Miss("the Plan has a max step (a softmax shift)")
    sums = [st for st in plan.forward.steps if st.kind is StepKind.SUM]
    return sums or Miss("the output has no integral")


def _per_sum(plan: Plan, form) -> list | Miss:
    sums = _sums(plan)
    if isinstance(sums, Miss):
        return sums
    out = []
    for st in sums:
        f = form(plan, st)
        if isinstance(f, Miss):
            return f if len(sums) == 1 else Miss(f"{st.name}: {f.why}")
        out.append(f)
    return out


def _stencil_reason(f: StencilConv, plan: Plan) -> str:
    K = f.kernel
    on = ", ".join(v for v in (f.out_channel, f.in_channel, f.taps) if v is not None)
    what = {"full": "channels mix through the integral",
            "grouped": f"one group per {f.out_channel}",
            "depthwise": f"per channel of R^{f.channels}", "plain": "one input channel"}[f.mode]
    return (f"{f.step}: `{f.field}` read at ({f.read_text()}) on its lattice "
            f"`{f.field_lattice}`, "
            f"K({on}) = {short(show(K), 100)} reads no field and not {f.lattice}: conv{f.dim}d, "
            f"{f.mode} ({what})")


def match_stencil(A: OnPlan) -> Match | Miss:
    """K(u, v, t; params)·f(v, c·p ± t + d), p on an index(D) lattice  ->  conv1d/2d/3d"""
    forms = _per_sum(A.plan, stencil_conv)
    if isinstance(forms, Miss):
        return forms
    return Match("; ".join(_stencil_reason(f, A.plan) for f in forms), {
        "dim": forms[0].dim, "stride": tuple(f.stride for f in forms),
        "mode": tuple(f.mode for f in forms)})


def match_lag(A: OnPlan) -> Match | Miss:
    """K(p − q; params)·f(q), p and q on index(D) lattices  ->  direct conv or FFT"""
    forms = _per_sum(A.plan, lag_conv)
    if isinstance(forms, Miss):
        return forms
    plan = A.plan
    sx = plan.spaces[X_SIDE]
    parts = []
    for f in forms:
        sy = plan.spaces[f.sum.over]
        text = (f"{f.step}: K = {short(show(f.sum.kernel), 100)} is a function of "
                f"{sx.var} − {sy.var} on index({f.dim}) lattices")
        text += (", under a bracket of the difference (direct over its support, FFT when it "
                 "is wide)" if f.sum.mask is not None else " (global: FFT)")
        parts.append(text)
    return Match("; ".join(parts), {"dim": forms[0].dim,
                                    "bracket": tuple(f.sum.mask is not None for f in forms)})


RULES = (
    Rule("stencil", "lattice_conv",
         "K(u, v, t; params)·f(v, c·p ± t + d): p on an index(D) lattice, t on a stencil",
         match_stencil),
    Rule("lattice-lag", "lattice_conv",
         "K(p − q; params)·f(q), p and q on index(D) lattices", match_lag),
)


def find(plan: Plan) -> tuple | Miss:
    """One form per forward sum step: a stencil convolution, else a lag convolution."""
    sums = _sums(plan)
    if isinstance(sums, Miss):
        return sums
    out = []
    for st in sums:
        f = stencil_conv(plan, st)
        if isinstance(f, Miss):
            g = lag_conv(plan, st)
            if isinstance(g, Miss):
                return Miss(f"{st.name}: not a stencil convolution ({f.why}), nor a lag "
                            f"convolution ({g.why})")
            f = g
        out.append(f)
    return tuple(out)


# ---- per call and explain ---------------------------------------------------------------------


def choose(form, call: Call) -> str | None:
    """The library calls: measured against the tiled kernels of the same Plans (float32, 2
    CPU cores, inference and training), they were as fast or faster at every size tried,
    2×2 to 64×64 lattices: a stencil 1.2–40× faster (depthwise 3×3 on R^8, the INN layer
    8 → 8), a kernel of p − q within noise at 16×16–24×24 and 9× faster at 64×64. Half
    precision runs its FFT in float32 (torch.fft has no CPU half transform). Not where a
    stencil's kernel reads arguments of the call with batch entries (nodes or weights per
    entry: a kernel per entry, which one library call cannot take)."""
    for f in form:
        batched = [g for g in getattr(f, "given", ()) if g in call.batched]
        if batched:
            return (f"the convolution's weights read `{batched[0]}`, which has batch "
                    "entries (a kernel per entry)")
    return None


def choice(form, budget: int) -> str:
    if any(isinstance(f, StencilConv) for f in form):
        return ("always the library convolution (measured faster than the tiled kernels from "
                "2×2 lattices up; the weights sampled in chunks within the memory budget)")
    return ("always the library calls (measured as fast as the tiled kernels from 4×4 "
            "lattices up, 9× faster at 64×64)")


def _taps_text(f: StencilConv, plan: Plan) -> str:
    d = plan.op.domain(plan.spaces[f.over].factor(f.taps).domain)
    sizes = d.fixed
    return "×".join(map(str, sizes)) + " taps" if sizes else f"taps on {d.name}"


def runs_as(plan: Plan, form) -> list[str]:
    out = [LIBRARY]
    for f in form:
        if isinstance(f, StencilConv):
            sy = plan.spaces[f.over]
            conv = f"F.conv{f.dim}d"
            if f.mode == "depthwise":
                conv += f"(groups={f.channels})"
            elif f.mode == "grouped":
                conv += f"(groups=n_{plan.spaces[X_SIDE].factor(f.out_channel).domain})"
            weights = "K(" + ", ".join(v for v in (f.out_channel, f.in_channel, f.taps) if v) + ")"
            rules = [fac for fac in sy.factors if not fac.quad.rule.entry.unit]
            if rules:
                weights = "·".join(f"w_{fac.var}" for fac in rules) + "·" + weights
            out.append(f"      {f.step}: {conv} with weights {weights} sampled once per param "
                       f"version and size ({_taps_text(f, plan)}, on a call whose output "
                       f"lattice is one point), stride {_axes(f.stride)}, dilation "
                       f"{_axes(f.dilation)}"
                       + (", the kernel flipped on the axes read at p − t" if any(f.flip) else "")
                       + "; the read's zeros outside the lattice as padding, cropped or padded "
                       "to the output lattice")
            out.append("        the weights are kept while the params, sizes, dtype and device "
                       "stay (no autograd recording); sampled each call while autograd records, "
                       "so gradients reach the params")
            if f.outside is not P.ONE:
                out.append(f"        then times {short(show(f.outside), 80)} per output point")
        else:
            s = f.sum
            how = ("direct depthwise conv over the bracket's support (found per call from the "
                   "bracket at every offset) while it spans few taps, else FFT"
                   if s.mask is not None else "FFT (torch.fft.rfftn, zero padded to n_p + n_q "
                   "− 1 per axis: no wrap-around)")
            out.append(f"      {f.step}: taps K(p − q) sampled at every offset p − q (kept per "
                       f"param version and sizes without autograd), then {how}; the values "
                       "of q only (the field, quadrature weights) convolved")
    return out


def _axes(v: tuple[int, ...]) -> str:
    return str(v[0]) if len(set(v)) == 1 else "(" + ", ".join(map(str, v)) + ")"


STRATEGY = Strategy(
    name="lattice_conv", rules=RULES,
    algorithm="a D-dimensional library convolution (F.conv1d/2d/3d) with weights sampled from "
              "the kernel once per param version and size, or an FFT for a global kernel of "
              "p − q",
    complexity="O(n·k·C_in·C_out) direct (k taps), O(n log n·C) by FFT",
    find=find, runs_as=runs_as, choose=choose, choice=choice)
