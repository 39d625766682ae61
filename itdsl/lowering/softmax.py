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
and passes the number of valid columns `mvalid`: padded columns are masked. Inputs must be
finite and the scores far from overflow (the runtime checks): the kernel does not
reproduce torch's NaN propagation.
"""

from __future__ import annotations

import math
import operator

import tvm
from tvm import tirx
from tvm.script import tirx as T

from .pair import EXP_LO, poly_exp

RB = 6  # rows of the micro-kernel (with two vectors of columns: 12 accumulators)
ROWS = 48  # rows per tile (a multiple of RB)


def tiles(dtype: str) -> tuple[int, int, int]:
    """(R rows per tile, KC columns per tile, CW columns per micro-kernel: two AVX2 vectors;
    on other CPUs LLVM splits or joins the vectors, the kernel is the same)."""
    lanes = 32 // (4 if dtype == "float32" else 8)  # one AVX2 vector
    return ROWS, 256, 2 * lanes


def build_online_softmax(width: int, vwidth: int, dtype: str, causal: str | None,
                         split: bool = False):
    """The IRModule of the kernel for factors of `width` columns, values of `vwidth` columns
    (a multiple of the micro-kernel's CW) and the mask (None, "<=": j <= i, "<": j < i).
    With `split` (no mask), the score is A·B for j <= i and A2·B2 for j > i (a position term
    that separates on each side of the diagonal, as |i − j| does); else A2, B2 are not read
    (pass A and B again)."""
    R, KC, CW = tiles(dtype)
    if vwidth % CW or causal not in (None, "<=", "<") or (split and causal):
        raise ValueError(f"value width {vwidth} (a multiple of {CW}), causal {causal!r}")
    D, DV, dt = width, vwidth, dtype
    shift = 1 if causal == "<" else 0
    neg, zero, lo = (tirx.const(v, dt) for v in (-math.inf, 0.0, EXP_LO))

    def exp(x):  # x <= 0 or -inf; exp(-inf) = 0 exactly, so a masked entry adds nothing
        if dt != "float32":
            return tirx.exp(x)
        v = tirx.Var("xe", dt)  # clamped to EXP_LO, where the polynomial gives 0
        return tirx.Let(v, tirx.max(x, lo), poly_exp(v, dt))

    def kept(row, col, mvalid):  # a column is in the sum: valid, and on the causal side
        if causal is None:
            return col < mvalid
        return tirx.all(col < mvalid, col + shift <= row)

    def lanes(buf, op):  # op over the CW entries of a buffer, as a balanced tree
        xs = [buf[j] for j in range(CW)]
        while len(xs) > 1:
            xs = [op(xs[k], xs[k + 1]) for k in range(0, len(xs), 2)]
        return xs[0]

    def pick(side, row, col, mvalid, value, old):
        # the block's new entry: `value` where the column is kept and on the side, -inf
        # where masked; a split's second side keeps the first side's entries
        if side == 0:
            return tirx.Select(kept(row, col, mvalid), value, neg)
        if side == 1:
            return tirx.Select(tirx.all(col < mvalid, col <= row), value, neg)
        return tirx.Select(col <= row, old, tirx.Select(col < mvalid, value, neg))

    def col_tiles(r0, mvalid):  # the column tiles a row tile reads
        every = (mvalid + KC - 1) // KC
        if causal is None:
            return every
        return tirx.max(tirx.const(0, "int32"), tirx.min(every, (r0 + R - 1 - shift + KC) // KC))

    @T.macro
    def scores(S, Af, Bf, b, r0, c0, rb, cb, mvalid, side):
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
                    S[rb * RB + i, cb * CW + j])

    @T.prim_func
    def online_softmax(a: T.handle, bt: T.handle, a2: T.handle, bt2: T.handle, v: T.handle,
                       mo: T.handle, lo_: T.handle, acco: T.handle, mvalid: T.int32):
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        N = T.int32()
        n = T.int32()
        mp = T.int32()  # panels of CW columns
        A = T.match_buffer(a, (N, n, D), dt)
        Bt = T.match_buffer(bt, (N, mp, D, CW), dt)
        A2 = T.match_buffer(a2, (N, n, D), dt)
        Bt2 = T.match_buffer(bt2, (N, mp, D, CW), dt)
        V = T.match_buffer(v, (N, DV // CW, mp * CW, CW), dt)
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
                for j in T.vectorized(DV):
                    acc[r, j] = zero
            for ct in range(col_tiles(r0, mvalid)):
                # the score tile S = A[rows] · B[cols]ᵀ, masked entries -inf
                for cb in range(KC // CW):
                    for rb in range(R // RB):
                        if not split:
                            scores(S, A, Bt, b, r0, ct * KC, rb, cb, mvalid, 0)
                        else:
                            # a block wholly on one side of the diagonal from that side's
                            # factors; one across it from both
                            if ct * KC + cb * CW + CW - 1 <= r0 + rb * RB:
                                scores(S, A, Bt, b, r0, ct * KC, rb, cb, mvalid, 0)
                            elif ct * KC + cb * CW > r0 + rb * RB + RB - 1:
                                scores(S, A2, Bt2, b, r0, ct * KC, rb, cb, mvalid, 0)
                            else:
                                scores(S, A, Bt, b, r0, ct * KC, rb, cb, mvalid, 1)
                                scores(S, A2, Bt2, b, r0, ct * KC, rb, cb, mvalid, 2)
                # per row: the new max, the old terms' factor, the exponentials and their sum
                for r in range(R):
                    pm = T.decl_buffer((CW,), dt)
                    for j in T.vectorized(CW):
                        pm[j] = neg
                    for c in range(KC // CW):
                        for j in T.vectorized(CW):
                            pm[j] = T.max(pm[j], S[r, c * CW + j])
                    mt = lanes(pm, tirx.max)
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

    return tvm.IRModule({"main": online_softmax})
