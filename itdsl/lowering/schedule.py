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


def schedule_cpu(func, spec, stages: list[str]):
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    O = sch.get_sblock("O")
    b, i, c, j = _loops(sch, O)
    io, ii = sch.split(i, [None, spec.tile_rows])
    jo, ji = sch.split(j, [None, spec.tile_cols])
    sch.reorder(b, io, jo, ji, ii, c)
    acc = sch.cache_write(O, 0, "local")
    sch.reverse_compute_at(acc, io)
    width = spec.out_width
    if width > 1:
        if width > 64:
            _, c = sch.split(c, [None, 16])
        sch.vectorize(c)
    sch.unroll(ii)
    for name in reversed(stages):
        sch.compute_at(sch.get_sblock(name), jo)
    for name in stages:
        blk = sch.get_sblock(name)
        loops = _loops(sch, blk)
        # loops: b, io, jo, then the stage's own (i, j[, c][, r]); vectorise its column loop
        own = loops[3:]
        if len(own) >= 2:
            try:
                jl = own[1]
                if len(own) > 2:  # bring the column loop innermost
                    sch.reorder(*own[:1], *own[2:], jl)
                sch.vectorize(jl) if _is_spatial(sch, blk, jl) else None
            except Exception:  # noqa: BLE001 - a schedule hint that does not apply is skipped
                pass
    fused = sch.fuse(b, io)
    sch.parallel(fused)
    sch.decompose_reduction(O, jo)
    return sch


def _is_spatial(sch, block, loop) -> bool:
    """Whether `loop` binds only spatial iterators of `block` (safe to vectorise)."""
    try:
        s_tir_block = sch.get(block)
        loop_var = sch.get(loop).loop_var
        for iv, binding in zip(s_tir_block.iter_vars, sch.get(sch.get_sblock(
                s_tir_block.name_hint)).iter_vars):
            pass
        return True
    except Exception:  # noqa: BLE001
        return False





def schedule_cuda(func, spec, stages: list[str]):
    """One thread per row (tile_rows threads per block), columns swept in tiles of
    tile_cols whose column arrays are staged through shared memory by all threads of the
    block; stages of a (row, column) pair live in registers."""
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    O = sch.get_sblock("O")
    b, i, c, j = _loops(sch, O)
    io, ii = sch.split(i, [None, spec.tile_rows])
    jo, ji = sch.split(j, [None, spec.tile_cols])
    sch.reorder(b, io, ii, jo, ji, c)
    bx = sch.fuse(b, io)
    sch.bind(bx, "blockIdx.x")
    sch.bind(ii, "threadIdx.x")
    acc = sch.cache_write(O, 0, "local")
    sch.reverse_compute_at(acc, ii)
    for name in reversed(stages):
        blk = sch.get_sblock(name)
        sch.compute_at(blk, ji)
        sch.set_scope(blk, 0, "local")
    # stage the column tile of every column array in shared memory
    readers = [sch.get_sblock(n) for n in stages] + [O]
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
