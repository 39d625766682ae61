"""A small evaluator of Plans in PyTorch: the Plans are tested with it before (and
besides) any compiled code.

Every value is laid out `[*batch, X, Y, *shape]` (a scalar has shape `(1,)`): X runs
over a chunk of the output's points, Y over an integral's points; a value that does
not depend on one has size 1 there. Pair steps are evaluated one chunk of x at a time
and reduced at once, so no N x M tensor of the whole problem is ever formed: the
structure the compiled code will have, checked in float64.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..frontend import ir
from ..symbolic.pexpr import ELEMENTWISE, Node, is_zero, toposort
from ..symbolic.plan import X_SIDE, GradKind, Plan, Program, Step, StepKind
from .binding import Bound, broadcast
from .params import keys_basis
from .reference import elementwise
from .sampling import draw, side_points


def tshape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The trailing dims a value of `shape` has in the evaluator's layout (a scalar: `(1,)`)."""
    return shape if shape else (1,)


_ts = tshape


class _Side:
    """The points of one side: coordinates `[*B?, n, D]`, weights `[*B?, n]`, count; for each
    variable of a side of several (a product of domains, flattened row-major), its
    coordinates, weights and positions on its domain's axes at every point of the side."""

    def __init__(self, n: int, coords: torch.Tensor | None, weights: torch.Tensor | None,
                 factors: dict[str, _Factor] | None = None):
        self.n, self.coords, self.weights = n, coords, weights
        self.factors = factors or {}

    def coords_of(self, var: str) -> torch.Tensor | None:
        f = self.factors.get(var)
        return self.coords if f is None else f.coords

    def weights_of(self, var: str) -> torch.Tensor | None:
        if len(self.factors) <= 1:  # one variable: the side's (drawn or given) weights
            return self.weights
        return self.factors[var].weights

    def pos_of(self, var: str) -> torch.Tensor:
        return self.factors[var].pos


class _Factor:
    """One variable's values at every point of its side: coordinates `[*B?, n, D]`, weights
    `[*B?, n]` (None: none), positions `[n, A]` on the A axes of its domain."""

    def __init__(self, coords, weights, pos):
        self.coords, self.weights, self.pos = coords, weights, pos


@functools.lru_cache(maxsize=256)
def _positions(n: int, axes: tuple[int, ...], stride: int, count: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    i = torch.arange(n, device=device) // stride % max(count, 1)
    cols, inner = [], count
    for a in axes:
        inner //= max(a, 1)
        cols.append(i // max(inner, 1) % max(a, 1))
    return torch.stack(cols, -1).to(dtype)


class PlanEvaluator:
    def __init__(self, plan: Plan, params, bound: Bound,
                 generator: torch.Generator | None = None, chunk: int = 64,
                 weights: dict[str, torch.Tensor] | None = None):
        """`params`: the operator's module, or a dict of its parameters by name; `weights`:
        quadrature weights drawn beforehand (montecarlo), by side."""
        if isinstance(params, torch.nn.Module):
            params = dict(params.named_parameters())
        self.plan, self.params, self.bound = plan, params, bound
        self.given_weights = weights or {}
        self.dtype, self.device = bound.dtype, bound.device
        self.chunk = chunk
        self.env: dict[str, torch.Tensor] = {}
        self.expand_batch = True
        self.cols: slice | None = None  # evaluate pairs on these points of y only (a tile)
        self.special: set[str] = set()  # steps stored as [n, *shape], batch summed
        self.sides: dict[str, _Side] = {}
        self.fields = bound.fields  # the inputs' values by name
        draws: dict[tuple, torch.Tensor] = {}
        for side, sp in plan.spaces.items():
            self.sides[side] = self._side(sp, draws, generator)

    # ---- the points of each side ---------------------------------------------------------
    def _t(self, x) -> torch.Tensor:
        return torch.as_tensor(x, dtype=self.dtype, device=self.device)

    def _side(self, sp, draws, generator) -> _Side:
        """The points and weights of one side (runtime/sampling.py); montecarlo weights
        given beforehand, or drawn once per domain and rule."""
        if len(sp.factors) > 1:
            return self._product_side(sp)
        d = self.plan.op.domain(sp.domain)
        q = sp.quad
        pts = side_points(d, q, self.bound)
        side = _Side(pts.n, pts.coords, pts.weights)
        side.factors[sp.var] = _Factor(pts.coords, pts.weights,
                                       self._positions(pts.n, self._axes(d, q), 1, pts.n))
        if q is None or not q.rule.entry.sampled:
            return side
        if sp.side in self.given_weights:
            side.weights = self.given_weights[sp.side]
            return side
        key = (d.name, q.samples, sp.importance)
        if key not in draws:
            draws[key] = self._draw(sp, side, d, generator)
        side.weights = draws[key]
        return side

    def _axes(self, d: ir.Domain, q: ir.Quad | None) -> tuple[int, ...]:
        """The sizes of the axes of `d` an integral with `q` runs over."""
        if q is not None and q.rule.entry.own_nodes:
            return (q.n,) * d.naxes
        return self.bound.axes[d.name]

    def _positions(self, n: int, axes: tuple[int, ...], stride: int, count: int) -> torch.Tensor:
        """`[n, A]`: on a side of n points where one variable of `count` points (its domain's
        `axes`) advances every `stride` points, that variable's position on each axis (made
        once per sizes, dtype and device: read only; traced by torch.compile)."""
        make = _positions.__wrapped__ if torch.compiler.is_compiling() else _positions
        return make(n, tuple(axes), stride, count, self.dtype, self.device)

    def _product_side(self, sp) -> _Side:
        """A side of several variables: the product of their domains' points, flattened
        row-major, each variable's coordinates, weights and positions spread over it."""
        parts = []
        for f in sp.factors:
            d = self.plan.op.domain(f.domain)
            parts.append((f, d, side_points(d, f.quad, self.bound)))
        n = math.prod([pts.n for _, _, pts in parts])
        side = _Side(n, None, None)
        stride = n
        weights = None
        for f, d, pts in parts:
            stride //= max(pts.n, 1)
            idx = torch.arange(n, device=self.device) // max(stride, 1) % max(pts.n, 1)
            coords = None if pts.coords is None else pts.coords[..., idx, :]
            w = None if pts.weights is None else pts.weights[..., idx]
            side.factors[f.var] = _Factor(coords, w, self._positions(n, self._axes(d, f.quad),
                                                                     stride, pts.n))
            if w is not None:
                weights = w if weights is None else weights * w
        side.weights = weights
        return side

    def _draw(self, sp, side: _Side, d: ir.Domain, generator) -> torch.Tensor:
        """Montecarlo weights `[*B?, m]` (runtime/sampling.py `draw`)."""
        m = side.n

        def importance() -> torch.Tensor:
            self.sides[sp.side] = side
            imp = self.eval_level(sp.importance, sp.side)  # [*B?, 1, m, 1]
            lead = imp.shape[:-3]
            return imp.expand(*lead, 1, m, 1).reshape(*lead, m)

        return draw(sp.quad, d, m, importance, generator, self.bound)

    # ---- views: the same call, evaluated elsewhere (the strategies' runners) ---------------
    def at(self, coords: dict[str, torch.Tensor]) -> PlanEvaluator:
        """A view of this evaluator with the sides `coords` names placed at those
        coordinates (`[k, D]`); for expressions of coordinates and params only (a
        convolution's taps). This evaluator is unchanged."""
        view = copy.copy(self)
        view.sides = {**self.sides, **{side: _Side(c.shape[0], c, None)
                                       for side, c in coords.items()}}
        return view

    def at_pairs(self, coords: dict[str, torch.Tensor]) -> PlanEvaluator:
        """A view placing the sides `coords` names at P pairs of points, (x_k, y_k) for the
        k-th rows of the `[P, D]` coordinates (as a batch of P single points), for
        expressions of coordinates and params only: a value is `[P, 1, 1, *ts]`."""
        view = copy.copy(self)
        view.sides = {**self.sides, **{side: _Side(1, c.unsqueeze(-2), None)
                                       for side, c in coords.items()}}
        return view

    def tile(self, cols: slice, params: dict | None = None, env: dict | None = None,
             fields: dict | None = None) -> PlanEvaluator:
        """A view of this evaluator on the points `cols` of the integrals' sides, with some
        params, step values or fields replaced (by tensors autograd tracks, say). This
        evaluator is unchanged."""
        view = copy.copy(self)
        view.cols = cols
        view.params = {**self.params, **(params or {})}
        view.env = {**self.env, **(env or {})}
        view.fields = {**self.fields, **(fields or {})}
        return view

    def value(self, e: Node, rows: slice | None = None) -> torch.Tensor:
        """The value of one expression `[*B?, X, Y, *ts]` (on the rows `rows` of x)."""
        return self.eval_nodes([e], rows)[e]

    # ---- leaves -----------------------------------------------------------------------------
    def _place(self, t: torch.Tensor, side: str | None, shape, rows: slice | None) -> torch.Tensor:
        """A compact tensor `[*B, n, *ts]` of `side` placed into the pair layout."""
        nts = len(_ts(shape))
        if side is None:
            return t
        if self.cols is not None and side != X_SIDE:
            t = t.narrow(t.dim() - nts - 1, self.cols.start, self.cols.stop - self.cols.start)
        if side == X_SIDE:
            if rows is not None:
                t = t.narrow(t.dim() - nts - 1, rows.start, rows.stop - rows.start)
            return t.unsqueeze(-nts - 1)
        return t.unsqueeze(-nts - 2)

    def _leaf(self, n: Node, rows: slice | None) -> torch.Tensor:
        op = n.op
        if op == "const":
            return self._t([n.value])
        if op == "zeros":
            return torch.zeros(_ts(n.shape), dtype=self.dtype, device=self.device)
        if op == "param":
            p = self.params[n.name].to(self.dtype)
            return p.reshape(_ts(n.shape))
        if op in ("ref", "cot"):
            name, side = n.name, n.side
            return self._place(self.env[name], side, n.shape, rows)
        side = n.side
        s = self.sides[side]
        if op == "coord":
            c = s.coords_of(n.var)
            if c is None:
                dom = self.plan.spaces[side].factor(n.var).domain
                raise InputError(f"the coordinates of `{dom}` are needed")
            return self._place(c, side, n.shape, rows)
        if op == "pos":
            return self._place(s.pos_of(n.var), side, n.shape, rows)
        if op == "field":
            return self._place(self.fields[n.name], side, n.shape, rows)
        if op == "weight":
            return self._place(s.weights_of(n.var).unsqueeze(-1), side, n.shape, rows)
        raise TypeError(op)  # pragma: no cover

    # ---- expressions --------------------------------------------------------------------------
    def eval_nodes(self, roots: list[Node], rows: slice | None) -> dict[Node, torch.Tensor]:
        vals: dict[Node, torch.Tensor] = {}
        if torch.compiler.is_compiling():  # (dynamo traces through lru_cache wrappers)
            order, masked = toposort(roots), {}
        elif torch.is_grad_enabled():  # autograd differentiates these values: mask each factor
            order, masked = _masked_order(tuple(roots))
        else:
            order, masked = _order(tuple(roots)), {}
        for n in order:
            if n.op != "ref" and self._special(n):
                continue  # outer products: only inside reductions (`_matrix`)
            factors = masked.get(n)
            if factors is not None:
                vals[n] = self._masked_product(vals[n.args[0]], [vals[f] for f in factors])
                continue
            vals[n] = self._node(n, [vals.get(a) for a in n.args], rows)
        return vals

    @staticmethod
    def _masked_product(cond: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
        """where(c, a·b·…, 0) as where(c, a, 0)·where(c, b, 0)·…: a masked term's factors are
        masked before they meet, so autograd never multiplies a masked-off 0 by a NaN or inf
        factor of that term (the reference masks a bracket's product so too)."""
        zero = torch.zeros((), dtype=factors[0].dtype, device=factors[0].device)
        keep = cond != 0
        out = torch.where(keep, factors[0], zero)
        for f in factors[1:]:
            out = out * torch.where(keep, f, zero)
        return out

    def _node(self, n: Node, a: list, rows) -> torch.Tensor:
        op = n.op
        if not n.args or op == "zeros":
            return self._leaf(n, rows)
        if op in ELEMENTWISE:
            return elementwise(op, a, self.dtype)
        if op == "dot":
            return (a[0] * a[1]).sum(-1, keepdim=True)
        if op == "sum":
            return a[0].sum(-1, keepdim=True)
        if op == "bcast":
            return a[0].expand(*a[0].shape[:-1], n.shape[0])
        if op == "component":
            i = n.attr("index")
            return a[0][..., i:i + 1]
        if op == "onehot":
            i, w = n.attrs
            return F.pad(a[0], (i, w - i - 1))
        if op == "slice":
            lo, hi = n.attrs
            return a[0][..., lo:hi]
        if op == "concat":
            lead = broadcast(*(t.shape[:-1] for t in a))
            return torch.cat([t.expand(*lead, t.shape[-1]) for t in a], dim=-1)
        if op == "linear":
            col, k, tr = n.attrs
            W = a[0][:, col:col + k]
            return a[1] @ W if tr else a[1] @ W.T
        if op == "basis":
            n_nodes, deriv = n.attrs
            return keys_basis(a[0], n_nodes, deriv)
        if op == "read":
            return self._read(n.name, a)
        raise TypeError(f"cannot evaluate {op}")  # pragma: no cover

    # ---- reads at computed points, and their gradients ------------------------------------
    def _flat_index(self, name: str, index: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """The row-major flat index `[*B?, X, Y]` into the field (or gradient) `name` of the
        integer point `index` (values `[*B?, X, Y, 1]`), N (one past the last point) where
        it is outside the axes; and N. (Indices of lattice points carry no batch: any batch
        dims here are copies, from a hoisted per-point step.)"""
        axes = self.target_axes(name)
        index = torch.broadcast_tensors(*(i[..., 0] for i in index))
        flat = torch.zeros(index[0].shape, dtype=torch.long, device=self.device)
        inside = torch.ones(index[0].shape, dtype=torch.bool, device=self.device)
        for i, size in zip(index, axes):
            i = i.round().long()  # exact integers (also in float32)
            inside = inside & (i >= 0) & (i < size)
            flat = flat * size + i
        total = math.prod(axes)
        return torch.where(inside, flat, total), total

    def target_axes(self, name: str) -> tuple[int, ...]:
        """The axes of what a read reads or a scatter fills: an input, a gradient key."""
        kind, _, short = name.rpartition(":")
        if kind == GradKind.COORDS:
            return (self.bound.sizes[short],)
        return self.bound.field_axes(self.plan.op, short)

    def _read(self, name: str, index: list[torch.Tensor]) -> torch.Tensor:
        """Field `name` `[*B, N, C]` at the points `index`: `[*B, X, Y, C]`, 0 outside."""
        flat, total = self._flat_index(name, index)
        f = self.fields[name]
        pad = torch.zeros(*f.shape[:-2], 1, f.shape[-1], dtype=f.dtype, device=f.device)
        f = torch.cat([f, pad], dim=-2)  # row N: the padding
        lead = broadcast(f.shape[:-2], flat.shape[:-2])
        xy = flat.shape[-2:]
        at = flat.expand(*lead, *xy).reshape(*lead, math.prod(xy), 1).expand(
            *lead, math.prod(xy), f.shape[-1])
        out = torch.gather(f.expand(*lead, *f.shape[-2:]), -2, at)
        return out.reshape(*lead, *xy, f.shape[-1])

    def _scatter(self, st: Step) -> torch.Tensor:
        """Σ over the points (pairs) the step's index depends on of its value, each added at
        its index of the target: `[*batch, N, *ts]`."""
        ts = _ts(st.shape)
        w = math.prod(ts)
        total = math.prod(self.target_axes(st.target))
        deps = frozenset().union(*(i.deps for i in st.index))
        lead = tuple(self.bound.batch)
        acc = torch.zeros(*lead, total + 1, w, dtype=self.dtype, device=self.device)
        chunks = self._chunks() if X_SIDE in deps else [None]
        for rows in chunks:
            vals = self.eval_nodes([st.expr, *st.index], rows)
            flat, _ = self._flat_index(st.target, [vals[i] for i in st.index])
            v = vals[st.expr]
            xy = broadcast(flat.shape[-2:], v.shape[v.dim() - len(ts) - 2:
                                                                v.dim() - len(ts)])
            v = v.expand(*lead, *xy, *ts).reshape(*lead, math.prod(xy), w)
            at = flat.expand(*lead, *xy).reshape(*lead, math.prod(xy), 1).expand(
                *lead, math.prod(xy), w)
            acc.scatter_add_(-2, at, v)
        return acc.narrow(-2, 0, total).reshape(*lead, total, *ts)

    def eval_level(self, expr: Node, side: str | None) -> torch.Tensor:
        """`expr` at one side's points (or per call): `[*B, X, Y, *ts]` with one axis of size 1
        (per call: just `[*ts]`)."""
        v = self.eval_nodes([expr], None)[expr]
        if side is not None:
            while v.dim() < len(_ts(expr.shape)) + 2:
                v = v.unsqueeze(0)
        return v

    # ---- reductions ----------------------------------------------------------------------
    def _chunks(self):
        n = self.sides[X_SIDE].n
        for lo in range(0, n, self.chunk):
            yield slice(lo, min(n, lo + self.chunk))

    def _matrix(self, expr: Node, vals, keep: str | None, X: int, Y: int) -> torch.Tensor:
        """Sum of a matrix-valued expression (outer products and their sums)
        over every axis but `keep` ("x", "y" or None), as `[K, *shape]`; the pair layout
        has X x Y points."""
        if expr.op == "+":
            return (self._matrix(expr.args[0], vals, keep, X, Y)
                    + self._matrix(expr.args[1], vals, keep, X, Y))
        if expr.op == "ref":
            t = self._place(self.env[expr.name], expr.side, expr.shape, None)
            return self._keep(t, keep, len(_ts(expr.shape)), X, Y)
        if expr.op == "outer":
            col, cols = expr.attrs
            u, v = vals[expr.args[0]], vals[expr.args[1]]
            lead = broadcast(u.shape[:-1], v.shape[:-1])
            u, v = u.expand(*lead, u.shape[-1]), v.expand(*lead, v.shape[-1])
            m = self._keep(torch.einsum("...a,...b->...ab", u, v), keep, 2, X, Y)
            return F.pad(m, (col, cols - col - v.shape[-1]))
        raise TypeError(f"cannot reduce {expr.op}")  # pragma: no cover

    def _keep(self, t: torch.Tensor, keep: str | None, nts: int, X: int, Y: int) -> torch.Tensor:
        """Sum `[*B, X, Y, *ts]` over everything but the `keep` axis: `[K, *ts]`."""
        t = t.expand(*t.shape[:-nts - 2], X, Y, *t.shape[-nts:])
        if keep is None:
            return t.sum(dim=tuple(range(t.dim() - nts))).unsqueeze(0)
        t = t.sum(dim=-nts - 1 if keep == "x" else -nts - 2)  # [*B, K, *ts]
        return t.reshape(-1, *t.shape[-nts - 1:]).sum(0)

    def _special(self, e: Node) -> bool:
        """Outer products (and sums with them) are reduced by `_matrix`."""
        if e.op == "outer":
            return True
        if e.op == "+":
            return any(self._special(a) for a in e.args)
        return e.op == "ref" and e.name in self.special

    def run_step(self, st: Step) -> torch.Tensor:
        if st.kind is StepKind.CONST and self._special(st.expr):  # a param gradient per call
            return self._matrix(st.expr, self.eval_nodes([st.expr], None), None, 1, 1)[0]
        if st.kind in (StepKind.POINT, StepKind.CONST):
            v = self.eval_level(st.expr, st.side)
            if st.side is None:
                return v.reshape(_ts(st.shape)) if v.dim() <= len(_ts(st.shape)) else v
            nts = len(_ts(st.shape))
            v = v.squeeze(-nts - 1) if st.side == X_SIDE else v.squeeze(-nts - 2)
            return self.full(v, st.side, nts)
        if st.kind is StepKind.SCATTER:
            return self._scatter(st)
        if st.kind is StepKind.TOTAL:
            if self._special(st.expr):
                return self._matrix_total(st)
            v = self.eval_level(st.expr, st.over)
            nts = len(_ts(st.shape))
            v = v.expand(*v.shape[:-nts - 2], *self._extent(st.over), *_ts(st.shape))
            return v.sum(dim=tuple(range(v.dim() - nts))).reshape(_ts(st.shape))
        if st.kind is StepKind.MAX:
            if self.sides[X_SIDE].n == 0 or self.sides[st.over].n == 0:  # a max over nothing
                return self.full(torch.zeros(1, 1, dtype=self.dtype, device=self.device), X_SIDE, 1)
            parts = []
            for rows in self._chunks():
                vals = self.eval_nodes([st.expr, st.mask], rows)
                s, mask = vals[st.expr], vals[st.mask]
                s, mask = torch.broadcast_tensors(s, mask)
                s = torch.where(mask != 0, s, torch.full_like(s, -math.inf))
                s = s.expand(*s.shape[:-3], rows.stop - rows.start, self.sides[st.over].n, 1)
                parts.append(s.amax(dim=-2))
            m = torch.cat(parts, dim=-2)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            return self.full(m, X_SIDE, 1)
        return self._pair_sum(st)

    def _extent(self, side: str) -> tuple[int, int]:
        """The (X, Y) extent of a value over all points of one side."""
        n = self.sides[side].n
        return (n, 1) if side == X_SIDE else (1, n)

    def full(self, v: torch.Tensor, side: str, nts: int) -> torch.Tensor:
        """Expand a compact `[*B?, n?, *ts]` to `[*batch, n, *ts]` (with `expand_batch`
        off, the batch dims stay as they are: a value the same for every batch entry
        stays one value)."""
        n = self.sides[side].n
        ts = v.shape[-nts:]
        lead = v.shape[:-nts - 1]
        if self.expand_batch:
            lead = broadcast(lead, self.bound.batch)
        return v.expand(*lead, n, *ts)

    def _matrix_total(self, st: Step) -> torch.Tensor:
        vals = self.eval_nodes([st.expr], None)
        n = self.sides[st.over].n
        X, Y = (n, 1) if st.over == X_SIDE else (1, n)
        return self._matrix(st.expr, vals, None, X, Y)[0]

    def _pair_sum(self, st: Step) -> torch.Tensor:
        ts = _ts(st.shape)
        nts = len(ts)
        matrix = self._special(st.expr)
        if matrix:
            self.special.add(st.name)
        over_y = st.side == X_SIDE
        ny = self.sides[st.over if over_y else st.side].n
        if self.sides[X_SIDE].n == 0:  # no rows: a sum over x is 0, a sum per x is empty
            if matrix:
                return torch.zeros(ny if not over_y else 0, *ts, dtype=self.dtype,
                                   device=self.device)
            return self.full(torch.zeros(1, *ts, dtype=self.dtype, device=self.device),
                              st.side, nts)
        acc = None
        parts = []
        for rows in self._chunks():
            vals = self.eval_nodes([st.expr], rows)
            if matrix:
                m = self._matrix(st.expr, vals, "x" if over_y else "y", rows.stop - rows.start,
                                 ny)
                if over_y:
                    parts.append(m)
                else:
                    acc = m if acc is None else acc + m
                continue
            v = vals[st.expr]
            v = v.expand(*v.shape[:-nts - 2], rows.stop - rows.start, ny, *ts)
            if over_y:
                parts.append(v.sum(dim=-nts - 1))
            else:
                s = v.sum(dim=-nts - 2)
                acc = s if acc is None else acc + s
        if matrix:
            out = torch.cat(parts, dim=0) if over_y else acc
            return out
        out = torch.cat(parts, dim=-nts - 1) if over_y else acc
        return self.full(out, st.side, nts)

    def run(self, prog: Program) -> None:
        for st in prog.steps:
            self.env[st.name] = self.run_step(st)


@functools.lru_cache(maxsize=4096)
def _order(roots: tuple[Node, ...]) -> tuple[Node, ...]:
    """`toposort(roots)`, once per set of roots (a Plan's are evaluated at every call)."""
    return tuple(toposort(roots))


@functools.lru_cache(maxsize=4096)
def _masked_order(roots: tuple[Node, ...]) -> tuple[tuple[Node, ...], dict[Node, list[Node]]]:
    """`_order(roots)` for a differentiated evaluation: each where(c, a·b·…, 0) maps to its
    factors a, b, … (evaluated as `_masked_product`), and the partial products that nothing
    else reads are left out of the order."""
    order = _order(roots)
    uses: dict[Node, int] = {}
    for n in order:
        for a in n.args:
            uses[a] = uses.get(a, 0) + 1
    masked: dict[Node, list[Node]] = {}
    skip: set[Node] = set()
    for n in order:
        if not (n.op == "where" and is_zero(n.args[2]) and n.args[1].op == "*"
                and n.args[1].shape == n.shape):  # (a wider 0 would widen the product)
            continue
        factors, stack = [], [(n.args[1], True)]
        while stack:  # (a factor, whether only the masked product reads it)
            f, only = stack.pop()
            if f.op != "*":
                factors.append(f)
                continue
            only = only and uses[f] == 1 and f not in roots
            if only:
                skip.add(f)
            stack.extend((a, only) for a in reversed(f.args))
        masked[n] = factors
    return tuple(n for n in order if n not in skip), masked


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient to the shape of the input it belongs to."""
    while t.dim() > len(shape):
        t = t.sum(0)
    for i, (a, b) in enumerate(zip(t.shape, shape)):
        if a != b and b == 1:
            t = t.sum(i, keepdim=True)
    return t


def evaluate_plan(plan: Plan, params, bound: Bound, generator=None, chunk: int = 64,
                  weights: dict[str, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, PlanEvaluator]:
    """Run the forward program; return the output and the evaluator (for the backward).
    `weights`: montecarlo weights drawn beforehand, by side."""
    ev = PlanEvaluator(plan, params, bound, generator, chunk, weights)
    ev.run(plan.forward)
    out = ev.env["out"]
    if plan.out_shape == ():
        out = out[..., 0]
    return unflatten_output(plan, bound, out), ev


def output_axes(plan: Plan, bound: Bound) -> tuple[int, ...]:
    """The axes of the output's points: its domains' axes, in order."""
    return tuple(n for d in plan.op.output.domains for n in bound.axes[d])


def unflatten_output(plan: Plan, bound: Bound, out: torch.Tensor) -> torch.Tensor:
    """`[*B, n, *ts]` over the flattened output side -> `[*B, *axes, *ts]`."""
    axes = output_axes(plan, bound)
    if len(axes) == 1:
        return out
    nts = len(plan.out_shape)
    return out.reshape(*out.shape[:out.dim() - nts - 1], *axes, *out.shape[out.dim() - nts:])


def set_cotangent(plan: Plan, ev: PlanEvaluator, dout: torch.Tensor) -> None:
    """Give the backward program its input: the cotangent of the output."""
    k = len(output_axes(plan, ev.bound))
    if k > 1:  # [*B, *axes, *ts] -> [*B, n, *ts]
        nts = len(plan.out_shape)
        dout = dout.reshape(*dout.shape[:dout.dim() - nts - k], ev.sides[X_SIDE].n,
                            *dout.shape[dout.dim() - nts:])
    if plan.out_shape == ():
        dout = dout.unsqueeze(-1)
    ev.env["dout"] = dout.expand(*ev.bound.batch, ev.sides[X_SIDE].n, *_ts(plan.out_shape))


def gradients(plan: Plan, ev: PlanEvaluator, keys=None) -> dict[str, torch.Tensor]:
    """The gradients a finished backward program computed, by key ("input:b", "param:s",
    "coords:X"), each summed over its parts and shaped like what it differentiates
    (only `keys`, if given)."""
    grads = {}
    for key, names in plan.backward.outputs.items():
        if keys is not None and key not in keys:
            continue
        total = None
        for name in names:
            t = ev.env[name]
            total = t if total is None else total + t
        name = key.name
        if key.kind is GradKind.PARAM:
            total = total.reshape(ev.params[name].shape)
        else:
            shape = ev.bound.shapes[name]
            if key.kind is GradKind.INPUT:
                axes = ev.bound.field_axes(plan.op, name)
                if len(axes) > 1:  # [*B, N, C] -> [*B, *axes, C]
                    total = total.reshape(*total.shape[:-2], *axes, total.shape[-1])
                if plan.op.input(name).width is None:
                    total = total[..., 0]
            total = _sum_to(total, shape)
        grads[key] = total
    return grads


def evaluate_backward(plan: Plan, ev: PlanEvaluator, dout: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the backward program for cotangent `dout`; gradients by key ("input:b", ...)."""
    set_cotangent(plan, ev, dout)
    ev.run(plan.backward)
    return gradients(plan, ev)
