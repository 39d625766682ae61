"""Which kernels a Plan needs, and what their arguments are — without importing TVM.

The runtime reads these specs to lay out a kernel's arguments, whether the kernel was
just compiled or loaded from the cache. A kernel's array arguments (`PairSpec.leaves`, in
this order) are its row and column leaves, its params and per-call values, and one *table*
per input field the summand reads at computed points (`read` nodes): the field's whole
array for every batch entry, `[b, n_1, ..., n_k, C]` over its k axes (C = 1 for a scalar
field), whose axis sizes the kernel takes from the array's shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..functions import FUNCTIONS
from ..symbolic import pexpr as P
from ..symbolic.pexpr import Node, toposort
from ..symbolic.plan import Program, Step, StepKind

TILE_ROWS = 4  # CPU: rows per tile (the accumulator tile is TILE_ROWS x channels)
TILE_COLS = 64  # columns per tile: the stages of a tile are TILE_ROWS x TILE_COLS
CUDA_THREADS = 64  # GPU: rows per block, one per thread
INLINE_REDUCTION = 4  # dot products this short are written out inline, not staged
LANES = 8  # AVX2: float32 lanes of a vector
# Targets whose kernels fuse pair sums over the same two sides into one sweep, whichever
# side each sum is per point of (see `pair_groups`). CUDA kernels keep one orientation and
# one output per kernel: per-column sums there would need atomics or block reductions.
FUSED_TARGETS = frozenset({"cpu"})
# A fused kernel's per-column sums are accumulated in one partial buffer per part of the
# rows (`row_parts`): at least this many parts, so that the parts balance over the threads
PARTS = 16
# How deeply each elementwise function nests let-bound values around its argument in a
# pair kernel (its entry's `let_depth` in `itdsl.functions`: a clamp, the fast exp's n and
# r, a series). TVM's code generator simplifies every let value with the earlier ones
# substituted, so the time to compile grows exponentially with nesting: exp(exp(x)) took
# 80 s, softplus of an exp longer than 15 min. A value whose nesting would pass LET_NESTING
# is computed in a stage of its own (a load, which the simplifier does not look through).
LET_DEPTH = {name: f.let_depth for name, f in FUNCTIONS.items() if f.let_depth}
LET_NESTING = 3
# functions a kernel may compute from their formula (see `_expanded`)
EXPANDED = frozenset(name for name, f in FUNCTIONS.items() if f.opaque and f.opaque.expand)


def _flat(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


@dataclass
class LeafSpec:
    """One array argument of a pair kernel and the plan leaf it holds.

    Rows are laid out [b, i, w]. Columns are [b, w, j] (`soa`) for the code that
    vectorises over the columns (scalar stages), so that it reads consecutive j, and [b, j,
    w] for the code that vectorises over the channels w (vector stages, the accumulation);
    on the CPU a column read both ways comes in both layouts, one leaf each (a GPU block
    stages its columns in shared memory once)."""

    role: str  # "row" | "col" | "param" | "const" | "table"
    node: Node  # (a table: the first read of its field; `node.name` is the field)
    width: int  # channels (rows/cols/tables); for params/consts the flat size
    shape: tuple[int, ...]  # params/consts: the array shape; a table: (its axes,)
    soa: bool = False  # columns only: [b, w, j] instead of [b, j, w] (see `spec_of`)
    transposed: bool = False  # matrix params: passed as W.T (a product W a vectorises over
    #                           W's rows, which are then contiguous); a param used both as W
    #                           and as W.T has one leaf of each


@dataclass(frozen=True)
class Output:
    """One output of a fused kernel, the sums of one step. Per row ("row", "matrix") they
    come as [B, parts, tiles, TI, *shape], or [B, parts, tiles, TI, *shape, lanes] where
    `lanes` > 1; per column ("col") as partial sums per part of the rows, [B, parts,
    columns, *shape] (see `row_parts`), or [B, parts, *shape, columns] where `lanes` > 1.
    `lanes` > 1 (fewer than LANES channels: a scalar, a 3-D coordinate gradient) vectorises
    over the columns instead of the channels: a row's sums are kept in `lanes` interleaved
    partial sums (column k·lanes + l in lane l), which the caller adds up; a column's sums
    are stored with consecutive columns contiguous."""

    name: str
    step: Step
    kind: str  # "row" | "matrix" | "col"
    width: int
    lanes: int

    def shape(self, batch: int, parts: int, tiles: int, rows: int, cols: int) -> tuple:
        """The array's shape for `parts` x `tiles` tiles of `rows` rows and `cols` columns."""
        ch = tuple(self.step.shape)
        if self.kind != "col":
            return (batch, parts, tiles, rows, *ch, *((self.lanes,) if self.lanes > 1 else ()))
        return (batch, parts, *ch, cols) if self.lanes > 1 else (batch, parts, cols, *ch)


@dataclass
class PairSpec:
    """A pair kernel: O[b, i, c] = reduce over j of the steps' summands, channels concatenated.

    A *fused* kernel (`fused`, the CPU's) computes several steps in one sweep over the
    pairs, whichever side each is per point of, one output each (`outputs`)."""

    kind: str  # "sum" | "max"
    row_side: str
    col_side: str
    steps: list[Step]
    widths: list[int]  # channels of each step in the output
    leaves: list[LeafSpec] = field(default_factory=list)
    tile_rows: int = TILE_ROWS
    tile_cols: int = TILE_COLS
    staged: list[Node] = field(default_factory=list)  # see `staged_nodes`
    lanes: int = 1  # CPU, one output channel: columns reduced in this many vector lanes

    @property
    def out_width(self) -> int:
        return sum(self.widths)

    @property
    def col_steps(self) -> list[Step]:
        """The steps summed per column (per point of the column side)."""
        return [st for st in self.steps if st.side == self.col_side]

    @property
    def outputs(self) -> list[Output]:
        """A fused kernel's outputs, one per step, in argument order (see `Output`)."""
        out = []
        for k, st in enumerate(self.steps):
            w = _flat(st.shape)
            kind = ("col" if st.side == self.col_side else
                    "matrix" if len(st.shape) == 2 else "row")
            out.append(Output(f"{kind[0].upper()}{k}", st, kind, w,
                              LANES if kind != "matrix" and w < LANES else 1))
        return out

    @property
    def fused(self) -> bool:
        """Sums per column, or several steps one of which is a matrix (see `Output`)."""
        return bool(self.col_steps) or (len(self.steps) > 1
                                        and any(len(st.shape) == 2 for st in self.steps))

    @property
    def matrix(self) -> bool:
        """A kernel of one step whose result per row is a matrix (a param gradient)."""
        return len(self.steps) == 1 and len(self.steps[0].shape) == 2

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The channel shape of the output array (after batch and rows)."""
        return tuple(self.steps[0].shape) if self.matrix else (self.out_width,)


@dataclass
class Group:
    """Pair steps computed by one kernel, run at the position of the first."""

    kind: str
    side: str
    over: str
    steps: list[Step]
    shifts: frozenset[str] = frozenset()  # the Plan's max steps (softmax shifts), by name


def _refs(st: Step) -> set[str]:
    roots = [st.expr] + ([st.mask] if st.mask is not None else [])
    return {n.name for n in toposort(roots) if n.op in ("ref", "cot")}


def shift_names(plan) -> frozenset[str]:
    """The names of a Plan's max steps: the shifts its softmax sums subtract."""
    return frozenset(st.name for st in plan.forward.steps if st.kind is StepKind.MAX)


def pair_groups(prog: Program, shifts: frozenset[str] = frozenset(),
                target: str = "cpu") -> list[Group]:
    """Group pair steps into kernels; every input of a step must be ready where its group
    runs (at its first step). `shifts`: the Plan's max steps (see `shift_names`).

    On the targets of FUSED_TARGETS, every sum over the same two sides joins one kernel
    where its inputs allow, whichever side it is per point of: a backward's sums per x and
    per y of the same pair values (the terms of a Gaussian, an MLP's hidden layers) are
    computed once per pair, in one sweep. Elsewhere, consecutive steps of one kind and the
    same sides share a kernel, and a matrix result (a param gradient) gets its own."""
    if target in FUSED_TARGETS:
        return _fused_groups(prog, shifts)
    groups: list[Group] = []
    open_group: Group | None = None
    produced_since: set[str] = set()
    for st in prog.steps:
        if st.kind in (StepKind.SUM, StepKind.MAX):
            # a matrix result (a param gradient) gets a kernel of its own: its accumulator
            # is laid out [row, r, c], not in the concatenated channels of vectors
            matrix = len(st.shape) == 2 or (open_group is not None
                                            and len(open_group.steps[0].shape) == 2)
            if (open_group is not None and not matrix and (st.kind, st.side, st.over) ==
                    (open_group.kind, open_group.side, open_group.over)
                    and not (_refs(st) & produced_since)):
                open_group.steps.append(st)
                produced_since.add(st.name)
                continue
            open_group = Group(st.kind, st.side, st.over, [st], shifts)
            groups.append(open_group)
            produced_since = {st.name}
        else:
            produced_since.add(st.name)
    return groups


def _fused_groups(prog: Program, shifts: frozenset[str]) -> list[Group]:
    """Each pair step joins the first open kernel of its kind over its two sides that it
    can (none of its inputs produced since that kernel's first step; a matrix only per
    row, a max only of its own orientation), else opens one. A sum kernel's rows are the
    side of its matrices, else the side whose sums have the most channels (fewest partial
    sums per column)."""
    rows = _row_sides(prog)
    groups: list[Group] = []
    since: list[set[str]] = []  # per group: the steps produced since it opened
    for st in prog.steps:
        if st.kind in (StepKind.SUM, StepKind.MAX):
            matrix = len(st.shape) == 2
            for g, produced in zip(groups, since):
                if (g.kind == st.kind and {g.side, g.over} == {st.side, st.over}
                        and (st.kind is StepKind.SUM or g.side == st.side)
                        and not (matrix and g.side != st.side)
                        and not (_refs(st) & produced)):
                    g.steps.append(st)
                    break
            else:
                side = st.side
                if st.kind is StepKind.SUM and not matrix:
                    side = rows[frozenset((st.side, st.over))]
                over = st.over if side == st.side else st.side
                groups.append(Group(st.kind, side, over, [st], shifts))
                since.append(set())
        for produced in since:
            produced.add(st.name)
    return groups


def _row_sides(prog: Program) -> dict[frozenset, str]:
    """For each pair of sides summed over: the side a fused kernel's rows range over."""
    width: dict[frozenset, dict[str, int]] = {}
    first: dict[frozenset, str] = {}
    for st in prog.steps:
        if st.kind is not StepKind.SUM:
            continue
        key = frozenset((st.side, st.over))
        first.setdefault(key, st.side)
        w = width.setdefault(key, {})
        # a matrix can only be a per-row result: its side wins
        w[st.side] = w.get(st.side, 0) + (10**9 if len(st.shape) == 2 else _flat(st.shape))
    return {key: max(w, key=lambda s: (w[s], s == first[key])) for key, w in width.items()}


def spec_of(group: Group, target: str = "cpu") -> PairSpec:
    """The kernel of a group: tiles of rows (threads of a block on a GPU) by columns, and
    its array arguments in a fixed order."""
    group, expanded = _expanded(group)
    widths = [_flat(s.shape) for s in group.steps]
    cols = TILE_COLS if max(widths) <= 256 else 16
    rows = TILE_ROWS if target == "cpu" else CUDA_THREADS
    spec = PairSpec(kind=group.kind, row_side=group.side, col_side=group.over,
                    steps=group.steps, widths=widths, tile_rows=rows, tile_cols=cols)
    if target == "cpu" and not spec.fused and sum(widths) == 1 and len(group.steps[0].shape) < 2:
        spec.lanes = LANES
    roots = [st.expr for st in group.steps] + [st.mask for st in group.steps
                                               if st.mask is not None]
    fenced = _shifted(group, roots) | _let_fenced(roots, group) | expanded
    if spec.fused:
        fenced |= _summands(spec)
    staged = staged_nodes(roots, fenced)
    # a column leaf is laid out for the code that reads it: stages and outputs vectorised
    # over the columns (scalar stages, outputs of `lanes` > 1) want it [b, w, j], those
    # vectorised over the channels (vector stages and outputs) [b, j, w] (read the other
    # way, every channel would be gathered); one read both ways comes in both layouts (the
    # builder reads the one its context wants: `PairBuilder.across`; on the CPU only); a
    # matrix product's stage reads one channel of a pair at a time, either layout alike
    staged_set = set(staged)
    across, along = set(), set()
    for n in staged:
        if not n.shape or _flat(n.shape) == 1:
            across |= _reads(n.args, staged_set)
        elif n.op != "linear":
            along |= _reads(n.args, staged_set)
    if spec.fused:
        for o in spec.outputs:
            (across if o.lanes > 1 else along).update(_reads([o.step.expr], staged_set))
    else:
        (across if spec.lanes > 1 else along).update(_reads(roots, staged_set))
    seen: set[Node] = set()
    order = toposort(roots)
    for n in order:
        if n.op not in P.LEAVES or n.op == "const" or n in seen:
            continue
        seen.add(n)
        if n.deps == {group.side}:
            role = "row"
        elif n.deps == {group.over}:
            role = "col"
        else:
            role = "param" if n.op == "param" else "const"
        # a matrix param comes as W.T for the products W·a and as W for the rest (Wᵀ·a and
        # any other read); one used both ways comes twice, once in each layout
        reads = [c for c in order if n in c.args]
        by_rows = [c for c in reads if c.op == "linear" and c.args[0] is n
                   and not c.attr("transpose")]
        layouts = ([False] if len(by_rows) < len(reads) or not by_rows else []) + \
            ([True] if by_rows else [])
        soas = [False]
        if role == "col" and _flat(n.shape) > 1 and n in across:
            # (on a GPU, where a block stages its columns in shared memory, once)
            soas = [True] if n not in along else [False, True] if target == "cpu" else [False]
        for t in layouts:
            for soa in soas:
                spec.leaves.append(LeafSpec(role, n, _flat(n.shape), tuple(n.shape),
                                            soa=soa, transposed=t))
    spec.leaves.extend(_tables(roots))
    spec.staged = staged
    return spec


def _reads(roots, staged: set[Node]) -> set[Node]:
    """The nodes that code computing `roots` reads itself: down to the stages it reads."""
    out: set[Node] = set()
    stack = list(roots)
    while stack:
        m = stack.pop()
        if m not in out:
            out.add(m)
            if m not in staged:
                stack.extend(m.args)
    return out


def _expanded(group: Group) -> tuple[Group, set[Node]]:
    """The group with the functions whose formula a kernel computes instead (gelu: see
    `expand_formulas`) written out in every step, and the values so written."""
    roots = [n for st in group.steps for n in (st.expr, st.mask) if n is not None]
    if not any(n.op in EXPANDED for n in toposort(roots)):
        return group, set()
    from ..symbolic.derivatives import expand_formulas  # (sympy: only for these kernels)
    out, expanded = expand_formulas(roots)
    if not expanded:
        return group, expanded
    new = dict(zip(roots, out))
    steps = [replace(st, expr=new[st.expr], mask=new.get(st.mask)) for st in group.steps]
    return Group(group.kind, group.side, group.over, steps, group.shifts), expanded


def _summands(spec: PairSpec) -> set[Node]:
    """The summands of a fused kernel that several of its steps sum (per row and per column:
    dh(x) and dh(y) of an MLP's first layer are one node): a stage, computed once per pair."""
    seen: set[Node] = set()
    shared: set[Node] = set()
    for st in spec.steps:
        (shared if st.expr in seen else seen).add(st.expr)
    return {n for n in shared if len(n.deps) == 2 and n.op not in P.LEAVES}


def row_parts(spec: PairSpec, nt: int, batch: int) -> tuple[int, int]:
    """(parts, tiles per part) of a fused kernel's rows, for `nt` tiles of rows and `batch`
    (flattened) batch entries; the rows are padded to parts x tiles x tile_rows. The parts
    run in parallel; each sweeps its tiles in order and adds the per-column sums of its
    rows into a buffer of its own, [batch, parts, m, channels], which is summed over the
    parts afterwards. Without per-column sums every tile is a part."""
    if not spec.col_steps:
        return max(1, nt), 1
    parts = max(1, min(nt, -(-PARTS // max(1, batch))))
    tiles = max(1, -(-nt // parts))
    return max(1, -(-nt // tiles)), tiles


def _tables(roots: list[Node]) -> list[LeafSpec]:
    """One table argument per field read at computed points, in the order first read."""
    out: dict[str, LeafSpec] = {}
    for n in toposort(roots):
        if n.op == "read" and n.name not in out:
            out[n.name] = LeafSpec("table", n, _flat(n.shape), (len(n.args),))
    return list(out.values())


def _shifted(group: Group, roots: list[Node]) -> set[Node]:
    """The values a softmax shift is taken of: a max step's expression, and s in exp(s - m)
    for m a max step. Each is computed in a stage, so it is rounded to the dtype before m
    is subtracted: a fused multiply-add across the subtraction would leave the row's
    largest term at exp(rounding error of s), not exp(0) (for s ~ 1e60, exp(±1e44))."""
    out = {st.expr for st in group.steps if st.kind is StepKind.MAX}
    for n in toposort(roots):
        if n.op == "-" and n.args[1].op == "ref" and n.args[1].name in group.shifts:
            out.add(n.args[0])
    return {n for n in out if len(n.deps) == 2}


def _let_fenced(roots: list[Node], group: Group) -> set[Node]:
    """Pair values that start a new stage so that no kernel nests let-bound values more
    than LET_NESTING deep (see LET_DEPTH); a stage is a fresh start."""
    pair = {group.side, group.over}
    depth: dict[Node, int] = {}
    fenced: set[Node] = set()
    for n in toposort(roots):
        # a value of one side counts too where the kernel computes it (a max step's score
        # of y only is not hoisted out of its reduction)
        if not n.deps or not n.deps <= pair or n.op not in P.ELEMENTWISE:
            depth[n] = 0  # a leaf, a reduction's stage, or computed outside the kernel
            continue
        own = LET_DEPTH.get(n.op, 0)
        for a in n.args:
            if depth[a] and depth[a] + own > LET_NESTING:
                fenced.add(a)
        depth[n] = own + max((0 if a in fenced else depth[a]) for a in n.args)
    return fenced


def staged_nodes(roots: list[Node], fenced: set[Node] = frozenset()) -> list[Node]:
    """The pair values a kernel computes once per (row, column) tile as stages, in
    topological order: channel reductions (dot, sum, MLP layers), the vector argument of
    a matrix product (read once per output channel otherwise), costly scalar values
    that a vector consumer would otherwise recompute for every channel, costly vector
    values that several others read, and `fenced` values (rounded before use)."""
    consumers: dict[Node, list[Node]] = {}
    order = toposort(roots)
    for n in order:
        for a in n.args:
            consumers.setdefault(a, []).append(n)
    out: list[Node] = []
    chosen: set[Node] = set()
    for n in order:
        if len(n.deps) < 2 and n not in fenced:  # (a fenced value of one side: a max step's)
            continue
        pick = n.op == "linear" or (n.op in ("dot", "sum")
                                    and n.args[0].shape[0] > INLINE_REDUCTION)
        if not pick and n.shape and any(c.op in ("linear", "outer") and n in c.args
                                        for c in consumers.get(n, ())):
            pick = n.op not in P.LEAVES and n.op != "bcast"  # read once per output channel
        if not pick and not n.shape and n.op in P.ELEMENTWISE and P.cost([n]) > 2:
            pick = any(c.shape for c in consumers.get(n, ()))
        if not pick and n.shape and n.op in LET_DEPTH:
            # a function with a costly form (erf, exp) that several values read (gelu and
            # its derivative read one erf): once per pair
            pick = len(consumers.get(n, ())) > 1
        pick = pick or n in fenced
        if pick and n not in chosen:
            chosen.add(n)
            out.append(n)
    return out
