"""What the strategies' runners share: the layout of one side's values, `[*B?, n, W]` (W
channels, flattened), and the loop that runs a Plan's forward steps, each pair sum of the
strategy's form by its algorithm and every other step by the Plan evaluator (in torch, so
autograd differentiates them). A runner builds its own evaluator per call and reads it
through its public API (`value`, `eval_level`, `run_step`, `full`, `at`, `tile`).
"""

from __future__ import annotations

import math

import torch

from ...symbolic import pexpr as P
from ...symbolic.plan import X_SIDE, Plan
from ...symbolic.strategies.forms import PairSum
from ..binding import Bound, broadcast
from ..plan_eval import PlanEvaluator, tshape, unflatten_output


def output(plan: Plan, ev: PlanEvaluator, bound: Bound) -> torch.Tensor:
    """The output step with the call's batch dims (a scalar field squeezed), laid out over
    its domains' axes as the call's inputs are: `[*B, *axes, *ts]`."""
    out = ev.env["out"]
    nts = len(tshape(plan.out_shape))
    lead = broadcast(out.shape[:-nts - 1], bound.batch)
    out = out.expand(*lead, *out.shape[-nts - 1:])
    return unflatten_output(plan, bound, out[..., 0] if plan.out_shape == () else out)


def on(ev: PlanEvaluator, e: P.Node, side: str) -> torch.Tensor:
    """`e` (of one side's points, or per call) as `[*B?, n, W]`."""
    v = ev.eval_level(e, side)
    nts = len(tshape(e.shape))
    while v.dim() < nts + 2:
        v = v.unsqueeze(0)
    v = v.squeeze(-nts - 1) if side == X_SIDE else v.squeeze(-nts - 2)
    v = v.reshape(*v.shape[:v.dim() - nts], -1)
    return v.expand(*v.shape[:-2], ev.sides[side].n, v.shape[-1])


def cat(parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    lead = torch.broadcast_shapes(*(t.shape[:-1] for t in parts))
    return torch.cat([t.expand(*lead, t.shape[-1]) for t in parts], dim=-1)


def broadcast_lead(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Broadcast the batch dims of `[*B, n, W]` tensors (n and W kept)."""
    lead = torch.broadcast_shapes(*(t.shape[:-2] for t in ts))
    return tuple(t.expand(*lead, *t.shape[-2:]) for t in ts)


def factors(ev: PlanEvaluator, terms, over: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A [*B?, n, R] and B [*B?, m, R] with kernel(x, y) = Σ_r A[x, r] B[y, r]."""
    As, Bs = [], []
    for t in terms:
        a, b = on(ev, t.a, X_SIDE), on(ev, t.b, over)
        w = max(a.shape[-1], b.shape[-1])
        As.append(a.expand(*a.shape[:-1], w))
        Bs.append(b.expand(*b.shape[:-1], w))
    return cat(As), cat(Bs)


def put(ev: PlanEvaluator, ps: PairSum, out: torch.Tensor) -> None:
    """A sum's value (`[*B, n, W]`, before its outside factor) into the Plan's layout."""
    if ps.outside != P.ONE:
        out = out * on(ev, ps.outside, X_SIDE)
    ts = tshape(ev.plan.forward.step(ps.step).shape)
    out = out.expand(*out.shape[:-1], math.prod(ts))
    ev.env[ps.step] = out.reshape(*out.shape[:-1], *ts)


def ready(ev: PlanEvaluator, *nodes: P.Node) -> bool:
    """Every step `nodes` read has been computed."""
    return all(n.name in ev.env for n in P.toposort(nodes) if n.op == "ref")


class Declined(Exception):
    """A runner leaves this call to the tiled kernels: its algorithm would give other numbers
    than the definition for these values (`CompiledOperator.forward` catches it)."""


class Runner:
    """Runs a Plan's forward in torch; `run` fills the evaluator's steps. A runner that keeps
    values sampled from the params (a matrix, convolution weights) checks them with
    `_same_params`."""

    def __init__(self, plan: Plan):
        self.plan, self.form = plan, plan.form
        self._params: list[torch.Tensor] | None = None  # copies of the params kept with them

    @staticmethod
    def _keeps(params: dict[str, torch.Tensor]) -> bool:
        """Sampled values may be kept across calls: no gradient is recorded for the params
        (inference), and torch.compile is not tracing the call (its graph samples them
        each time: comparing values and keeping them are not traceable)."""
        return not (torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(p.requires_grad for p in params.values())))

    def _same_params(self, params: dict[str, torch.Tensor]) -> bool:
        """The params equal those the kept values were sampled with (then kept as copies)."""
        same = self._params is not None and len(self._params) == len(params) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and torch.equal(a, b) for a, b in zip(self._params, params.values()))
        if not same:
            self._params = [p.detach().clone() for p in params.values()]
        return same

    def __call__(self, params: dict[str, torch.Tensor], bound: Bound,
                 generator: torch.Generator | None = None,
                 weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The output; `weights`: montecarlo weights drawn beforehand, by side."""
        ev = PlanEvaluator(self.plan, params, bound, generator, weights=weights)
        ev.expand_batch = False  # a value the same for every batch entry stays one value
        self.run(ev)
        return output(self.plan, ev, bound)

    def run(self, ev: PlanEvaluator) -> None:  # pragma: no cover
        raise NotImplementedError


class SumsRunner(Runner):
    """The forward steps in order, each pair sum of the form (one part per sum step, with
    `.sum` its `PairSum`) by `compute`, which returns the steps it computed."""

    def run(self, ev: PlanEvaluator) -> None:
        parts = {f.sum.step: f for f in self.form}
        done: set[str] = set()
        for st in self.plan.forward.steps:
            if st.name in done:
                continue
            f = parts.get(st.name)
            if f is None:
                ev.env[st.name] = ev.run_step(st)
            else:
                done |= self.compute(ev, f)

    def compute(self, ev: PlanEvaluator, f) -> set[str]:  # pragma: no cover
        raise NotImplementedError
