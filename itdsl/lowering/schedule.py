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
MATRIX_ROWS = 2  # rows of a matrix accumulator updated together


def schedule_cpu(func, spec, stages, scalar_only=frozenset()):
    """`scalar_only`: blocks that call a function TVM cannot vectorise (left scalar)."""
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
    # stay in registers) from one load of the column's values; matrices: the accumulator
    # of one row and MATRIX_ROWS matrix rows stays put while the columns stream past
    if r is not None:
        ro, ri = sch.split(r, [None, MATRIX_ROWS]) if spec.out_shape[0] % MATRIX_ROWS == 0 \
            else (r, None)
        sch.reorder(b, io, jo, ii, ro, ji, *([ri] if ri is not None else []), c)
        if ri is not None:
            sch.unroll(ri)
    else:  # the rows of a tile share each column's loads: a register tile of TI rows
        sch.reorder(b, io, jo, ji, ii, c)
        sch.unroll(ii)
    acc = sch.cache_write(O, 0, "local")
    sch.reverse_compute_at(acc, io)
    width = spec.lanes if spec.lanes > 1 else spec.out_shape[-1]
    if width > 1 and main not in scalar_only:
        if width > 64:
            _, c = sch.split(c, [None, 16])
        sch.vectorize(c)
    for stage in reversed(stages):
        sch.compute_at(sch.get_sblock(stage.name), jo)
    for stage in stages:
        # loops: b, io, jo, then the stage's own: row, column[, channel][, reduction]
        blk = sch.get_sblock(stage.name)
        own = _loops(sch, blk)[3:]
        if stage.channel:  # vectorise over the channels (contiguous), the reduction outside
            if stage.reduction:
                # a matrix product per pair: PAIR_BLOCK pairs share each row of the matrix
                # loaded into registers (the inner loop is a small GEMM micro-kernel)
                row, col, ch, red = own
                co, ci = sch.split(col, [None, PAIR_BLOCK])
                sch.reorder(row, co, red, ci, ch)
                sch.unroll(ci)
                own = [row, co, red, ci, ch]
        else:  # a scalar per pair: vectorise over the columns (SoA inputs are contiguous)
            if stage.reduction:
                sch.reorder(own[0], own[2], own[1])
                own = [own[0], own[2], own[1]]
        if stage.name not in scalar_only:
            sch.vectorize(own[-1])
    fused = sch.fuse(b, io)
    sch.parallel(fused)
    sch.decompose_reduction(O, jo)
    if spec.lanes > 1:  # the sum of the lanes, per tile of rows
        sch.reverse_compute_at(sch.get_sblock("O"), fused)
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
