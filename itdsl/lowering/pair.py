"""A group of pair steps of a Plan -> one TVM tensor-expression function.

A *pair kernel* computes, for every point i of its row side (the side the results
live on) and every batch entry b,

    O[b, i, c] = reduce_j  summand_c(b, i, j)        (sum, or max under a mask)

where j runs over the points of the other side (the columns) and c over the
concatenated channels of the group's steps. Leaves of the summand become arrays:

    row leaves      R_k[b, i, w]       (AoS: a row's channels are contiguous)
    column leaves   C_k[b, w, j]       (SoA: consecutive j contiguous, for code vectorised
                    or C_k[b, j, w]     over the columns; AoS for code vectorised over the
                                       channels; on the CPU a leaf read both ways comes twice)
    params          P_k[...]           their own shape (scalars as (1,))
    per-call values K_k[...]           likewise
    tables          T_k[b, n_1, ..., n_k, w]   a field read at computed points: its whole
                                       array per batch entry; the axis sizes n_a are
                                       symbolic, bound from the array passed

A read `read [f](i_1, ..., i_k)` evaluates its indices (float values that are exact
integers) from the leaves, rounds them, and reads T at them where every index is inside
[0, n_a): the bounds are tested in floating point before the conversion to int32 (a NaN
or an infinite index is outside, and never converted), and the load's index is clamped to
the point 0 outside, so that the load, which a select evaluates in any case, is always in
bounds; outside, the read is exactly 0 (zero padding), inside it is the field's value
(NaN included).

Sizes are symbolic: rows = nt*TI and columns = mt*TJ for scalar tile counts nt, mt
passed explicitly (TVM 0.27 miscompiles tiled schedules over free symbolic extents;
see docs/ARCHITECTURE.md), the caller pads with zeros, and columns beyond `m_valid` (rows
beyond `n_valid`) are masked out of every sum (`PairBuilder.masked`, which relies on that
zero padding of the leaves). Channel reductions inside the summand (dot products, MLP
layers) become their own stages, computed per tile of columns by the schedule, so no buffer
is N x M.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

from tvm import te, tirx
from tvm.te.tensor import TensorSlice

from ..errors import LoweringError
from ..functions import FUNCTIONS
from ..symbolic import pexpr as P
from ..symbolic.pexpr import Node
from .spec import INLINE_REDUCTION, PairSpec, _flat

_F32_MAX = 3.4028234663852886e38  # the largest float32
_F32_OVERFLOW = 3.4028235677973366e38  # the largest float32 plus half an ulp: rounds to inf

CUBIC_A = -0.75
LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453
# the fast exp clamps its argument: exp(89) overflows float32; below -87.6, 2^(n-1) is 0
EXP_LO, EXP_HI = -87.6, 89.0


def poly_exp(x: tirx.Var, dtype: str) -> tirx.PrimExpr:
    """exp(x) for x in [EXP_LO, EXP_HI] (the caller clamps): Cody-Waite range reduction and a
    degree-6 polynomial (TVM's fast_exp), which vectorises, unlike calls to expf. 2^n is built
    from its bits as 2^(n-1) times a doubled polynomial, so that n reaches 128 and exp
    overflows to inf exactly where float32 does; below exp(-87) the result is 0 (never a slow
    subnormal). float32 only (its bits)."""
    def c(v: float):
        return tirx.const(v, dtype)
    nv, rv = tirx.Var("en", dtype), tirx.Var("er", dtype)
    p = c(2 * 1.9875691500e-4)
    for k in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
              5.0000001201e-1, 1.0, 1.0):  # (the last two: 2·(1 + r + r²·...), by Horner)
        p = p * rv + c(2 * k)
    half_two_n = tirx.reinterpret(dtype, (nv + c(126.0)).astype("int32") << 23)
    inner = tirx.Let(rv, x - nv * c(LN2), half_two_n * p)
    return tirx.Let(nv, te.floor(x * c(LOG2E) + c(0.5)), inner)


class ElementMath:
    """Constants and elementwise math as TVM expressions, the builder `itdsl.functions`' TVM
    forms are written against (`ew`); shared by the pair kernels (`PairBuilder`) and the
    fused online softmax (`lowering/softmax.py`)."""

    te, tirx = te, tirx  # for the TVM forms of `itdsl.functions`

    def __init__(self, dtype: str, fast_exp: bool):
        self.dtype, self.fast_exp = dtype, fast_exp
        self._scalar_call = False  # a function TVM cannot vectorise was called (`libm`)

    # ---- constants and elementwise math -------------------------------------------------------
    # Every function here gives NaN and ±inf where torch does: comparisons with NaN are false,
    # so a clamp written as selects keeps a NaN (te.min/te.max would drop it), and the fast
    # exp overflows to inf where expf does.
    def c(self, v: float) -> tirx.PrimExpr:
        if self.dtype == "float32" and math.isfinite(v) and abs(v) > _F32_MAX:
            # rounded to float32 as torch rounds it: beyond the largest float32 (by more
            # than half an ulp) it is ±inf (TVM refuses such a float32 literal)
            v = math.copysign(math.inf, v) if abs(v) >= _F32_OVERFLOW else math.copysign(
                _F32_MAX, v)
        return tirx.const(v, self.dtype)

    def let(self, x, body):
        """`body(x)`, with a compound `x` let-bound first: an argument that is read more than
        once (or handed to an intrinsic that TVM may expand) must occur once in the tree, or
        nested functions grow exponentially and TVM's vectoriser meets one Let twice."""
        if isinstance(x, (tirx.Var, tirx.FloatImm, tirx.IntImm, TensorSlice)):
            return body(x)
        v = tirx.Var("t", self.dtype)
        return tirx.Let(v, x, body(v))

    def isnan(self, x):
        """x is NaN, from its bits: TVM's simplifier folds `x != x` to false, and its
        vectoriser cannot take `tir.isnan` of a let-bound value."""
        bits, inf, sign_off = (("int32", 0x7F800000, 0x7FFFFFFF) if self.dtype == "float32"
                               else ("int64", 0x7FF0000000000000, 0x7FFFFFFFFFFFFFFF))
        magnitude = tirx.reinterpret(bits, x) & tirx.const(sign_off, bits)
        return magnitude > tirx.const(inf, bits)  # exponent all ones, mantissa not 0

    def clamp(self, x, lo: float, hi: float):
        """x clamped to [lo, hi]; a NaN stays NaN."""
        return self.let(x, lambda x: tirx.Select(x > self.c(hi), self.c(hi),
                                                 tirx.Select(x < self.c(lo), self.c(lo), x)))

    def exp(self, x):
        if not self.fast_exp:
            return te.exp(x)
        return self.let(self.clamp(x, EXP_LO, EXP_HI), lambda xv: poly_exp(xv, self.dtype))

    def libm(self, name: str, x):
        """`te.<name>(x)`, which the code generator makes a call to the C library's function:
        it does not vectorise, so the schedule leaves the block scalar (`compute`)."""
        self._scalar_call = True
        return getattr(te, name)(x)

    def erf(self, x):
        """erf; in float32 a rational approximation on [-4, 4] (odd polynomial of degree 13
        over an even one of degree 8; |error| < 2e-7), which vectorises, unlike calls to
        erff. It is the approximation used by Eigen and XLA for float32."""
        if not self.fast_exp:
            return self.libm("erf", x)
        c = self.c

        def body(x):
            x2 = x * x
            p = c(-2.72614225801306e-10)
            for k in (2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
                      -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02):
                p = p * x2 + c(k)
            q = c(-1.45660718464996e-05)
            for k in (-2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
                      -1.42647390514189e-02):
                q = q * x2 + c(k)
            return x * p / q
        return self.let(self.clamp(x, -4.0, 4.0), body)

    def softplus(self, x):
        """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), and x itself beyond 20 (as torch).
        log1p(e) for e in [0, 1] is 2 atanh(s), s = e/(2 + e) <= 1/3, summed as a series in
        s^2: no cancellation for small e, it vectorises, and it needs no TVM log1p (whose
        expansion breaks TVM's vectoriser on let-bound arguments)."""
        c = self.c
        terms = 8 if self.dtype == "float32" else 17  # (1/9)^k / (2k + 1) below the epsilon

        def log1p(e):
            def series(s):
                s2 = s * s
                p = c(1.0 / (2 * terms - 1))
                for k in range(terms - 2, -1, -1):
                    p = p * s2 + c(1.0 / (2 * k + 1))
                return c(2.0) * s * p
            return self.let(e / (c(2.0) + e), series)

        tail = self.let(self.exp(-te.abs(x)), log1p)
        return tirx.Select(x > c(20.0), x, tirx.Select(x > c(0.0), x, c(0.0)) + tail)

    def tanh(self, x):
        if not self.fast_exp:
            return self.let(x, te.tanh)
        return self.c(1.0) - self.c(2.0) / (self.exp(self.c(2.0) * x) + self.c(1.0))

    def power(self, x, y):
        e = y.value if isinstance(y, tirx.FloatImm) else None
        if e in (0.5, -0.5):  # as torch.pow: a square root, NaN for -inf (powf gives inf)
            root = self.let(x, te.sqrt)
            return root if e > 0 else self.c(1.0) / root
        return self.let(x, lambda x: self.let(y, lambda y: te.power(x, y)))

    def minimum(self, x, y):
        """NaN in either argument gives NaN, as torch.minimum does."""
        return self._pick(x, y, lambda x, y: x < y)

    def maximum(self, x, y):
        return self._pick(x, y, lambda x, y: x > y)

    def _pick(self, x, y, first):
        def pick(x, y):
            return tirx.Select(tirx.Or(first(x, y), self.isnan(x)), x, y)
        return self.let(x, lambda x: self.let(y, lambda y: pick(x, y)))

    def ew(self, op: str, a: list):
        """Elementwise function `op` of `a`: its TVM form in `itdsl.functions`, written with
        this builder's methods (the fast exp, erf and softplus, selects that keep a NaN)."""
        f = FUNCTIONS.get(op)
        if f is None or f.tvm is None:
            raise LoweringError(f"no TVM lowering for `{op}`")  # pragma: no cover
        return f.tvm(self, *a)


class PairBuilder(ElementMath):
    """Builds the TE of one pair kernel (see the module docstring)."""

    def __init__(self, spec: PairSpec, dtype: str, fast_exp: bool):
        super().__init__(dtype, fast_exp)
        self.spec = spec
        self.B = te.var("B")
        self.mt = te.var("mt")
        self.m_valid = te.var("m_valid")
        if spec.fused:  # rows in parts of tiles (`row_parts`); padded rows are masked
            self.parts, self.tiles = te.var("parts"), te.var("tiles")
            self.n_valid = te.var("n_valid")
            self.NP = self.parts * self.tiles * spec.tile_rows
        else:
            self.nt = te.var("nt")
            self.NP = self.nt * spec.tile_rows
        self.MP = self.mt * spec.tile_cols
        self.arrays: dict[Node, te.Tensor] = {}
        self.leaf_arrays: list[te.Tensor] = []  # one per leaf of `spec.leaves`
        # a column leaf's arrays by layout (True: [b, w, j]); see `across`
        self.col_layouts: dict[Node, dict[bool, te.Tensor]] = {}
        # whether the code being built vectorises over the columns (a scalar stage, an
        # output of `lanes` > 1), which read a column leaf [b, w, j] where it has that layout
        self.across = False
        self._masked_of: dict[tuple[Node, bool], te.Tensor] = {}  # see `masked`
        self.transposed: dict[Node, te.Tensor] = {}  # matrix params passed as W.T
        self.stages: list[te.Tensor] = []  # in creation (topological) order
        self.stage_of: dict[Node, te.Tensor] = {}
        self.tables: dict[str, tuple[te.Tensor, list]] = {}  # field -> (array, axis sizes)
        for k, leaf in enumerate(spec.leaves):
            if leaf.role == "row":
                shape = (self.B, self.NP, leaf.width)
            elif leaf.role == "col":
                shape = ((self.B, leaf.width, self.MP) if leaf.soa else
                         (self.B, self.MP, leaf.width))
            elif leaf.role == "table":
                sizes = [te.var(f"table{k}_n{a}") for a in range(leaf.shape[0])]
                T = te.placeholder((self.B, *sizes, leaf.width), self.dtype, name=f"table{k}")
                self.tables[leaf.node.name] = (T, sizes)
                self.leaf_arrays.append(T)
                continue
            else:
                shape = leaf.shape[::-1] if leaf.transposed else (leaf.shape or (1,))
            A = te.placeholder(shape, self.dtype, name=f"{leaf.role}{k}")
            self.leaf_arrays.append(A)
            if leaf.role == "col":
                self.col_layouts.setdefault(leaf.node, {})[leaf.soa] = A
            else:
                (self.transposed if leaf.transposed else self.arrays)[leaf.node] = A
        # computes whose body calls a function TVM cannot vectorise (see `compute`)
        self.scalar_only: set[str] = set()

    def compute(self, shape, fbody, name: str) -> te.Tensor:
        """te.compute, noting whether the body calls a function TVM cannot vectorise (erf in
        float64: libm's): the schedule leaves such a block scalar, since TVM would scalarise
        it after the fact and trip over its let-bound values."""
        outer, self._scalar_call = self._scalar_call, False
        T = te.compute(shape, fbody, name=name)
        if self._scalar_call:
            self.scalar_only.add(name)
        self._scalar_call = outer
        return T

    # ---- values ----------------------------------------------------------------------------------
    # `val(n)(b, i, j, ch)` is node n's value at batch b, row i, column j and channel
    # indices ch (one per axis of its shape).

    @contextmanager
    def reading(self, across: bool):
        """Build values for code that vectorises over the columns (`across`) or not."""
        outer, self.across = self.across, across
        try:
            yield
        finally:
            self.across = outer

    def masked(self, n: Node, by_row: bool = False):
        """`val(n)`, 0 at the padded columns (j ≥ m_valid), or at the padded rows (i ≥
        n_valid) `by_row`: a sum's summand per row (per column). Where a select per channel
        and pair can be spared, it is, so that the accumulation is one multiply-add per
        element (a select inside it costs a multiply, a mask and an add, and the mask per
        column):
        - an outer product (or a sum of them: a param gradient's summand) is the product of
          its two factors masked in stages of their own, [v]·u ⊗ [v]·w = [v]·(u ⊗ w) (0·0
          at a padded column, whatever u and w hold there);
        - a product with a leaf of the padded side is 0 there already (`_zero_padded`)."""
        zero = self.c(0.0)
        if n not in self.stage_of and n.op == "+" and all(a.shape == n.shape for a in n.args):
            fa, fb = self.masked(n.args[0], by_row), self.masked(n.args[1], by_row)
            return lambda b, i, j, ch: fa(b, i, j, ch) + fb(b, i, j, ch)
        if n not in self.stage_of and n.op == "outer":
            col, _ = n.attrs
            w = _flat(n.args[1].shape)
            u, v = (self._masked_stage(a, by_row) for a in n.args)
            return lambda b, i, j, ch: tirx.Select(
                tirx.all(ch[1] >= col, ch[1] < col + w),
                u(b, i, j, (ch[0],)) * v(b, i, j, (ch[1] - col,)), zero)
        g = self._zero_padded(n, by_row)
        if g is not None:
            return g
        f, valid = self.val(n), self._valid(by_row)
        return lambda b, i, j, ch: tirx.Select(valid(i, j), f(b, i, j, ch), zero)

    def _valid(self, by_row: bool):
        """(i, j) -> whether the pair's column (row, `by_row`) is a point, not padding."""
        if by_row:
            return lambda i, j: i < self.n_valid
        return lambda i, j: j < self.m_valid

    def _zero_padded(self, n: Node, by_row: bool):
        """`val(n)` written to be exactly 0 at the padded columns (rows, `by_row`) without a
        select per channel, or None. The runtime pads the leaves of each side with zeros,
        so a product (through products that are not stages) with such a leaf as one factor
        is 0 there if every other factor is finite there: leaves of the side, finite
        constants, and scalars under a select (one per pair, not one per channel: the
        select of K(x, y) in K(x, y)·b(y), the forward of every kernel sum, is outside the
        loop over b's channels). At the points, the value is the product as written (with
        the select gone, the code generator may fuse its multiply into the accumulation: a
        rounding of one ulp, not of the product's value)."""
        side = self.spec.row_side if by_row else self.spec.col_side

        def padded(m: Node) -> bool:
            return (m.op in P.LEAVES and m.op != "const" and m.deps == {side}
                    and m not in self.stage_of)

        def with_leaf(m: Node) -> bool:
            return padded(m) or (m.op == "*" and m not in self.stage_of
                                 and any(with_leaf(a) for a in m.args))

        def finite(m: Node):  # val(m), finite at the padding; None where that is not sure
            if padded(m) or (m.op == "const" and math.isfinite(m.value)):
                return self.val(m)
            if with_leaf(m):
                fs = [finite(a) for a in m.args]
                if any(f is None for f in fs):
                    return None
                shapes = [a.shape for a in m.args]
                return lambda b, i, j, ch: self.ew(
                    "*", [f(b, i, j, ch if s else ()) for f, s in zip(fs, shapes)])
            if not m.shape:  # one select per pair: the vector loop broadcasts its result
                f, zero = self.val(m), self.c(0.0)
                return lambda b, i, j, ch: tirx.Select(valid(i, j), f(b, i, j, ()), zero)
            return None
        valid = self._valid(by_row)
        return finite(n) if with_leaf(n) else None

    def _masked_stage(self, n: Node, by_row: bool = False):
        """`val(n)`, 0 at the padded columns (rows, `by_row`), in a stage (one per node)."""
        key = (n, by_row)
        if key not in self._masked_of:
            with self.reading(across=_flat(n.shape) == 1):
                f = self.val(n)
            zero, valid = self.c(0.0), self._valid(by_row)
            self._masked_of[key] = self._new_stage(n, lambda b, i, j, c: tirx.Select(
                valid(i, j), f(b, i, j, (c,) if n.shape else ()), zero))
        return _read(self._masked_of[key])

    def val(self, n: Node):
        if n in self.stage_of:
            return _read(self.stage_of[n])
        op = n.op
        if op == "const":
            v = n.value
            return lambda b, i, j, ch: self.c(v)
        if op == "zeros":
            return lambda b, i, j, ch: self.c(0.0)
        if op in P.LEAVES:
            return self._leaf_val(n)
        if op == "linear":  # (its matrix is read in the stage, in the layout it wants)
            return self.val(self._stage(n))
        args = [self.val(a) for a in n.args]
        if op in P.ELEMENTWISE:
            shapes = [a.shape for a in n.args]

            def f(b, i, j, ch, args=args, shapes=shapes):
                return self.ew(op, [g(b, i, j, ch if s else ()) for g, s in zip(args, shapes)])
            return f
        if op == "bcast":
            return lambda b, i, j, ch: args[0](b, i, j, ())
        if op == "component":
            k = n.attr("index")
            return lambda b, i, j, ch: args[0](b, i, j, (k,))
        if op == "onehot":
            k, _ = n.attrs
            return lambda b, i, j, ch: tirx.Select(ch[0] == k, args[0](b, i, j, ()),
                                                   self.c(0.0))
        if op == "slice":
            lo, _ = n.attrs
            return lambda b, i, j, ch: args[0](b, i, j, (ch[0] + lo,))
        if op == "concat":
            return self._concat(n, args)
        if op == "basis":
            return self._basis(n, args[0])
        if op == "read":
            return self._read(n, args)
        if op == "outer":
            col, _ = n.attrs
            w = _flat(n.args[1].shape)
            return lambda b, i, j, ch: tirx.Select(
                tirx.all(ch[1] >= col, ch[1] < col + w),
                args[0](b, i, j, (ch[0],)) * args[1](b, i, j, (ch[1] - col,)), self.c(0.0))
        if op in ("dot", "sum") and n not in self.stage_of:  # short: written out inline
            w = n.args[0].shape[0]
            if op == "dot":
                return lambda b, i, j, ch: _add_all([args[0](b, i, j, (r,)) * args[1](b, i, j, (r,))
                                                     for r in range(w)])
            return lambda b, i, j, ch: _add_all([args[0](b, i, j, (r,)) for r in range(w)])
        if op in ("dot", "sum", "linear"):
            return self.val(self._stage(n))
        raise LoweringError(f"no TVM lowering for `{op}`")  # pragma: no cover

    def _leaf_val(self, n: Node):
        spec = self.spec
        if n in self.col_layouts:  # the layout the code being built wants, where there is one
            layouts = self.col_layouts[n]
            soa = self.across if self.across in layouts else next(iter(layouts))
            A = layouts[soa]
            if soa:
                return lambda b, i, j, ch: A[b, ch[0] if ch else 0, j]
            return lambda b, i, j, ch: A[b, j, ch[0] if ch else 0]
        A = self.arrays[n]
        if n.deps == {spec.row_side}:
            return lambda b, i, j, ch: A[b, i, ch[0] if ch else 0]
        return lambda b, i, j, ch: A[ch if ch else (0,)]

    def _read(self, n: Node, args):
        """Field `n.name` at the point of the rounded indices, 0 outside its axes (see the
        module docstring)."""
        T, sizes = self.tables[n.name]
        zero = self.c(0.0)

        def f(b, i, j, ch):
            # no Let here: a block's read regions are taken from its loads' indices, where
            # a let-bound variable would be undefined; the index sums are cheap, and the
            # code generator shares their copies
            rs = [te.round(g(b, i, j, ())) for g in args]
            inside = tirx.all(*[tirx.And(r >= zero, r < size.astype(self.dtype))
                                for r, size in zip(rs, sizes)])
            idx = [tirx.Select(inside, r, zero).astype("int32") for r in rs]
            return tirx.Select(inside, T[(b, *idx, ch[0] if ch else 0)], zero)
        return f

    def _concat(self, n: Node, args):
        widths = [_flat(a.shape) for a in n.args]
        shaped = [bool(a.shape) for a in n.args]

        def f(b, i, j, ch):
            out = None
            lo = sum(widths)
            for g, w, s in reversed(list(zip(args, widths, shaped))):
                lo -= w
                v = g(b, i, j, (ch[0] - lo,) if s else ())
                out = v if out is None else tirx.Select(ch[0] < lo + w, v, out)
            return out
        return f

    def _basis(self, n: Node, u):
        """Weight of spline node p at u (closed form; see runtime/params.keys_basis)."""
        nodes, deriv = n.attrs
        c, a = self.c, CUBIC_A

        def keys(d):
            def weight(d, x):
                if deriv == 0:
                    near = ((c(a + 2) * x - c(a + 3)) * x) * x + c(1.0)
                    far = ((c(a) * x - c(5 * a)) * x + c(8 * a)) * x - c(4 * a)
                else:
                    sgn = tirx.Select(d > c(0.0), c(1.0),
                                      tirx.Select(d < c(0.0), c(-1.0), c(0.0)))
                    near = sgn * (c(3 * (a + 2)) * x - c(2 * (a + 3))) * x
                    far = sgn * ((c(3 * a) * x - c(10 * a)) * x + c(8 * a))
                # a NaN argument gives NaN weights, as the reference's taps do
                rest = tirx.Select(self.isnan(d), d, c(0.0))
                return tirx.Select(x <= c(1.0), near, tirx.Select(x < c(2.0), far, rest))
            return self.let(d, lambda d: self.let(te.abs(d), lambda x: weight(d, x)))

        def f(b, i, j, ch):
            k = ch[0]
            k = tirx.const(k, "int32") if isinstance(k, int) else k  # (a dot written out)

            def at(uu):
                def weights(t):
                    p = k.astype(self.dtype)
                    w = keys(t - p)
                    w = w + tirx.Select(k == 0, keys(t + c(1.0)), c(0.0))
                    w = w + tirx.Select(k == nodes - 1, keys(t - c(float(nodes))), c(0.0))
                    if deriv:
                        inside = tirx.Select(tirx.all(uu >= c(0.0), uu <= c(1.0)),
                                             c(nodes - 1.0), c(0.0))
                        w = w * inside
                    return w
                return self.let(self.clamp(uu, 0.0, 1.0) * c(nodes - 1), weights)
            return self.let(u(b, i, j, ()), at)
        return f

    def _pair_stage(self, n: Node, f) -> None:
        """The stage of `n`: `f(b, i, j, c)` at every pair and channel (see `_new_stage`)."""
        self.stage_of[n] = self._new_stage(n, f)

    def _new_stage(self, n: Node, f) -> te.Tensor:
        """A stage holding `f(b, i, j, c)` at every pair and channel of `n`'s shape: (b, i, j)
        for a scalar or a width of 1 (TVM makes no loop of extent 1, and the schedule finds
        a stage's loops by their number), (b, i, j, c) for a vector."""
        width = n.shape[0] if n.shape else 1
        name = f"s{len(self.stages)}"
        if width > 1:
            T = self.compute((self.B, self.NP, self.MP, width), f, name=name)
        else:
            T = self.compute((self.B, self.NP, self.MP), lambda b, i, j: f(b, i, j, 0), name=name)
        self.stages.append(T)
        return T

    def _stage(self, n: Node) -> Node:
        """Materialise `n` (a channel reduction) as a stage over (b, i, j[, channel])."""
        if n in self.stage_of:
            return n
        if n.op == "linear":
            W, a = n.args
            col, k, tr = n.attrs
            av = self.val(a)
            # W·a vectorises over W's rows, contiguous in W.T (passed wherever a product
            # W·a reads W: `spec_of`), Wᵀ·a over its columns, contiguous in W
            Wt = None if tr else self.transposed.get(W)

            def Wv(o, c):  # W[o, c]
                return Wt[c, o] if Wt is not None else self.arrays[W][o, c]

            def term(b, i, j, o, r):  # W[o, col + r] a[r], or W[r, col + o] a[r] (`tr`)
                w = Wv(r, col + o) if tr else Wv(o, col + r)
                return w * av(b, i, j, (r,) if a.shape else ())
            extent = k if not tr else W.shape[0]
            if extent == 1:  # no reduction axis of extent 1 either
                f = lambda b, i, j, o: term(b, i, j, o, 0)  # noqa: E731
            else:
                r = te.reduce_axis((0, extent), name="r")
                f = lambda b, i, j, o: te.sum(term(b, i, j, o, r), axis=r)  # noqa: E731
            self._pair_stage(n, f)
            return n
        a = n.args[0]
        av = self.val(a)
        bv = self.val(n.args[1]) if n.op == "dot" else None
        r = te.reduce_axis((0, a.shape[0]), name="r")
        if n.op == "dot":
            self._pair_stage(n, lambda b, i, j, c: te.sum(av(b, i, j, (r,)) * bv(b, i, j, (r,)),
                                                          axis=r))
        else:
            self._pair_stage(n, lambda b, i, j, c: te.sum(av(b, i, j, (r,)), axis=r))
        return n

    def _materialise(self, n: Node) -> None:
        """Compute an elementwise pair value once per (b, i, j[, channel]) in a stage."""
        if n in self.stage_of:
            return
        v = self.val(n)
        self._pair_stage(n, lambda b, i, j, c: v(b, i, j, (c,) if n.shape else ()))

    # ---- the whole kernel -----------------------------------------------------------------
    def build(self) -> list:
        spec = self.spec
        for n in spec.staged:  # in topological order: producers first
            with self.reading(across=_flat(n.shape) == 1):  # (scalar stages: over columns)
                if n.op == "linear" or (n.op in ("dot", "sum")
                                        and n.args[0].shape[0] > INLINE_REDUCTION):
                    self._stage(n)
                else:  # (a short dot, staged to round it, is written out)
                    self._materialise(n)
        zero = self.c(0.0)
        low = self.c(-math.inf)  # a max over no term is -inf (the runtime reads it as 0)
        init = zero if spec.kind == "sum" else low
        # a max whose identity is -inf (te.max's is the lowest finite number): a row with no
        # live term comes out as -inf, which the runtime reads as "no shift"
        reduce = te.sum if spec.kind == "sum" else te.comm_reducer(
            lambda a, b: te.max(a, b), lambda t: tirx.const(-math.inf, t), name="max_or_ninf")
        arrays = self.leaf_arrays
        if spec.fused:
            return arrays + self._fused_outputs() + [self.parts, self.tiles, self.mt,
                                                     self.m_valid, self.n_valid]
        # a sum's terms are masked where they are made (`masked`), a max's as a whole
        sums = spec.kind == "sum" and all(st.mask is None for st in spec.steps)
        with self.reading(across=spec.lanes > 1):
            channels, width = self._channels(spec.steps, masked=sums)

        def summand(b, i, j, c):
            if sums:
                return channels(b, i, j, c)
            return tirx.Select(j < self.m_valid, channels(b, i, j, c), init)

        if spec.matrix:  # one step, a matrix per row: O[b, i, r, c]
            f = self.masked(spec.steps[0].expr)
            R, Cw = spec.steps[0].shape
            j = te.reduce_axis((0, self.MP), name="j")
            O = self.compute((self.B, self.NP, R, Cw), lambda b, i, r, c: te.sum(
                f(b, i, j, (r, c)), axis=j), name="O")
        elif spec.lanes > 1:
            # one channel: the columns are reduced in `lanes` interleaved partial results
            # (P), which vectorise, then summed (O)
            L = spec.lanes
            k = te.reduce_axis((0, self.mt * (spec.tile_cols // L)), name="j")
            Pl = self.compute((self.B, self.NP, L), lambda b, i, lane: reduce(
                summand(b, i, k * L + lane, 0), axis=k), name="P")
            r = te.reduce_axis((0, L), name="lane")
            O = self.compute((self.B, self.NP, 1), lambda b, i, c: reduce(Pl[b, i, r], axis=r),
                           name="O")
        else:
            j = te.reduce_axis((0, self.MP), name="j")
            O = self.compute((self.B, self.NP, width), lambda b, i, c: reduce(
                summand(b, i, j, c), axis=j), name="O")
        return arrays + [O, self.nt, self.mt, self.m_valid]

    def _channels(self, steps, masked: bool = False):
        """The steps' summands with their channels concatenated: (f(b, i, j, c), width); a
        max step's term is -inf where its mask is 0; `masked`: each summand 0 at the padded
        columns (`masked`)."""
        zero, low = self.c(0.0), self.c(-math.inf)
        parts, off = [], 0
        for st in steps:
            w = _flat(st.shape)
            parts.append((self.masked(st.expr) if masked else self.val(st.expr), st.expr.shape,
                          self.val(st.mask) if st.mask is not None else None, off, w))
            off += w

        def f(b, i, j, c):
            out = None
            for g, shape, mask, lo, w in reversed(parts):
                v = g(b, i, j, (c - lo,) if shape else ())
                if mask is not None:
                    v = tirx.Select(mask(b, i, j, ()) != zero, v, low)
                out = v if out is None else tirx.Select(c < lo + w, v, out)
            return out
        return f, off

    def _fused_outputs(self) -> list:
        """The outputs of a fused kernel (`PairSpec.outputs`, laid out as `Output.shape`
        says), all sums over one sweep: per row over the valid columns, per column over
        the valid rows of each part of the rows."""
        spec, TI = self.spec, self.spec.tile_rows

        def row(p, t, ii):
            return (p * self.tiles + t) * TI + ii
        lead = (self.B, self.parts, self.tiles, TI)
        outs = []
        for out in spec.outputs:
            ch = tuple(out.step.shape)
            with self.reading(across=out.lanes > 1):
                outs.append(self._fused_output(out, ch, lead, row))
        return outs

    def _fused_output(self, out, ch: tuple, lead: tuple, row) -> te.Tensor:
        if out.kind != "col" and out.lanes == 1:  # (per row: over the valid columns)
            return self.compute((*lead, *ch), _per_row(self, self.masked(out.step.expr), row),
                                name=out.name)
        if out.kind == "col":  # (over the valid rows of each part)
            shape = ((self.B, self.parts, *ch, self.MP) if out.lanes > 1 else
                     (self.B, self.parts, self.MP, *ch))
            return self.compute(shape, _per_column(self, self.masked(
                out.step.expr, by_row=True), row, len(ch), out.lanes), name=out.name)
        return self.compute((*lead, *ch, out.lanes), _per_lane(
            self, self.masked(out.step.expr), row, out.lanes), name=out.name)

# The bodies of a fused kernel's outputs (te.compute takes no closures with default
# arguments, and the reduction axes must be made inside the body). `f(b, i, j, ch)` is the
# summand; `row(p, t, ii)` the row of part p, tile t, row ii.
def _read(T: te.Tensor):
    """The value of a stage at (b, i, j, ch): [b, i, j] for a scalar or a width of 1."""
    if len(T.shape) == 3:
        return lambda b, i, j, ch: T[b, i, j]
    return lambda b, i, j, ch: T[(b, i, j, *ch)]


def _per_row(pb: PairBuilder, f, row):
    """(`f` masked: 0 at the padded columns, see `PairBuilder.masked`)"""
    def body(b, p, t, ii, *ch):
        j = te.reduce_axis((0, pb.MP), name="j")
        return te.sum(f(b, row(p, t, ii), j, ch), axis=j)
    return body


def _per_lane(pb: PairBuilder, f, row, L: int):
    """(`f` masked: 0 at the padded columns)"""
    def body(b, p, t, ii, *ch_lane):
        *ch, lane = ch_lane
        k = te.reduce_axis((0, pb.mt * (pb.spec.tile_cols // L)), name="k")
        return te.sum(f(b, row(p, t, ii), k * L + lane, tuple(ch)), axis=k)
    return body


def _per_column(pb: PairBuilder, f, row, nch: int, lanes: int):
    """(`f` masked: 0 at the padded rows)"""
    def body(b, p, *rest):
        ch, j = (rest[:-1], rest[-1]) if lanes > 1 else (rest[1:], rest[0])
        kt = te.reduce_axis((0, pb.tiles), name="kt")
        ki = te.reduce_axis((0, pb.spec.tile_rows), name="ki")
        return te.sum(f(b, row(p, kt, ki), j, tuple(ch)), axis=[kt, ki])
    return body


def _add_all(terms: list):
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


@dataclass(frozen=True)
class Stage:
    """A stage of a pair kernel, as its schedule needs to know it."""

    name: str
    channel: bool  # has a channel axis (after row and column)
    reduction: bool  # ends with a reduction axis


def build_pair_func(spec: PairSpec, dtype: str, fast_exp: bool = True):
    """The TE of a pair kernel as a PrimFunc, its stages in creation order, and the names of
    the blocks to leave unvectorised (see `PairBuilder.compute`)."""
    b = PairBuilder(spec, dtype, fast_exp and dtype == "float32")
    args = b.build()
    func = te.create_prim_func(args)
    stages = [Stage(t.op.name, len(t.shape) == 4, bool(getattr(t.op, "reduce_axis", ())))
              for t in b.stages]
    return func, stages, b.scalar_only


__all__ = ["PairSpec", "build_pair_func"]
