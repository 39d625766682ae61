"""matmul (an Integral Neural Network layer): each integral of the output is
`Σ_j A[i, j]·V[j]` with `A[i, j] = w_j K(x_i, y_j)` depending on coordinates and params only
(`symbolic/strategies/matmul.py`), and V on the points of y. A is sampled once into an n×m
matrix (torch computes it from the Plan's hoisted per-point tensors), then the integral is a
GEMM. While the params are unchanged (and no gradient is being recorded) the matrix is kept,
per grid sizes: calling with other sizes resamples the layer. Everything is torch, so
autograd differentiates it. A call whose matrix would not fit the memory budget runs on the
tiled kernels instead (the entry's `choose`).
"""

from __future__ import annotations

import torch

from ...symbolic import pexpr as P
from ...symbolic.plan import X_SIDE, Plan, Step, StepKind
from ...symbolic.strategies.forms import reads_inputs
from ...symbolic.strategies.matmul import MatmulTerm
from ..plan_eval import PlanEvaluator, tshape
from .common import Runner


def _split_static(plan: Plan) -> list[Step]:
    """The forward steps, with the parts of a per-point step that read no input (a bias
    spline `c(u)`, say) made steps of their own, so that they can be kept too."""
    out = []
    for st in plan.forward.steps:
        if st.kind is not StepKind.POINT or not reads_inputs(st.expr, plan):
            out.append(st)
            continue
        mapping: dict = {}
        inside: set = set()  # parts of a part already split off
        for n in reversed(P.toposort([st.expr])):  # parents first: the largest parts
            if (n is st.expr or n in inside or n in mapping or P.cost([n]) == 0
                    or reads_inputs(n, plan)):
                continue
            name = f"{st.name}_static{len(mapping)}"
            out.append(Step("point", name, st.side, n))
            mapping[n] = P.ref(name, st.side, n.shape)
            inside.update(P.toposort(list(n.args)))
        expr = P.substitute([st.expr], mapping)[0]
        out.append(Step(st.kind, st.name, st.side, expr, st.over, st.mask))
    return out


class MatmulRunner(Runner):
    """Runs a matmul Plan's forward in torch; keeps each sampled matrix while it is valid."""

    def __init__(self, plan: Plan):
        super().__init__(plan)
        self._kept: dict[str, tuple[tuple, torch.Tensor]] = {}
        self.steps = _split_static(plan)
        # steps of params and coordinates only: sampled once per version, like the matrix
        self._static = {st.name for st in self.steps
                        if st.kind in (StepKind.POINT, StepKind.CONST)
                        and not reads_inputs(st.expr, plan)}

    def run(self, ev: PlanEvaluator) -> None:
        params, bound = ev.params, ev.bound
        by_step = {t.step: t for t in self.form}
        keep = self._keeps(params)
        version = (tuple((p._version, p.data_ptr()) for p in params.values()),
                   tuple(sorted(bound.sizes.items())), bound.dtype, bound.device)
        if keep and not self._same_params(params):  # (a write through `.data` keeps the
            self._kept.clear()  # version counter: the values themselves are compared)
        for st in self.steps:
            t = by_step.get(st.name)
            if t is None:
                kept = self._kept.get(st.name) if keep else None
                if kept is not None and kept[0] == version:
                    ev.env[st.name] = kept[1]
                    continue
                ev.env[st.name] = ev.run_step(st)
                if keep and st.name in self._static:
                    self._kept[st.name] = (version, ev.env[st.name].detach())
                continue
            ts = tshape(st.shape)
            A = self._matrix(ev, t, version if keep else None)  # [*B?, n, m]
            m = ev.sides[t.over].n
            V = ev.eval_level(t.values, t.over).squeeze(-len(ts) - 2)  # [*B?, m | 1, *ts]
            V = V.expand(*V.shape[:-len(ts) - 1], m, *ts)
            V = V.reshape(*V.shape[:-len(ts)], -1)  # [*B, m, C]
            if A.dim() == 2:  # one matrix for the whole batch: a single GEMM
                out = (A @ V.movedim(-2, 0).reshape(m, -1)).reshape(
                    A.shape[0], *V.shape[:-2], V.shape[-1]).movedim(0, -2)
            else:
                out = torch.matmul(A, V)  # [*B, n, C]
            ev.env[st.name] = ev.full(out.reshape(*out.shape[:-1], *ts), X_SIDE, len(ts))

    def _matrix(self, ev: PlanEvaluator, t: MatmulTerm, version) -> torch.Tensor:
        if version is not None:
            kept = self._kept.get(t.step)
            if kept is not None and kept[0] == version:
                return kept[1]
        A = ev.eval_nodes([t.kernel], None)[t.kernel]  # [*B?, n|1, m|1, 1]
        n, m = ev.sides[X_SIDE].n, ev.sides[t.over].n
        A = A[..., 0].expand(*A.shape[:-3], n, m)
        if version is not None:
            self._kept[t.step] = (version, A.detach())
        return A


runner = MatmulRunner
