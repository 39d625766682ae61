"""Schedules for pair kernels: tiles of rows in parallel on the CPU, blocks of rows on GPUs.

CPU: rows are split into tiles of TI and columns into tiles of TJ; the channel
stages of a tile of columns are computed just before they are used (so they are
TI x TJ buffers, never N x M); the accumulator of a row tile stays in a small local
buffer across the column tiles; tiles of rows run in parallel; stages vectorise over
the columns, the reduction over the output channels.

GPU: one thread per row (TI rows per block... TX threads per block), columns swept in
tiles whose stages live in registers; see `schedule_cuda`.
"""

from __future__ import annotations

import tvm
from tvm import s_tir


def _loops(sch, block):
    return sch.get_loops(block)


PAIR_BLOCK = 4  # pairs sharing the loads of a matrix row in a per-pair matrix product
# a per-pair matrix product's output channels are accumulated in blocks of this many, so
# that PAIR_BLOCK x CHANNEL_BLOCK accumulators stay in registers (4 x 16 floats: 8 AVX2
# registers, with the matrix row and the broadcast pair values beside them)
CHANNEL_BLOCK = 16
MATRIX_ROWS = 4  # rows of a matrix accumulator updated together


def schedule_cpu(func, spec, stages, scalar_only=frozenset()):
    """`scalar_only`: blocks that call a function TVM cannot vectorise (left scalar)."""
    if spec.fused:
        return _schedule_fused_cpu(func, spec, stages, scalar_only)
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    main = "P" if spec.lanes > 1 else "O"  # the block that sweeps the columns
    O = sch.get_sblock(main)
    if spec.matrix:
        b, i, r, c, j = _loops(sch, O)
    else:
        b, i, c, j = _loops(sch, O)
        r = None
    io, ii = sch.split(i, [None, spec.tile_rows])
    jo, ji = sch.split(j, [None, spec.tile_cols // spec.lanes])
    # vectors: for each column, the TI rows of the tile update their accumulators (which
    # stay in registers) from one load of the column's values; matrices: a block of
    # MATRIX_ROWS x CHANNEL_BLOCK of one row's matrix stays put while the columns stream past
    if r is not None:
        ro, ri = sch.split(r, [None, MATRIX_ROWS]) if spec.out_shape[0] % MATRIX_ROWS == 0 \
            else (r, None)
        co, c = _split_channels(sch, c, spec.out_shape[1])
        sch.reorder(b, io, jo, ii, ro, *([co] if co is not None else []), ji,
                    *([ri] if ri is not None else []), c)
        if ri is not None:
            sch.unroll(ri)
    else:  # the rows of a tile share each column's loads: a register tile of TI rows
        sch.reorder(b, io, jo, ji, ii, c)
        sch.unroll(ii)
    acc = sch.cache_write(O, 0, "local")
    sch.reverse_compute_at(acc, io)
    width = spec.lanes if spec.lanes > 1 else spec.out_shape[-1]
    if width > 1 and main not in scalar_only:
        _vectorize_channels(sch, c, width)
    for stage in reversed(stages):
        sch.compute_at(sch.get_sblock(stage.name), jo)
    later = _schedule_stages(sch, stages, scalar_only, 3)
    fused = sch.fuse(b, io)
    sch.parallel(fused)
    _decompose_stages(sch, later)
    sch.decompose_reduction(O, jo)
    if spec.lanes > 1:  # the sum of the lanes, per tile of rows
        sch.reverse_compute_at(sch.get_sblock("O"), fused)
    return sch


def _decompose_stages(sch, later) -> None:
    """The initialisation of each matrix-product stage's accumulators, split from its
    reduction (after `parallel`, which wants whole reduction blocks): zeroed in registers."""
    for blk, red, vec in later:
        init = sch.decompose_reduction(blk, red)
        if vec:
            i0, i1 = _loops(sch, init)[-2:]
            sch.unroll(i0)
            sch.vectorize(i1)


def _schedule_stages(sch, stages, scalar_only, outer: int) -> list:
    """The loops of the stages computed at a tile of columns: after the `outer` loops down
    to the column tile, the stage's own: row, column[, channel][, reduction]."""
    later = []
    for stage in stages:
        blk = sch.get_sblock(stage.name)
        own = _loops(sch, blk)[outer:]
        if stage.channel:  # vectorise over the channels (contiguous), the reduction outside
            if stage.reduction:
                # a matrix product per pair: PAIR_BLOCK pairs share each row of the matrix
                # loaded into registers, their accumulators (a block of channels of each)
                # stay in registers over the reduction: a small GEMM micro-kernel
                row, col, ch, red = own
                co, ci = sch.split(col, [None, PAIR_BLOCK])
                cho, ch = _split_channels(sch, ch, sch.get(ch).extent.value)
                sch.reorder(row, co, *([cho] if cho is not None else []), red, ci, ch)
                acc = sch.cache_write(blk, 0, "local")
                sch.reverse_compute_at(acc, cho if cho is not None else co)
                sch.unroll(ci)
                if stage.name not in scalar_only:
                    sch.vectorize(ch)
                    a0, a1 = _loops(sch, acc)[-2:]
                    sch.unroll(a0)
                    sch.vectorize(a1)
                later.append((blk, red, stage.name not in scalar_only))
                continue
        else:  # a scalar per pair: vectorise over the columns (SoA inputs are contiguous)
            if stage.reduction:
                sch.reorder(own[0], own[2], own[1])
                own = [own[0], own[2], own[1]]
        if stage.name not in scalar_only:
            sch.vectorize(own[-1])
    return later


def _split_channels(sch, loop, width: int):
    """(outer, inner) loops of `width` channels in blocks of CHANNEL_BLOCK (or half of it)
    where one divides the width; (None, loop) where none does."""
    for k in (CHANNEL_BLOCK, CHANNEL_BLOCK // 2):
        if width % k == 0 and width > k:
            return tuple(sch.split(loop, [None, k]))
    return None, loop


def _vectorize_channels(sch, loop, width: int) -> None:
    """Vectorise a loop over `width` output channels (in vectors of 16 beyond 64)."""
    if width > 64:
        _, loop = sch.split(loop, [None, 16])
    sch.vectorize(loop)


def _schedule_fused_cpu(func, spec, stages, scalar_only):
    """A fused kernel (`PairSpec.outputs`): every output's loops are put in the order
    (batch, part, tile of rows, tile of columns, ...) and these four loops merged, so that
    one sweep computes the stages of a (tile of rows, tile of columns) once, for every
    output. Per row, the accumulators of a tile of rows stay in local buffers (as in
    `schedule_cpu`); per column, the TI rows of the tile add their terms into the part's
    partial sums of the column, which the part alone writes: the parts run in parallel,
    each over its tiles in order. Outputs of `lanes` > 1 vectorise over the columns."""
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    TJ = spec.tile_cols
    sweeps = [(out.name, out.kind != "col") for out in spec.outputs]  # (block, per row)
    for out in spec.outputs:
        name = out.name
        loops = _loops(sch, sch.get_sblock(name))
        vector = None
        if out.kind == "col":
            b, p, *rest, kt, ki = loops
            if out.lanes > 1:  # [b, p, (c,) j]: consecutive columns in the lanes
                *ch, j = rest
                jo, jv, jl = sch.split(j, [None, TJ // out.lanes, out.lanes])
                sch.reorder(b, p, kt, jo, *ch, jv, ki, jl)
                vector = jl
            else:  # [b, p, j, c]
                j, *ch = rest
                jo, ji = sch.split(j, [None, TJ])
                sch.reorder(b, p, kt, jo, ji, ki, *ch)
                vector = ch[-1] if ch else None
            sch.unroll(ki)
        elif out.kind == "matrix":
            # a block of MATRIX_ROWS x CHANNEL_BLOCK of the matrix stays in registers while
            # the columns of the tile stream past
            b, p, t, ii, r, c, j = loops
            jo, ji = sch.split(j, [None, TJ])
            ro, ri = sch.split(r, [None, MATRIX_ROWS]) if out.step.shape[0] % MATRIX_ROWS == 0 \
                else (r, None)
            co, c = _split_channels(sch, c, out.step.shape[1])
            sch.reorder(b, p, t, jo, ii, ro, *([co] if co is not None else []), ji,
                        *([ri] if ri is not None else []), c)
            if ri is not None:
                sch.unroll(ri)
            vector = c
        elif out.lanes > 1:  # [b, p, t, ii, (c,) lane], reduced over k: column k·L + lane
            b, p, t, ii, *ch, lane, k = loops
            jo, ji = sch.split(k, [None, TJ // out.lanes])
            sch.reorder(b, p, t, jo, ji, ii, *ch, lane)
            sch.unroll(ii)
            for c in ch:
                sch.unroll(c)
            vector = lane
        else:  # [b, p, t, ii, c]
            b, p, t, ii, *ch, j = loops
            jo, ji = sch.split(j, [None, TJ])
            sch.reorder(b, p, t, jo, ji, ii, *ch)
            sch.unroll(ii)
            vector = ch[-1] if ch else None
        if vector is not None and name not in scalar_only:
            if out.lanes > 1:
                sch.vectorize(vector)
            elif out.width > 1:
                _vectorize_channels(sch, vector, out.step.shape[-1])
    for depth in range(4):  # one sweep: batch, part, tile of rows, tile of columns
        loops = [_loops(sch, sch.get_sblock(name))[depth] for name, _ in sweeps]
        if len(loops) > 1:
            sch.merge(*loops)
    for name, per_row in sweeps:
        if per_row:
            acc = sch.cache_write(sch.get_sblock(name), 0, "local")
            sch.reverse_compute_at(acc, _loops(sch, sch.get_sblock(name))[2])
    jo = _loops(sch, sch.get_sblock(sweeps[0][0]))[3]
    for stage in reversed(stages):
        sch.compute_at(sch.get_sblock(stage.name), jo)
    later = _schedule_stages(sch, stages, scalar_only, 4)
    sch.parallel(sch.fuse(*_loops(sch, sch.get_sblock(sweeps[0][0]))[:2]))
    _decompose_stages(sch, later)
    for name, per_row in sweeps:  # (after `parallel`, which wants whole reduction blocks)
        blk = sch.get_sblock(name)
        sch.decompose_reduction(blk, _loops(sch, blk)[2 if per_row else 1])
    return sch


def schedule_cuda(func, spec, stages):
    """One thread per row (tile_rows threads per block), columns swept in tiles of
    tile_cols whose column arrays are staged through shared memory by all threads of the
    block; stages of a (row, column) pair live in registers."""
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    O = sch.get_sblock("O")
    b, i, *channels, j = _loops(sch, O)  # one channel loop, or two for a matrix
    io, ii = sch.split(i, [None, spec.tile_rows])
    jo, ji = sch.split(j, [None, spec.tile_cols])
    sch.reorder(b, io, ii, jo, ji, *channels)
    bx = sch.fuse(b, io)
    sch.bind(bx, "blockIdx.x")
    sch.bind(ii, "threadIdx.x")
    acc = sch.cache_write(O, 0, "local")
    sch.reverse_compute_at(acc, ii)
    for stage in reversed(stages):
        blk = sch.get_sblock(stage.name)
        sch.compute_at(blk, ji)
        sch.set_scope(blk, 0, "local")
    # stage the column tile of every column array in shared memory
    readers = [sch.get_sblock(st.name) for st in stages] + [O]
    for k, leaf in enumerate(spec.leaves):
        if leaf.role != "col":
            continue
        name = f"col{k}"
        consumers = [blk for blk in readers
                     if any(r.source.name == name for r in sch.get(blk).reads)]
        if not consumers:
            continue
        sh = sch.cache_read(consumers[0], name, "shared", consumer_blocks=consumers)
        sch.compute_at(sh, jo)
        own = _loops(sch, sh)[3:]  # below (block, thread, column tile)
        fused = sch.fuse(*own) if len(own) > 1 else own[0]
        _, t = sch.split(fused, [None, spec.tile_rows])
        sch.bind(t, "threadIdx.x")
    sch.decompose_reduction(O, jo)
    return sch
