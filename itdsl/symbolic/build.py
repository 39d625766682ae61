"""Checked IR -> Plan: the forward program, its hoisting, and the backward program.

The pipeline of one operator (`build_plan`) is linear:
    lower the output (integrals become pair-sum steps, a softmax ratio gets its max shift)
 -> derive the backward program (`autodiff.vjp` of the output and of every integral)
 -> hoist per-point work out of every pair step (both programs)
 -> count operations per pair before and after.
"""

from __future__ import annotations

import math
from collections import defaultdict

from ..frontend import ir
from ..functions import MLP_ONLY
from . import pexpr as P
from .autodiff import vjp
from .pexpr import Node
from .plan import (
    X_SIDE,
    Factor,
    GradKey,
    GradKind,
    Hoisted,
    Plan,
    Program,
    Space,
    Step,
    StepKind,
    param_shapes,
)

SQNORM_EXPAND_GAIN = 0.8  # expand |u - v|^2 only if it leaves <= 80% of the pair work


def _shape(width: int | None) -> tuple[int, ...]:
    return () if width is None else (width,)


class _Lower:
    """Converts IR expressions into plan expressions for given point-variable sides."""

    def __init__(self, op: ir.Operator, sides: dict[str, str], rewrite: bool,
                 forward: _Forward | None = None, spaces: dict[str, Space] | None = None):
        self.op = op
        self.sides = sides  # point variable -> side
        self.rewrite = rewrite
        self.forward = forward  # in an output: where integrals become steps
        self.spaces = spaces if spaces is not None else forward.spaces

    def __call__(self, e: ir.Expr) -> Node:
        return getattr(self, "e_" + type(e).__name__)(e)

    def e_Integral(self, e):
        return self.forward.add_integral(*self.forward.summand(e))

    def e_Const(self, e):
        return P.const(e.value)

    def e_Coord(self, e):
        return P.coord(self.sides[e.var], e.var, _shape(self.op.domain(e.domain).coord_width))

    def e_FieldAt(self, e):
        """The field at the side's own point when it lives on exactly the side's domains and
        is read at the side's variables; else a read at the integer point of its axes."""
        field = self.op.input(e.field)
        sides = {self.sides[v] for v in e.vars}
        if e.plain and len(sides) == 1:
            sp = self.spaces[sides.pop()]
            if sp.vars == tuple(a.var for a in e.at) and sp.domains == field.domains:
                return P.field(e.field, sp.side, _shape(e.width))
        index = []
        for a, name in zip(e.at, field.domains):
            index += self.axes_of(a, self.op.domain(name))
        return P.read(e.field, index, _shape(e.width))

    def axes_of(self, a: ir.Affine, dom: ir.Domain) -> list[Node]:
        """The integer indices, one per axis of `dom`, of the point `a` (a variable of `dom`:
        its positions; an affine point of a lattice: Σ c·coord + offset per axis)."""
        k = len(dom.axes)
        if a.var is not None and self.op.domain(self._domain_of(a.var)) == dom:
            p = P.pos(self.sides[a.var], a.var, k)
            return [p] if k == 1 else [P.component(p, i) for i in range(k)]
        out = []
        for i in range(k):
            total = P.const(a.offset)
            for c, v in a.terms:
                x = P.coord(self.sides[v], v, _shape(self.op.domain(self._domain_of(v))
                                                     .coord_width))
                xi = x if k == 1 else P.component(x, i)
                total = P.add(total, xi if c == 1 else P.mul(P.const(c), xi))
            out.append(total)
        return out

    def _domain_of(self, var: str) -> str:
        return self.spaces[self.sides[var]].factor(var).domain

    def e_ParamRef(self, e):
        return P.param(e.param, _shape(e.width))

    def e_Op(self, e):
        if (self.forward is not None and e.fn is ir.Fn.DIV
                and all(isinstance(a, ir.Integral) for a in e.args)):
            return self.forward.ratio(*e.args)
        args = [self(a) for a in e.args]
        name = e.fn.value
        if name == "neg":
            return P.neg(args[0])
        return {"+": P.add, "-": P.sub, "*": P.mul, "/": P.div}.get(
            name, lambda *a: P.ew(name, *a))(*args)

    def e_Reduce(self, e):
        if e.fn is ir.RFn.SUM:
            return P.vsum(self(e.args[0]))
        if e.fn is ir.RFn.DOT:
            return P.dot(self(e.args[0]), self(e.args[1]))
        sq = self.sqnorm(e.args[0])
        return sq if e.fn is ir.RFn.SQNORM else P.ew("sqrt", sq)

    def sqnorm(self, a: ir.Expr) -> Node:
        """|a|^2; for a = u - v with u, v on different sides, maybe |u|^2 - 2 u.v + |v|^2,
        which hoists |u|^2 and |v|^2 out of the pair loop (kept only if it saves enough)."""
        plain = self(a)
        if not (self.rewrite and isinstance(a, ir.Op) and a.fn is ir.Fn.SUB and a.width):
            return P.dot(plain, plain)
        u, v = (self(x) for x in a.args)
        if not (len(u.deps) == 1 and len(v.deps) == 1 and u.deps != v.deps
                and u.shape == v.shape):  # (a scalar minus a vector broadcasts: kept as is)
            return P.dot(plain, plain)
        before = P.cost([P.dot(plain, plain)])
        after = 2 * a.width + 1  # u.v plus two additions per pair
        if after > SQNORM_EXPAND_GAIN * before:
            return P.dot(plain, plain)
        return P.add(P.sub(P.dot(u, u), P.mul(P.const(2.0), P.dot(u, v))), P.dot(v, v))

    def e_Component(self, e):
        return P.component(self(e.arg), e.index)

    def e_SplineCall(self, e):
        """A spline as basis weights against its coefficients: basis(u).C in 1-D and
        basis(u).(C basis(v)) in 2-D: dot products and a matrix-vector product, which
        hoist, differentiate and lower like everything else."""
        p = self.op.param(e.param)
        args = [self(a) for a in e.args]
        bu = P.basis(args[0], p.sizes[0])
        if e.at is not None:
            return self.spline_per(p, bu, args, e.at)
        C = P.param(p.name, tuple(p.sizes))
        if len(args) == 1:
            return P.dot(bu, C)
        return P.dot(bu, P.linear(C, P.basis(args[1], p.sizes[1])))

    def spline_per(self, p: ir.Param, bu: Node, args: list[Node], at: str | None = None) -> Node:
        """W(u, v, t) of `spline(n1, n2, per = T)`: the spline W[k] of t's position k on T,
        as Σ_k [k(t) == k] · basis(u).(W[k] basis(v)) with the K splines' rows stacked into
        one [K·n1, n2] matrix (so W[k] basis(v), per point of v and t, hoists)."""
        K, n1 = math.prod(p.per_shape), p.sizes[0]
        t = at
        pos = P.pos(self.sides[t], t, len(p.per_shape))
        flat, stride = P.ZERO, 1
        for i in reversed(range(len(p.per_shape))):
            pi = pos if len(p.per_shape) == 1 else P.component(pos, i)
            flat = P.add(flat, pi if stride == 1 else P.mul(P.const(stride), pi))
            stride *= p.per_shape[i]
        if len(args) == 1:
            rows = P.param(p.name, (K * n1,))
        else:
            rows = P.linear(P.param(p.name, (K * n1, p.sizes[1])), P.basis(args[1], p.sizes[1]))
        picked = None
        for k in range(K):
            part = P.mul(P.ew("==", flat, P.const(k)), P.vslice(rows, k * n1, (k + 1) * n1))
            picked = part if picked is None else P.add(picked, part)
        return P.dot(bu, picked)

    def e_MlpCall(self, e):
        p = self.op.param(e.param)
        args = [self(a) for a in e.args]
        shapes = param_shapes(p)
        W0, b0 = (P.param(f"{p.name}.0.{k}", shapes[f"{p.name}.0.{k}"]) for k in ("weight",
                                                                                    "bias"))
        cols, col = [], 0
        for a in args:
            cols.append(col)
            col += a.shape[0] if a.shape else 1
        if self.rewrite and any(len(a.deps) < 2 for a in args):
            # W [a1, a2, ...] = sum_k W[:, cols_k] a_k, grouped by what each part depends on so
            # the parts of x only / y only (and the bias) hoist out of the pair loop.
            groups: dict[frozenset, Node] = {}
            for a, c in zip(args, cols):
                term = P.linear(W0, a if a.shape else P.concat([a]), c)
                groups[a.deps] = P.add(groups[a.deps], term) if a.deps in groups else term
            order = sorted(groups, key=lambda d: (len(d), sorted(d)))
            h = None
            for d in order:
                part = groups[d]
                if h is None:
                    part = P.add(part, b0)  # the bias joins the first (least dependent) part
                h = part if h is None else P.add(h, part)
        else:
            h = P.add(P.linear(W0, P.concat(args)), b0)
        for layer in range(1, len(p.sizes) - 1):
            h = _activation(p.act, h)
            W = P.param(f"{p.name}.{2 * layer}.weight", shapes[f"{p.name}.{2 * layer}.weight"])
            b = P.param(f"{p.name}.{2 * layer}.bias", shapes[f"{p.name}.{2 * layer}.bias"])
            h = P.add(P.linear(W, h), b)
        return P.component(h, 0) if p.sizes[-1] == 1 else h


def _activation(act: str, h: Node) -> Node:
    if act in MLP_ONLY:  # silu, identity
        return MLP_ONLY[act][1](P, h)
    return P.ew(act, h)


_CMP = P.BRACKETS


class _Forward:
    """Builds the forward program of an operator."""

    def __init__(self, op: ir.Operator, rewrite: bool):
        self.op = op
        self.rewrite = rewrite
        out = op.output
        self.spaces: dict[str, Space] = {
            X_SIDE: Space(X_SIDE, tuple(Factor(b.var, b.domain, None) for b in out.vars))}
        self.program = Program()
        self.integrals: list[tuple[str, str, Node]] = []  # (step name, side, summand)
        self.shifts: list[tuple[Node, Node]] = []  # (exp node, shifted replacement)

    def space(self, integral: ir.Integral) -> str:
        factors = tuple(Factor(b.var, b.domain, q) for b, q in zip(integral.vars,
                                                                  integral.quads))
        for side, sp in self.spaces.items():
            if side != X_SIDE and sp.factors == factors:
                return side
        side = f"y{len(self.spaces) - 1}"
        self.spaces[side] = Space(side, factors)
        imp = factors[0].quad.importance if len(factors) == 1 else None
        if imp is not None:
            imp = _Lower(self.op, {integral.var: side}, self.rewrite, spaces=self.spaces)(imp)
            self.spaces[side] = Space(side, factors, imp)
        return side

    def summand(self, integral: ir.Integral) -> tuple[str, Node]:
        """The integrand times the quadrature weights of y (each variable's; none for `sum`)."""
        side = self.space(integral)
        sides = {**{v: X_SIDE for v in self.op.output.names},
                 **{v: side for v in integral.names}}
        lower = _Lower(self.op, sides, self.rewrite, spaces=self.spaces)
        w = P.ONE
        for b, q in zip(integral.vars, integral.quads):
            if not q.rule.entry.unit:
                w = P.mul(w, P.weight(side, b.var))
            if q.rule.entry.drops:  # a point of weight 0 is not in the sum: a bracket
                w = P.mul(w, P.ew("!=", P.weight(side, b.var), P.ZERO))
        return side, P.mul(w, lower(integral.body))

    def add_integral(self, side: str, summand: Node) -> Node:
        name = f"I{len(self.integrals)}"
        self.integrals.append((name, side, summand))
        return P.ref(name, X_SIDE, summand.shape)

    def ratio(self, num: ir.Integral, den: ir.Integral) -> Node:
        """integral A / integral B; with a shared factor exp(s), both are computed as
        sum exp(s - m) (...), m = max over the live points of s: the softmax shift."""
        (sn, a), (sd, b) = self.summand(num), self.summand(den)
        if sn != sd:
            return P.div(self.add_integral(sn, a), self.add_integral(sd, b))
        fb = P.factors(b)
        shared = [f for f in P.factors(a) if f.op == "exp" and f in fb]
        if shared:
            f = shared[0]
            s = f.args[0]
            # the max runs over the live points: those a bracket keeps and whose weight is
            # not 0 (a sampled or given weight), so that no dead point's larger score can
            # push the live terms to underflow
            # (a dead point's exponential is masked in the sums too: exp(s − m) may overflow
            # there, and its weight 0 times inf is NaN)
            quads = dict(zip(num.names, num.quads))
            live = P.ONE
            for g in fb:  # (a rule that drops them masks the summand already)
                entry = quads[g.attr("var")].rule.entry if g.op == "weight" else None
                if entry is not None and entry.zeros and not entry.drops:
                    live = P.mul(live, P.ew("!=", g, P.ZERO))
            mask = live
            for g in fb:
                if g.op in _CMP:
                    mask = P.mul(mask, g)
            name = f"m{len([st for st in self.program.steps if st.kind == 'max'])}"
            m = self.program.add(Step(StepKind.MAX, name, X_SIDE, s, over=sn, mask=mask))
            shifted = P.mul(live, P.ew("exp", P.sub(s, m)))
            a, b = P.substitute([a, b], {f: shifted})
        return P.div(self.add_integral(sn, a), self.add_integral(sd, b))

    def build(self) -> Node:
        """Lower the output (its integrals become pair-sum steps); return its expression."""
        out = _Lower(self.op, {v: X_SIDE for v in self.op.output.names}, self.rewrite,
                     self)(self.op.output.body)
        by_side = defaultdict(list)
        for name, side, summand in self.integrals:
            by_side[side].append((name, summand))
        for side, items in by_side.items():
            for name, summand in items:
                self.program.add(Step(StepKind.SUM, name, X_SIDE, summand, over=side))
        return out


# ---- backward ---------------------------------------------------------------------------------


def _grad_key(leaf: Node, spaces: dict[str, Space], op: ir.Operator) -> GradKey | None:
    """Which gradient a leaf's cotangent contributes to (None: not an input of the call)."""
    if leaf.op in ("field", "read"):
        return GradKey(GradKind.INPUT, leaf.name)
    if leaf.op == "param":
        return GradKey(GradKind.PARAM, leaf.name)
    if leaf.op == "coord":
        f = spaces[leaf.side].factor(leaf.var)
        dom, q = op.domain(f.domain), f.quad
        if dom.kind.entry.given and not (q and q.rule.entry.own_nodes):  # the call's coordinates
            return GradKey(GradKind.COORDS, dom.name)
        return None
    if leaf.op == "weight":
        q = spaces[leaf.side].factor(leaf.var).quad
        if q is not None and q.rule.entry.from_input:
            return GradKey(GradKind.INPUT, q.weights)
    return None


def _scatter_index(leaf: Node, spaces: dict[str, Space]) -> tuple[Node, ...] | None:
    """Where the cotangent of a leaf goes in its gradient's tensor when that tensor is not
    laid out like the leaf's side: a read's point; the position of a coordinate's or a
    weight's point on a side of several variables. None: the side's own layout."""
    if leaf.op == "read":
        return leaf.args
    if leaf.op in ("coord", "weight") and len(spaces[leaf.side].factors) > 1:
        return (P.pos(leaf.side, leaf.var, 1),)  # a points domain or an axis: one axis
    return None


class _Backward:
    """The backward program of a forward program, in reverse-mode over its steps.

    A cotangent flows from the output into each step: through a point step by a
    per-point `vjp`; through the pair-sum steps of one space by the `vjp` of
    Phi = sum_k Ibar_k(x) . summand_k(x, y), whose leaf cotangents are summed over y
    (leaves of x), over x (leaves of y) or over both (params). Max steps (the softmax
    shift) pass nothing back: the ratio they stabilise does not depend on them.
    """

    def __init__(self, op: ir.Operator, spaces: dict[str, Space], fwd: Program,
                 out_shape: tuple[int, ...]):
        self.op, self.spaces, self.fwd = op, spaces, fwd
        self.prog = Program()
        self.ref_cots: dict[str, list[Node]] = defaultdict(list)
        self.grads: dict[str, dict[str | None, list[Node]]] = defaultdict(lambda: defaultdict(list))
        self.ref_cots["out"].append(P.cot("dout", X_SIDE, out_shape))
        self.forward_steps = {st.name: st for st in fwd.steps}
        self.scattered: dict[GradKey, list[str]] = defaultdict(list)  # scatter steps
        self.n = 0

    def fresh(self, stem: str) -> str:
        self.n += 1
        return f"{stem}_{self.n}"

    def wanted(self, leaf: Node) -> bool:
        """Whether a leaf's cotangent is needed: a forward step's result that passes it on,
        or an input of the call. (Refs to backward steps are cotangents: constants here.)"""
        if leaf.op == "ref":
            st = self.forward_steps.get(leaf.name)
            return st is not None and st.kind is not StepKind.MAX
        return _grad_key(leaf, self.spaces, self.op) is not None

    def leaf(self, leaf: Node, c: Node, level: str | None) -> None:
        """Record cotangent `c` (an expression at `level`: a side, or None for per call)."""
        if leaf.op == "ref":
            self.ref_cots[leaf.name].append(c)
            return
        key = _grad_key(leaf, self.spaces, self.op)
        index = _scatter_index(leaf, self.spaces)
        if index is None:
            self.grads[key][level].append(c)
            return
        name = self.fresh(f"d{key.name}")
        self.prog.add(Step(StepKind.SCATTER, name, None, c, index=index, target=key))
        self.scattered[key].append(name)

    def point(self, st: Step) -> None:
        c = _sum(self.ref_cots.pop(st.name, []))
        if c is None:
            return
        for leaf, lc in vjp([(st.expr, c)]).items():
            if not _is_leaf(leaf) or P.is_zero(lc) or not self.wanted(leaf):
                continue
            if st.side is not None and not leaf.deps:  # per point -> per call: a total
                lc = self.prog.add(Step(StepKind.TOTAL, self.fresh(f"d{_label(leaf)}"), None, lc,
                                        over=st.side))
                self.leaf(leaf, lc, None)
            else:
                self.leaf(leaf, lc, st.side)

    def pair_sums(self, steps: list[Step]) -> None:
        phi = None
        for st in steps:
            c = _sum(self.ref_cots.pop(st.name, []))
            if c is None:
                continue
            # the incoming cotangent is a constant of this step's vjp: computed once per x
            c = self.prog.add(Step(StepKind.POINT, self.fresh(f"d{st.name}"), X_SIDE, c))
            t = P.dot(c, st.expr) if st.expr.shape else P.mul(c, st.expr)
            phi = t if phi is None else P.add(phi, t)
        if phi is None:
            return
        space = steps[0].over
        for leaf, lc in vjp([(phi, P.ONE)]).items():
            if not _is_leaf(leaf) or P.is_zero(lc) or not self.wanted(leaf):
                continue
            label = _label(leaf)
            if leaf.op == "read" and len(leaf.deps) == 2:  # into the field, pair by pair
                self.leaf(leaf, lc, None)
            elif leaf.deps == {X_SIDE}:
                self.leaf(leaf, self.prog.add(Step(StepKind.SUM, self.fresh(f"d{label}"), X_SIDE,
                                                   lc, over=space)), X_SIDE)
            elif leaf.deps == {space}:
                self.leaf(leaf, self.prog.add(Step(StepKind.SUM, self.fresh(f"d{label}"), space, lc,
                                                   over=X_SIDE)), space)
            else:  # a param, or a per-call value: summed over every pair
                per_x = self.prog.add(Step(StepKind.SUM, self.fresh(f"d{label}"), X_SIDE, lc,
                                           over=space))
                self.leaf(leaf, self.prog.add(Step(StepKind.TOTAL, self.fresh(f"d{label}"), None,
                                                   per_x, over=X_SIDE)), None)

    def run(self) -> Program:
        steps = self.fwd.steps
        done: set[str] = set()
        for st in reversed(steps):
            if st.name in done:
                continue
            if st.kind in (StepKind.POINT, StepKind.CONST):
                self.point(st)
            elif st.kind is StepKind.SUM:
                group = [s for s in steps if s.kind is StepKind.SUM and s.over == st.over
                         and s.side == st.side]
                done.update(s.name for s in group)
                self.pair_sums(group)
        for key, levels in self.grads.items():
            names = []
            for level, parts in levels.items():
                name = f"grad_{key.name}" + ("" if level is None else f"_{level}")
                kind = StepKind.CONST if level is None else StepKind.POINT
                self.prog.add(Step(kind, name, level, _sum(parts)))
                names.append(name)
            self.prog.outputs[key] = names
        for key, names in self.scattered.items():
            self.prog.outputs.setdefault(key, []).extend(names)
        # cotangents that reach no gradient (of an index's or a grid's coordinates, say)
        live = self.prog.needed(self.prog.outputs)
        self.prog.steps = [st for st in self.prog.steps if st.name in live]
        return self.prog


def _is_leaf(n: Node) -> bool:
    """A leaf of differentiation: an input (or a read of one: its integer indices carry no
    gradient), a param, a coordinate, a weight, an earlier step."""
    return (n.op in P.LEAVES and n.op not in ("cot", "const", "pos")) or n.op == "read"


def _label(leaf: Node) -> str:
    return leaf.name if leaf.op in ("field", "param", "ref", "read") else leaf.op


def _sum(parts: list[Node]) -> Node | None:
    out = None
    for p in parts:
        out = p if out is None else P.add(out, p)
    return out


# ---- hoisting -----------------------------------------------------------------------------------


def _hoist(prog: Program, hoisted: list[Hoisted], counter: list[int]) -> Program:
    """Move every maximal subexpression of one side only (or of params only) out of the
    pair steps into point (or const) steps computed once per point (or per call)."""
    from .show import show
    out = Program(outputs=prog.outputs)
    made: dict[Node, Node] = {}
    for st in prog.steps:
        if st.kind not in (StepKind.SUM, StepKind.MAX):
            out.steps.append(st)
            continue
        roots = [st.expr] + ([st.mask] if st.mask is not None else [])
        mapping: dict[Node, Node] = {}
        parents_pair = _maximal_one_sided(roots)
        for n in parents_pair:
            if n in made:
                mapping[n] = made[n]
                continue
            side = next(iter(n.deps)) if n.deps else None
            name = f"h{counter[0]}"
            counter[0] += 1
            kind = StepKind.POINT if side else StepKind.CONST
            r = P.ref(name, side, n.shape)
            out.steps.append(Step(kind, name, side, n))
            hoisted.append(Hoisted(side or "const", name, show(n), P.cost([n])))
            made[n] = mapping[n] = r
        new = P.substitute(roots, mapping)
        out.steps.append(Step(st.kind, st.name, st.side, new[0], over=st.over,
                              mask=new[1] if st.mask is not None else None))
    return out


def _maximal_one_sided(roots: list[Node]) -> list[Node]:
    """Subexpressions of at most one side whose parent depends on two, worth computing apart."""
    found: list[Node] = []
    seen: set[int] = set()
    for n in P.toposort(roots):
        if len(n.deps) < 2:
            continue
        for a in n.args:
            if len(a.deps) < 2 and id(a) not in seen and P.cost([a]) > 0:
                seen.add(id(a))
                found.append(a)
    return found


def _pair_ops(prog: Program, naive: bool = False) -> dict[str, int]:
    """Operations per pair of each pair step; `naive`: as if nothing were hoisted, so the
    work of one side is redone for every pair."""
    out = {}
    for st in prog.steps:
        if st.kind in (StepKind.SUM, StepKind.MAX):
            roots = [st.expr] + ([st.mask] if st.mask is not None else [])
            out[st.name] = P.cost(roots) if naive else P.cost(roots, lambda n: len(n.deps) > 1)
    return out


def build_plan(op: ir.Operator, strategy: str | None = None, verdict=None) -> Plan:
    """The Plan of a checked operator (forward, backward, hoisting, counts)."""
    fwd = _Forward(op, rewrite=True)
    out = fwd.build()
    fwd.program.add(Step(StepKind.POINT, "out", X_SIDE, out))
    hoisted: list[Hoisted] = []
    counter = [0]
    forward = _hoist(fwd.program, hoisted, counter)
    backward = _hoist(_Backward(op, fwd.spaces, forward, out.shape).run(), hoisted, counter)
    # the same operator without rewrites or hoisting: what a naive pair loop would do
    naive = _Forward(op, rewrite=False)
    naive.program.add(Step(StepKind.POINT, "out", X_SIDE, naive.build()))
    naive_bwd = _Backward(op, naive.spaces, naive.program, out.shape).run()
    before = {**_pair_ops(naive.program, naive=True), **_pair_ops(naive_bwd, naive=True)}
    after = {**_pair_ops(forward), **_pair_ops(backward)}
    return Plan(op=op, strategy=strategy or "dense", verdict=verdict, spaces=fwd.spaces,
                forward=forward, backward=backward, out_shape=out.shape, hoisted=hoisted,
                pair_ops_before=before, pair_ops_after=after)
