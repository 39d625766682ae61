"""Running a Plan with compiled pair kernels.

The pair steps (sums and maxima over pairs of points: all the O(n·m) work) run as
TVM kernels, grouped as `lowering.pair_groups` says; per-point, per-call and total
steps run in torch through the Plan evaluator they share with the tests (scatter steps,
the gradients of fields read at computed points, too).

A kernel's arguments are its spec's leaves in order (`lowering/spec.py`): rows and columns
`[Bf, n, W]` padded to whole tiles (columns `[Bf, W, m]` where the spec says SoA), params
and per-call values in their own shape, and for a field read at computed points its
*table*: the whole field `[Bf, n_1, ..., n_k, C]` (the flattened batch, every axis of its
domains, C = 1 for a scalar field), contiguous, in the kernel's dtype; then the output
and the tile counts nt, mt and the number of valid columns m.
"""

from __future__ import annotations

import math

import torch

from ..symbolic.plan import X_SIDE, Plan, Program, StepKind
from .binding import broadcast
from .plan_eval import PlanEvaluator, _ts
from .progress import Progress


class KernelSet:
    """The compiled kernels of one Plan for one target and dtype: (spec, function) per group,
    for the forward and the backward program (`groups`), and for the steps some gradients
    alone need (`for_steps`)."""

    def __init__(self, plan: Plan, dtype: torch.dtype, target: str, loader):
        self.plan, self.dtype, self.target, self.loader = plan, dtype, target, loader
        self.groups: dict[str, list] = {}
        self._subsets: dict[tuple[str, frozenset[str]], list] = {}
        self._schedules: dict[tuple, tuple] = {}
        specs = {phase: self._specs(prog)
                 for phase, prog in (("forward", plan.forward), ("backward", plan.backward))}
        with self._progress(sum(map(len, specs.values()))) as bar:
            for phase, ss in specs.items():
                self.groups[phase] = self._load(ss, bar)

    def _progress(self, total: int) -> Progress:
        dtype = str(self.dtype).replace("torch.", "")
        return Progress(f"`{self.plan.op.name}` ({self.target}, {dtype})", total)

    def _specs(self, prog: Program) -> list:
        from ..lowering.spec import pair_groups, shift_names, spec_of
        return [spec_of(g, self.target)
                for g in pair_groups(prog, shift_names(self.plan), self.target)]

    def _load(self, specs: list, bar: Progress) -> list:
        dtype = str(self.dtype).replace("torch.", "")
        out = []
        for spec in specs:
            out.append((spec, self.loader(spec, dtype, self.target)))
            bar.step()
        return out

    def _build(self, prog: Program) -> list:
        specs = self._specs(prog)
        with self._progress(len(specs)) as bar:
            return self._load(specs, bar)

    def schedule(self, prog: Program, phase: str, only: set[str] | None
                 ) -> tuple[list, dict[str, int], frozenset[str] | None]:
        """For running `prog`'s steps `only` (None: all): its kernels, the kernel of each
        step a kernel computes, and every step to run (a kernel computes all its steps, so
        each needs its inputs). The same for every call: worked out once."""
        key = (phase, None if only is None else frozenset(only))
        got = self._schedules.get(key)
        if got is None:
            groups = self.for_steps(phase, only)
            group_of = {st.name: k for k, (spec, _) in enumerate(groups) for st in spec.steps}
            steps = None
            if only is not None:
                ran = {group_of[n] for n in only if n in group_of}
                steps = frozenset(prog.depends_on(
                    set(only) | {st.name for k in ran for st in groups[k][0].steps}))
            got = self._schedules[key] = (groups, group_of, steps)
        return got

    def for_steps(self, phase: str, only: set[str] | None) -> list:
        """The kernels of a program's steps `only` (None: all), grouped among themselves
        and built on first use: a fused kernel computes all its steps, so one built for
        every gradient would do the work of those not asked for."""
        prog = self.plan.forward if phase == "forward" else self.plan.backward
        pairs = frozenset(st.name for st in prog.steps
                          if st.kind in (StepKind.SUM, StepKind.MAX))
        if only is None or pairs <= set(only):
            return self.groups[phase]
        key = (phase, pairs & frozenset(only))
        if key not in self._subsets:
            self._subsets[key] = self._build(
                Program([st for st in prog.steps if st.name in only], prog.outputs))
        return self._subsets[key]


class CompiledEvaluator(PlanEvaluator):
    """A Plan evaluator whose pair steps call compiled kernels."""

    def __init__(self, plan: Plan, params, bound, kernels: KernelSet, generator=None,
                 weights=None):
        super().__init__(plan, params, bound, generator, weights=weights)
        self.kernels = kernels

    def run_program(self, prog: Program, phase: str, only: set[str] | None = None) -> None:
        """Run a program's steps in order, each kernel when the first step it computes is
        reached; with `only`, just those steps (and the kernels that compute them)."""
        groups, group_of, only = self.kernels.schedule(prog, phase, only)
        done: set[int] = set()
        for st in prog.steps:
            if only is not None and st.name not in only:
                continue
            k = group_of.get(st.name)
            if k is not None:
                if k not in done:
                    done.add(k)
                    self._run_kernel(*groups[k])
            else:
                self.env[st.name] = self.run_step(st)

    def side_value(self, node, side: str) -> torch.Tensor:
        """A leaf at every point of `side`: `[Bf, n, W]` for the full (flattened) batch."""
        v = self.eval_level(node, side)
        nts = len(_ts(node.shape))
        v = v.squeeze(-nts - 1) if side == X_SIDE else v.squeeze(-nts - 2)  # [*B?, n, *ts]
        n = self.sides[side].n
        v = v.expand(*broadcast(v.shape[:-nts - 1], self.bound.batch), n,
                     *v.shape[-nts:])
        return v.reshape(-1, n, math.prod(_ts(node.shape)))

    def table(self, name: str) -> torch.Tensor:
        """The input field `name` as a kernel's table: `[Bf, *axes, C]`, for the full
        (flattened) batch (Bf = 1 without a batch)."""
        f = self.fields[name]  # [*B?, N, C]
        lead = broadcast(f.shape[:-2], self.bound.batch)
        f = f.expand(*lead, *f.shape[-2:])
        axes = self.bound.field_axes(self.plan.op, name)
        bf = max(1, math.prod(lead))
        if 0 in axes:  # every read is outside: a table of one zero per axis reads the same 0s
            return torch.zeros(bf, *(1 for _ in axes), f.shape[-1], dtype=f.dtype,
                               device=f.device)
        return f.reshape(bf, *axes, f.shape[-1])

    def _run_kernel(self, spec, fn) -> None:
        TI, TJ = spec.tile_rows, spec.tile_cols
        n, m = self.sides[spec.row_side].n, self.sides[spec.col_side].n
        nt, mt = -(-n // TI), -(-m // TJ)
        bf = max(1, math.prod(self.bound.batch))
        if spec.fused:
            from ..lowering.spec import row_parts
            parts, tiles = row_parts(spec, nt, bf)
            np_ = parts * tiles * TI
        else:
            np_ = nt * TI
        args = []
        # rows and columns are padded with zeros: the kernels' sums rely on it at the padded
        # points (a product with such a leaf is 0 there without a select: lowering/pair.py,
        # `PairBuilder.masked`)
        for leaf in spec.leaves:
            if leaf.role == "row":
                v = self.side_value(leaf.node, spec.row_side)
                v = torch.nn.functional.pad(v, (0, 0, 0, np_ - n))
            elif leaf.role == "col":
                v = self.side_value(leaf.node, spec.col_side)
                v = torch.nn.functional.pad(v, (0, 0, 0, mt * TJ - m))
                if leaf.soa:
                    v = v.transpose(1, 2)
            elif leaf.role == "table":
                v = self.table(leaf.node.name)
                args.append(v.expand(bf, *v.shape[1:]).to(self.dtype).contiguous())
                continue
            else:
                v = self.eval_level(leaf.node, None).reshape(leaf.shape or (1,))
                if leaf.transposed:
                    v = v.T
            if v.dim() == 3 and v.shape[0] != bf:
                v = v.expand(bf, *v.shape[1:])
            args.append(v.to(self.dtype).contiguous())
        if spec.fused:
            self._run_fused(spec, fn, args, (n, m, bf, parts, tiles, mt))
            return
        out = torch.empty(bf, nt * TI, *spec.out_shape, dtype=self.dtype, device=self.device)
        fn(*args, out, nt, mt, m)
        out = out[:, :n]
        if spec.matrix:  # per-point matrices (a param gradient): batch summed
            self._store_matrix(spec.steps[0], out)
            return
        self._store(spec.steps, out, n)

    def _run_fused(self, spec, fn, args, sizes) -> None:
        """A fused kernel (`lowering.spec.PairSpec.outputs`, shaped as `Output.shape`
        says): the per-row outputs are [bf, rows padded, ...]; the per-column sums come as
        partial sums per part of the rows, added here in the parts' order."""
        n, m, bf, parts, tiles, mt = sizes
        TI, TJ = spec.tile_rows, spec.tile_cols
        outs = [torch.empty(o.shape(bf, parts, tiles, TI, mt * TJ), dtype=self.dtype,
                            device=self.device) for o in spec.outputs]
        fn(*args, *outs, parts, tiles, mt, m, n)
        for o, out in zip(spec.outputs, outs):
            if o.kind == "col":
                out = out.sum(1)
                if o.lanes > 1:
                    out = out.movedim(-1, 1)
                self._store([o.step], out[:, :m].reshape(bf, m, -1), m)
                continue
            if o.lanes > 1:  # the lanes' partial sums, added in order
                out = out.sum(-1)
            out = out.reshape(bf, parts * tiles * TI, *out.shape[4:])[:, :n]
            if o.kind == "matrix":
                self._store_matrix(o.step, out)
            else:
                self._store([o.step], out.reshape(bf, n, -1), n)

    def _store_matrix(self, st, out: torch.Tensor) -> None:
        """Per-point matrices (a param gradient) [bf, n, r, c]: batch summed."""
        self.special.add(st.name)
        self.env[st.name] = out.sum(0)

    def _store(self, steps, out: torch.Tensor, n: int) -> None:
        """The steps' results from their concatenated channels `out` [bf, n, channels]."""
        lo = 0
        for st in steps:
            w = math.prod(_ts(st.shape))
            part = out[..., lo:lo + w]
            lo += w
            ts = _ts(st.shape)
            part = part.reshape(*self.bound.batch, n, *ts)
            if st.kind is StepKind.MAX:
                part = torch.where(torch.isfinite(part), part, torch.zeros_like(part))
            self.env[st.name] = part
