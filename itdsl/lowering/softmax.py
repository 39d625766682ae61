"""The fused online softmax on the CPU: one TVM kernel for an attention's max step and sums.

For scores s(i, j) = Σ_c A[b, i, c]·B[b, j, c] (the GEMM part of an attention's score, its
scale folded into the factors) under an optional causal mask (j <= i, or j < i), the kernel
computes per row i

    M[b, i]      = max_j s(i, j)                    (the masked row max; -inf if none is kept)
    L[b, i]      = Σ_j exp(s(i, j) − M[b, i])
    ACC[b, i, :] = Σ_j exp(s(i, j) − M[b, i]) · V[b, j, :]

in one pass over the columns (flash attention's forward): per tile of R rows (the tiles in
parallel) and per tile of KC columns, the score tile by a register-blocked micro-kernel (6
rows × two vectors of columns: 12 accumulators, a small buffer of the default scope, which
LLVM keeps in registers; TVM's "local" scope would be a heap workspace on the CPU), the
running max, the exponentials by the vectorised polynomial and their row sums, and the
rescaled accumulator plus P·V by the same micro-kernel; nothing n×m is stored. A row with
every column masked has M = -inf, L = 0 and ACC = 0.

The caller packs B as `[N, m/CW, D, CW]` and V as `[N, DV/CW, m, CW]`, panels of CW columns
each contiguous, as a GEMM library packs its operands (a panel read across rows of the
plain layout, 16 KB apart, meets itself in a few sets of the L1 cache: up to 1.5× slower at
n = 4,096), pads every array to whole tiles (rows to R, columns to KC, V's width to CW)
and passes the number of valid columns `mvalid` (padded columns are masked) and `band`: row i
reads only the column tiles that hold a column j with |i − j| <= band (a window mask's
half-width; the others are masked, and skipped; a large number where there is none). Inputs
must be finite and the scores far from overflow (the runtime checks): the kernel does not
reproduce torch's NaN propagation.

A score may have an elementwise part besides the GEMM (`PairPart`): a position term added
to it and a mask (a column is kept where the mask is not 0), both expressions of per-point
values (of the row's point, of the column's: coordinates, params, per-point steps) that the
runtime computes and passes as XL `[N, n, kx]` and YL `[N, ky, m]`; the kernel evaluates the
expression per pair in the score tile's epilogue, with the same TVM forms of the functions
as the pair kernels (`pair.ElementMath`). Its values are not checked beforehand: the kernel
flags each row with a kept score that is NaN or beyond a limit in magnitude (+inf
included: BAD), and the runtime leaves such a call to the tiles.
"""

from __future__ import annotations

import math
import operator

from ..symbolic import pexpr as P
from ..symbolic.pexpr import Node

RB = 6  # rows of the micro-kernel (with two vectors of columns: 12 accumulators)
ROWS = 48  # rows per tile (a multiple of RB)


def tiles(dtype: str) -> tuple[int, int, int]:
    """(R rows per tile, KC columns per tile, CW columns per micro-kernel: two AVX2 vectors;
    on other CPUs LLVM splits or joins the vectors, the kernel is the same)."""
    lanes = 32 // (4 if dtype == "float32" else 8)  # one AVX2 vector
    return ROWS, 256, 2 * lanes


class PairPart:
    """The elementwise part of a score: `rest` (added to the GEMM) and `mask` (kept where
    not 0), expressions whose leaves are the per-point values `x_leaves` (of the row's point,
    or of neither side) and `y_leaves` (of the column's); with `live`, one more column value
    after them, 0 at the columns out of the sums."""

    def __init__(self, rest: Node | None, mask: Node | None, x_leaves: tuple[Node, ...],
                 y_leaves: tuple[Node, ...], live: bool):
        self.rest, self.mask, self.live = rest, mask, live
        self.x_leaves, self.y_leaves = x_leaves, y_leaves

    @staticmethod
    def of(rest: Node | None, mask: Node | None, x_side: str, y_side: str,
           live: bool) -> PairPart | None:
        """The part, its leaves the largest subexpressions of one side's points; None where
        a value of both sides is not a scalar elementwise function of them."""
        xs: list[Node] = []
        ys: list[Node] = []
        done: set[Node] = set()

        def visit(n: Node) -> bool:
            if n in done or n.op == "const":
                return True
            done.add(n)
            if n.deps <= {x_side} or n.deps <= {y_side}:
                if n.shape != ():
                    return False
                (xs if n.deps <= {x_side} else ys).append(n)
                return True
            return (n.op in P.ELEMENTWISE and n.shape == ()
                    and all(visit(a) for a in n.args))
        if not all(visit(e) for e in (rest, mask) if e is not None):
            return None
        return PairPart(rest, mask, tuple(xs), tuple(ys), live)

    def roots(self) -> list[Node]:
        return [e for e in (self.rest, self.mask) if e is not None] + [*self.x_leaves,
                                                                       *self.y_leaves]


def build_online_softmax(width: int, vwidth: int, dtype: str, causal: str | None,
                         split: bool = False, pair: PairPart | None = None,
                         limit: float = math.inf):
    """The IRModule of the kernel for factors of `width` columns, values of `vwidth` columns
    (a multiple of the micro-kernel's CW) and the mask (None, "<=": j <= i, "<": j < i).
    With `split` (no mask), the score is A·B for j <= i and A2·B2 for j > i (a position term
    that separates on each side of the diagonal, as |i − j| does); else A2, B2 are not read
    (pass A and B again). With `pair`, the score's elementwise part (`PairPart`): the
    kernel takes XL, YL and BAD after V (else pass one-element arrays), and flags a row
    with a kept score that is NaN or larger in magnitude than `limit`."""
    import tvm
    from tvm import tirx
    from tvm.script import tirx as T

    from .pair import EXP_LO, ElementMath, poly_exp
    R, KC, CW = tiles(dtype)
    if (vwidth % CW or causal not in (None, "<=", "<") or (split and causal)
            or (split and pair is not None)):
        raise ValueError(f"value width {vwidth} (a multiple of {CW}), causal {causal!r}")
    D, DV, dt = width, vwidth, dtype
    shift = 1 if causal == "<" else 0
    neg, zero, lo = (tirx.const(v, dt) for v in (-math.inf, 0.0, EXP_LO))
    inf, one = tirx.const(math.inf, dt), tirx.const(1.0, dt)

    def exp(x):  # x <= 0 or -inf; exp(-inf) = 0 exactly, so a masked entry adds nothing
        if dt != "float32":
            return tirx.exp(x)
        v = tirx.Var("xe", dt)  # clamped to EXP_LO, where the polynomial gives 0
        return tirx.Let(v, tirx.max(x, lo), poly_exp(v, dt))

    big = tirx.const(min(limit, 3.0e38), dt)

    def bad_score(x):  # NaN, or finite (or +inf) and beyond the limit; -inf is masked
        return tirx.Or(em.isnan(x), tirx.And(x != neg, tirx.Or(x > big, x < -big)))

    def kept(row, col, mvalid):  # a column is in the sum: valid, and on the causal side
        if causal is None:
            return col < mvalid
        return tirx.all(col < mvalid, col + shift <= row)

    def lanes(buf, op):  # op over the CW entries of a buffer, as a balanced tree
        xs = [buf[j] for j in range(CW)]
        while len(xs) > 1:
            xs = [op(xs[k], xs[k + 1]) for k in range(0, len(xs), 2)]
        return xs[0]

    em = ElementMath(dt, dt == "float32")
    kx, ky = (1, 1) if pair is None else (max(1, len(pair.x_leaves)),
                                          max(1, len(pair.y_leaves) + pair.live))

    def element(e, XL, YL, b, row, col):  # a pair expression at (row, col)
        def val(n):  # (a node read twice is built twice: each let-bound variable once)
            if n.op == "const":
                return em.c(n.value)
            if n in pair.x_leaves:
                return XL[b, row, pair.x_leaves.index(n)]
            if n in pair.y_leaves:
                return YL[b, pair.y_leaves.index(n), col]
            return em.ew(n.op, [val(a) for a in n.args])
        return val(e)

    def pick(side, row, col, mvalid, value, old, XL=None, YL=None, b=None):
        # the block's new entry: `value` (plus the position term) where the column is kept
        # and on the side, -inf where masked; a split's second side keeps the first side's
        if pair is not None:
            if pair.rest is not None:
                value = value + element(pair.rest, XL, YL, b, row, col)
            keep = kept(row, col, mvalid)
            if pair.mask is not None:
                keep = tirx.all(keep, element(pair.mask, XL, YL, b, row, col) != zero)
            if pair.live:
                keep = tirx.all(keep, YL[b, len(pair.y_leaves), col] != zero)
            return tirx.Select(keep, value, neg)
        if side == 0:
            return tirx.Select(kept(row, col, mvalid), value, neg)
        if side == 1:
            return tirx.Select(tirx.all(col < mvalid, col <= row), value, neg)
        return tirx.Select(col <= row, old, tirx.Select(col < mvalid, value, neg))

    def col_tiles(r0, mvalid, band):  # (first, end) of the column tiles a row tile reads:
        # those holding a column within `band` of one of its rows, and of the causal side
        zero_i = tirx.const(0, "int32")
        first = tirx.max(zero_i, tirx.floordiv(r0 - band, KC))
        end = tirx.min((mvalid + KC - 1) // KC, tirx.floordiv(r0 + R - 1 + band, KC) + 1)
        if causal is not None:
            end = tirx.min(end, tirx.floordiv(r0 + R - 1 - shift + KC, KC))
        return first, tirx.max(first, end)

    @T.macro
    def scores(S, Af, Bf, b, r0, c0, rb, cb, mvalid, side, XL, YL):
        # one micro-block of the score tile: S[rb·RB + i, cb·CW + j] = A[row]·B[col] where
        # `side` (0: every kept column, 1: col <= row, 2: col > row), else as it was
        cc = T.decl_buffer((RB, CW), dt)
        for i in T.unroll(RB):
            for j in T.vectorized(CW):
                cc[i, j] = zero
        for k in range(D):
            for i in T.unroll(RB):
                for j in T.vectorized(CW):
                    cc[i, j] = cc[i, j] + Af[b, r0 + rb * RB + i, k] * Bf[b, c0 // CW + cb, k, j]
        for i in T.unroll(RB):
            for j in T.vectorized(CW):
                S[rb * RB + i, cb * CW + j] = pick(
                    side, r0 + rb * RB + i, c0 + cb * CW + j, mvalid, cc[i, j],
                    S[rb * RB + i, cb * CW + j], XL, YL, b)

    @T.prim_func
    def online_softmax(a: T.handle, bt: T.handle, a2: T.handle, bt2: T.handle, v: T.handle,
                       xl: T.handle, yl: T.handle, bad: T.handle, mo: T.handle, lo_: T.handle,
                       acco: T.handle, mvalid: T.int32, band: T.int32):
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        N = T.int32()
        n = T.int32()
        mp = T.int32()  # panels of CW columns
        A = T.match_buffer(a, (N, n, D), dt)
        Bt = T.match_buffer(bt, (N, mp, D, CW), dt)
        A2 = T.match_buffer(a2, (N, n, D), dt)
        Bt2 = T.match_buffer(bt2, (N, mp, D, CW), dt)
        V = T.match_buffer(v, (N, DV // CW, mp * CW, CW), dt)
        XL = T.match_buffer(xl, (N, n, kx) if pair is not None else (1, 1, 1), dt)
        YL = T.match_buffer(yl, (N, ky, mp * CW) if pair is not None else (1, 1, 1), dt)
        BAD = T.match_buffer(bad, (N, n) if pair is not None else (1, 1), dt)
        M = T.match_buffer(mo, (N, n), dt)
        L = T.match_buffer(lo_, (N, n), dt)
        ACC = T.match_buffer(acco, (N, n, DV), dt)
        for brt in T.parallel(N * (n // R)):
            b = brt // (n // R)
            r0 = brt % (n // R) * R
            S = T.decl_buffer((R, KC), dt)
            acc = T.decl_buffer((R, DV), dt)
            mr = T.decl_buffer((R,), dt)
            lr = T.decl_buffer((R,), dt)
            al = T.decl_buffer((R,), dt)
            for r in range(R):
                mr[r] = neg
                lr[r] = zero
                if pair is not None:
                    BAD[b, r0 + r] = zero
                for j in T.vectorized(DV):
                    acc[r, j] = zero
            for ct in range(col_tiles(r0, mvalid, band)[0], col_tiles(r0, mvalid, band)[1]):
                # the score tile S = A[rows] · B[cols]ᵀ, masked entries -inf
                for cb in range(KC // CW):
                    for rb in range(R // RB):
                        if not split:
                            scores(S, A, Bt, b, r0, ct * KC, rb, cb, mvalid, 0, XL, YL)
                        else:
                            # a block wholly on one side of the diagonal from that side's
                            # factors; one across it from both
                            if ct * KC + cb * CW + CW - 1 <= r0 + rb * RB:
                                scores(S, A, Bt, b, r0, ct * KC, rb, cb, mvalid, 0, XL, YL)
                            elif ct * KC + cb * CW > r0 + rb * RB + RB - 1:
                                scores(S, A2, Bt2, b, r0, ct * KC, rb, cb, mvalid, 0, XL, YL)
                            else:
                                scores(S, A, Bt, b, r0, ct * KC, rb, cb, mvalid, 1, XL, YL)
                                scores(S, A2, Bt2, b, r0, ct * KC, rb, cb, mvalid, 2, XL, YL)
                # per row: the new max, the old terms' factor, the exponentials and their sum
                for r in range(R):
                    pm = T.decl_buffer((CW,), dt)
                    for j in T.vectorized(CW):
                        pm[j] = neg
                    for c in range(KC // CW):
                        for j in T.vectorized(CW):
                            pm[j] = T.max(pm[j], S[r, c * CW + j])
                    if pair is not None:  # a kept score NaN or +inf: the row is flagged
                        for c in range(KC // CW):
                            for j in T.vectorized(CW):
                                pm[j] = T.Select(bad_score(S[r, c * CW + j]), inf, pm[j])
                    mt = lanes(pm, tirx.max)
                    if pair is not None:
                        if mt == inf:
                            BAD[b, r0 + r] = one
                    mnew = T.max(mr[r], mt)
                    ms = T.if_then_else(mnew == neg, zero, mnew)  # all masked so far
                    al[r] = exp(mr[r] - ms)
                    for j in T.vectorized(CW):
                        pm[j] = zero
                    for c in range(KC // CW):
                        for j in T.vectorized(CW):
                            S[r, c * CW + j] = exp(S[r, c * CW + j] - ms)
                            pm[j] = pm[j] + S[r, c * CW + j]
                    st = lanes(pm, operator.add)
                    lr[r] = lr[r] * al[r] + st
                    mr[r] = mnew
                # acc = acc · factor + P · V[cols]
                for db in range(DV // CW):
                    for rb in range(R // RB):
                        cc = T.decl_buffer((RB, CW), dt)
                        for i in T.unroll(RB):
                            for j in T.vectorized(CW):
                                cc[i, j] = acc[rb * RB + i, db * CW + j] * al[rb * RB + i]
                        for k in range(KC):
                            for i in T.unroll(RB):
                                for j in T.vectorized(CW):
                                    cc[i, j] = cc[i, j] + S[rb * RB + i, k] * V[
                                        b, db, ct * KC + k, j]
                        for i in T.unroll(RB):
                            for j in T.vectorized(CW):
                                acc[rb * RB + i, db * CW + j] = cc[i, j]
            for r in range(R):
                M[b, r0 + r] = mr[r]
                L[b, r0 + r] = lr[r]
                for j in T.vectorized(DV):
                    ACC[b, r0 + r, j] = acc[r, j]

    if em._scalar_call:  # (a function TVM cannot vectorise: libm's erf in float64)
        from ..errors import LoweringError
        raise LoweringError("the score's elementwise part calls a function that does not "
                            "vectorise")
    return tvm.IRModule({"main": online_softmax})
