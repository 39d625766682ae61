"""Which calls run materialised in torch instead of the compiled pair kernels: a cost model
of the two on the Plan's own counts.

A call of P pairs (batch entries × the points of every side) costs, in the kernels,
a fixed part (the custom op, padding, thread launch, per-point work; larger for bodies with
more arithmetic) plus P times the arithmetic per pair at the kernels' rate; materialised, a
smaller fixed part (the Plan evaluator's Python) plus P times the values it forms per pair
(memory traffic) and its linear layers at GEMM speed. Below the crossover P* where the two
meet, torch wins; training (a backward to come) has its own constants. Materialising is
also capped by the memory budget: the pair tensors autograd keeps must fit in it.

The constants were fitted (least squares of log times, `python benchmarks/costmodel.py`,
which measures such calls, scores the constants in force on them and refits them) on a
2-core x86 machine to 76 forward and training calls of a Gaussian sum (C = 1 and 16) and of
MLP kernels (ITNet mixers, 1–2 hidden layers of 16–64 units, plain and normalised), at
4·10³ to 2.6·10⁵ pairs, batch 1 and 16. There the path it picks takes on average 1.03× the
faster path's time (worst 2.0×, where the two are close and the batch shape moves the
crossover), against 1.20× for always the kernels and 2.0× for always torch; the constants
before this fit, made before the kernels got faster, scored 1.04× on the same calls but put
an ITNet mixer's training crossover at 2.3·10⁵ pairs where the two paths cross near 5·10⁴
(1.24× slower on GunPoint's ITNet steps, 2.25·10⁵ pairs a call). `itdsl bench` and
`make bench` time a training step of an MLP kernel on both paths side by side. A user who
knows better sets the threshold directly: `itdsl.set_small_pairs`, $ITDSL_SMALL_PAIRS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import pexpr as P
from .plan import Plan, StepKind

# nanoseconds; index 0: a forward call, 1: a training call (forward, then backward)
_KERNEL_FIXED = (0.78e6, 2.66e6)  # per call
_KERNEL_FIXED_PER_OP = (673.0, 165.0)  # per call, per operation per pair (as `_KERNEL_OP`)
_KERNEL_PAIR = (0.75, 3.47)  # per pair
_KERNEL_OP = (0.0208, 0.0102)  # per pair, per operation (forward; training: forward + backward)
_TORCH_FIXED = (0.64e6, 0.98e6)  # per call
_TORCH_PAIR = 0.0  # per pair (broadcasts, the reductions: fitted to 0, the values cover them)
_TORCH_VALUE = 0.77  # per pair, per value the materialised forward forms
_TORCH_GEMM = 0.0136  # per pair, per operation of a linear layer (GEMMs)
_TORCH_TRAIN = 2.47  # a training call's per-pair cost against a forward call's
_NEVER = 1 << 62  # "no crossover": the materialised path is never slower per pair
# CUDA, where the model is not fitted (no GPU was at hand): a fixed count, as on the CPU
# before the model
CUDA_SMALL_PAIRS = 2**15


@dataclass(frozen=True)
class PairWork:
    """What one pair costs: the kernels' arithmetic (forward and backward), and the values
    and linear-layer operations a materialised forward forms."""

    ops_forward: int
    ops_backward: int
    values: int
    gemm: int


def pair_work(plan: Plan) -> PairWork:
    """The Plan's work per pair: its own counts of operations per pair (`pair_ops_after`,
    which `explain` prints too), and the values and GEMM operations of the forward's pair
    steps (the nodes that depend on both sides), which a materialised forward forms."""
    forward = {st.name for st in plan.forward.steps}
    ops_f = sum(c for step, c in plan.pair_ops_after.items() if step in forward)
    ops_b = sum(c for step, c in plan.pair_ops_after.items() if step not in forward)
    values = gemm = 0
    for st in plan.forward.steps:
        if st.kind not in (StepKind.SUM, StepKind.MAX):
            continue
        for n in P.toposort(st.roots):
            if len(n.deps) <= 1 or n.op in P.LEAVES:
                continue
            values += math.prod(n.shape)
            if n.op == "linear":
                gemm += P.node_cost(n)
    return PairWork(ops_f, ops_b, values, gemm)


@dataclass(frozen=True)
class Crossover:
    """The most pairs a call may have and still run materialised, and why."""

    pairs: int
    # "time" (the crossover of the two costs), "memory" (the budget's cap), "setting" (the
    # user's), "default" (CUDA's fixed count)
    by: str


def crossover(work: PairWork, train: bool, itemsize: int, budget: int) -> Crossover:
    """The most pairs at which the materialised evaluation is expected to be no slower
    than the kernels, for a forward call or a training call (`train`), with values of
    `itemsize` bytes and `budget` bytes to materialise in."""
    i = int(train)
    ops = work.ops_forward + (work.ops_backward if train else 0)
    kernel_fixed = _KERNEL_FIXED[i] + _KERNEL_FIXED_PER_OP[i] * ops
    kernel_pair = _KERNEL_PAIR[i] + _KERNEL_OP[i] * ops
    torch_pair = (_TORCH_PAIR + _TORCH_VALUE * work.values + _TORCH_GEMM * work.gemm) * (
        _TORCH_TRAIN if train else 1.0)
    gain = torch_pair - kernel_pair
    by_time = _NEVER if gain <= 0 else int(max(0.0, kernel_fixed - _TORCH_FIXED[i]) / gain)
    by_memory = budget // max(1, work.values * itemsize)
    return Crossover(by_time, "time") if by_time <= by_memory else Crossover(by_memory, "memory")


def small_limit(work: PairWork, train: bool, itemsize: int, device: str) -> Crossover:
    """The most pairs a call may have and still run materialised in torch: the user's
    (`settings.small_pairs`), else on the CPU the cost model's crossover, else (CUDA, where
    the model is not fitted) `CUDA_SMALL_PAIRS`."""
    from ..settings import memory_budget, small_pairs
    fixed = small_pairs()
    if fixed is not None:
        return Crossover(fixed, "setting")
    if device != "cpu":
        return Crossover(CUDA_SMALL_PAIRS, "default")
    return crossover(work, train, itemsize, memory_budget())
