"""Run one program through every execution path and compare each with the reference.

The paths (names used in reports):

- `ref64`, `ref32`: the reference semantics (N x M pair tensors, autograd): the oracle.
- `plan`: the Plan evaluator, forward and `evaluate_backward`, in float64.
- `strategy64`, `strategy32`: the automatic strategy, when it runs in torch (the module's
  `_runner`); a "dense" strategy compiles kernels, which `tvm64` covers.
- `tvm64`, `tvm32`: the TVM kernels (`strategy="dense"`), only when asked (they compile).
- `strategy_fused64`, `strategy_fused32`: attention, when the TVM paths are asked, with the
  fused online-softmax kernel at every size (it runs from `FUSED_MIN_WORK` pairs on).
- `analysis`: the symbolic analysis (`Program.plan`) itself, when it raises.

Every path gets the same inputs (fresh leaves, same layouts), the same params (copied from
the reference after a perturbation), the same montecarlo draws (a generator with the same
seed) and the same output cotangent. Gradients are compared for every input, every points
domain's coordinates and every param. float64 paths are compared with `ref64`, float32 ones
with `ref32`; the rules, and every allowance, are the constants below.
"""

from __future__ import annotations

import math
import random
import re
import time
import traceback
from dataclasses import dataclass, field

import torch

import itdsl
from itdsl.errors import ItdslError
from itdsl.frontend import check, ir, parse
from itdsl.runtime.binding import bind
from itdsl.runtime.plan_eval import evaluate_backward, evaluate_plan

from .generate import generate
from .inputs import Inputs, make_inputs

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-9, F32: 1e-3}  # relative to max |reference| over its finite entries
# Cancellation: where the float32 reference itself is off the float64 one by a relative
# error e (digits lost to cancellation or to a huge intermediate), a float32 path cannot be
# asked for better than SLACK * e, nor a float64 path for better than SLACK * e * eps64/eps32.
SLACK = 16.0
EPS_RATIO = torch.finfo(F64).eps / torch.finfo(F32).eps
# An exact zero computed as a sum of cancelling terms comes out as rounding noise of the
# terms' size. Params are O(1) by construction, so an entry whose error is below NOISE times
# max(1, the largest finite input, the largest number the reference computes for the call)
# counts as equal (with an input of 1e30, the rest is rounding of 1e30-sized terms).
NOISE = {F64: 1e-13, F32: 1e-5}

# Strategies whose algorithm mixes every input into many outputs, so that one NaN or inf
# among the inputs (or overflowing inside) reaches outputs the reference keeps finite. For
# these, when the reference meets a non-finite value anywhere, a path may be non-finite
# where the reference is finite; it must still be non-finite wherever the reference is,
# and equal wherever both are finite.
SPREADS_NAN = {
    "convolution": "an FFT sums every input into every output",
    "lowrank": "A·(Bᵀ·V) sums every y into each rank-r state before any x reads it",
    "recurrence": "chunked scans: masked L x L products and states carry every y of a chunk",
    "attention": "SDPA and the tiled online softmax take the row max over whole tiles",
    "matmul": "a GEMM multiplies the sampled matrix's zeros (masked pairs) by every value",
}
# Strategies that round a tiny weight up on purpose: itdsl's online softmax clamps exp
# arguments at -80, so a score 80 below the row max weighs e^-80 instead of 0. With huge
# inputs (|v| up to 1e30) that weight times one or two input values (v, and k in the
# gradient of q) shows: allow an error of SLACK * weight * max(1, max|input|)^2.
CLAMPED_WEIGHT = {"attention": math.exp(-80.0)}
# Strategies whose backward forms a difference of two values of an input's size times a
# factor of another input's size: the flash backward's dS = P·(dO·v − dO·o) (o the output,
# a mean of v) multiplies v − o, rounded at eps·|v|, by q or k. Where the reference's
# softmax is exactly one-hot (o = v to the last bit), its gradient is 0 and the path's the
# rounding: allow gradients an error of NOISE · max(1, max|input|)^2.
FLASH_BACKWARD = {"attention"}
# Overflow of the float32 reference's own intermediates ((3 + f)·(a·f)·0 with f = -1e30:
# -inf·0 = NaN): a float32 path that multiplies in another order may stay finite. Where the
# float64 reference is finite there, such a path is compared with it (OVERFLOWED).
# Documented forms (docs/language.md, "Special values") whose evaluation differs from the
# definition's on non-finite data, as a test on the checked operator: with such data, every
# path but the reference may be non-finite where the reference is finite (as SPREADS_NAN).
EXPANDED_FORMS = {
    "|u - v|² of width >= 5 as |u|² - 2u·v + |v|²: inf - inf = NaN":
        lambda op: any(isinstance(n, ir.Reduce) and n.fn in (ir.RFn.SQNORM, ir.RFn.NORM)
                       and (n.args[0].width or 1) >= 5 for n in ir.walk(op.output.body)),
}
# Documented gradients (docs/language.md, "Special values") that differ from the reference's
# autograd on non-finite data, each as a test on the checked operator giving the gradient
# keys it covers; with such data, these gradients may be non-finite where the reference is
# finite (as SPREADS_NAN).
EXPANDED_GRADIENTS = {
    "a spline's coefficient gradient is basis(u)ᵀ·g·basis(v): a NaN value reaches every "
    "coefficient through the zero basis weights":
        lambda op: {f"param:{p.name}" for p in op.params if p.kind.value == "spline"},
}
# Masked terms in gradients (docs/language.md, "Special values"): where the reference's
# autograd multiplies a zero cotangent by an infinite local derivative (0 · inf = NaN), the
# compiled paths, which differentiate the sum itself, give 0: in the gradient of a term a
# bracket masks out (torch.where's backward, then exp's), and in every gradient of an empty
# output. The other way round, a gradient multiplies a masked pair sum by a factor of one
# point after the sum (one multiply per point, not per pair), so a NaN or inf factor whose
# pairs are all masked out gives NaN where torch.where's backward gives 0. So in a program
# with a bracket, a gradient's entries may be finite where the reference's are NaN and
# non-finite where they are finite (equal wherever both are finite). A point `montecarlo`
# did not draw is masked out alike (its rule `drops` it).
MASKED = frozenset(ir.CMP_FNS)
# A gradient is a derivative simplified symbolically, not autograd's chain: where the
# reference's gradient is non-finite, a path's must be non-finite too, but NaN and ±inf
# may trade places (1/b - a/b² against (b - a)/b² with b = 0 and a = inf).


@dataclass
class Result:
    """What one path computed: the output and every gradient, or the exception it raised
    (and at which stage: "forward" or "backward")."""

    out: torch.Tensor | None = None
    grads: dict[str, torch.Tensor | None] = field(default_factory=dict)
    error: BaseException | None = None
    stage: str = "forward"
    trace: str = ""
    seconds: float = 0.0


@dataclass
class Failure:
    path: str
    phase: str  # "forward", "backward" (an exception), or a gradient key ("input:f", ...)
    kind: str  # "raised TypeError", "nan (...)", "inf", "value", "shape", ...
    detail: str

    @property
    def klass(self) -> str:
        """A short class for the summary: path, forward or gradient, kind (and for an
        exception, the start of its message with the numbers taken out)."""
        phase = self.phase if self.phase in ("forward", "backward") else "gradient"
        if self.kind.startswith("raised"):
            message = re.sub(r"\d+", "#", self.detail.split(" | ")[0])[:60]
            return f"{self.path} {phase}: {self.kind}: {message}"
        return f"{self.path} {phase}: {self.kind}"

    def __str__(self) -> str:
        return f"{self.path} {self.phase}: {self.kind}: {self.detail}"


@dataclass
class Report:
    """The outcome of one program."""

    seed: int
    family: str
    text: str
    name: str = ""
    strategy: str | None = None
    inputs: str = ""
    skipped: str | None = None
    failures: list[Failure] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


# ---- running the paths --------------------------------------------------------------------


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cotangent(shape, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=_generator(seed + 1), dtype=F64).to(dtype)


def _keys(op, views: dict[str, torch.Tensor]) -> list[str]:
    domains = {d.name for d in op.domains}
    return [("coords:" if k in domains else "input:") + k for k in views]


def _timed(fn) -> Result:
    """`fn(res)` fills `res`; an exception it raises is the result."""
    res, t0 = Result(), time.perf_counter()
    try:
        fn(res)
    except Exception as e:  # every exception is an outcome to compare
        res.error, res.trace = e, traceback.format_exc(limit=-6)
    res.seconds = time.perf_counter() - t0
    return res


def run_module(module, op, inputs: Inputs, dtype: torch.dtype, seed: int) -> Result:
    """Forward through a module, then every gradient by autograd."""
    def go(res: Result) -> None:
        kwargs, views = inputs.call(dtype)
        out = module(generator=_generator(seed), **kwargs)
        params = dict(module.named_parameters())
        keys = _keys(op, views) + [f"param:{k}" for k in params]
        res.out, res.grads, res.stage = out.detach(), dict.fromkeys(keys), "backward"
        if out.requires_grad:
            grads = torch.autograd.grad(out, list(views.values()) + list(params.values()),
                                        _cotangent(out.shape, dtype, seed), allow_unused=True)
            res.grads = dict(zip(keys, grads))
    return _timed(go)


def run_plan(plan, module, op, inputs: Inputs, seed: int, chunk: int) -> Result:
    """The Plan evaluator's forward and backward programs, in float64."""
    def go(res: Result) -> None:
        kwargs, _ = inputs.call(F64)
        out, ev = evaluate_plan(plan, module, bind(op, kwargs, F64), _generator(seed), chunk)
        res.out, res.stage = out.detach(), "backward"
        grads = evaluate_backward(plan, ev, _cotangent(out.shape, F64, seed))
        res.grads = {k: g.detach() for k, g in grads.items()}
    return _timed(go)


def _perturbed_reference(text: str, name: str, seed: int):
    """The float64 reference module, its params moved off their initial values."""
    torch.manual_seed(seed)  # mlp layers draw their default initialisation from it
    module = itdsl.compile_source(text, target="reference")[name].double()
    gen = _generator(seed + 2)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=F64))
    return module


def _like(module, ref, dtype: torch.dtype) -> torch.nn.Module:
    """`module` with the params of `ref`, in `dtype`."""
    module = module.to(dtype)
    module.load_state_dict(ref.state_dict())
    return module


def run_paths(text: str, name: str, inputs: Inputs, seed: int, tvm: bool,
              report: Report) -> dict[str, Result]:
    """Every path's result for one program (the references first)."""
    op = check(parse(text))[name]
    ref = _perturbed_reference(text, name, seed)
    ref32 = _like(itdsl.compile_source(text, target="reference")[name], ref, F32)
    res = {"ref64": run_module(ref, op, inputs, F64, seed),
           "ref32": run_module(ref32, op, inputs, F32, seed)}
    prog = itdsl.compile_source(text, target="cpu")
    analysis = _timed(lambda r: setattr(r, "out", prog.plan(name)))
    report.seconds["analysis"] = analysis.seconds
    if analysis.error is not None:
        return {**res, "analysis": analysis}
    plan = analysis.out
    report.strategy = plan.strategy
    chunk = random.Random(f"chunk:{seed}").choice((1, 2, 3, 64))
    res["plan"] = run_plan(plan, ref, op, inputs, seed, chunk)
    if prog[name]._runner is not None:  # the strategy runs in torch
        for bits, dtype in (("64", F64), ("32", F32)):
            res["strategy" + bits] = run_module(_like(prog[name], ref, dtype), op, inputs,
                                                dtype, seed)
    if tvm and plan.strategy == "attention" and prog[name]._runner is not None:
        import itdsl.runtime.strategies.tuning as T
        least, T.FUSED_MIN_WORK = T.FUSED_MIN_WORK, 0
        try:
            for bits, dtype in (("64", F64), ("32", F32)):
                res["strategy_fused" + bits] = run_module(_like(prog[name], ref, dtype), op,
                                                          inputs, dtype, seed)
        finally:
            T.FUSED_MIN_WORK = least
    if tvm:
        dense = itdsl.compile_source(text, target="cpu", strategy="dense")
        for bits, dtype in (("64", F64), ("32", F32)):
            res["tvm" + bits] = run_module(_like(dense[name], ref, dtype), op, inputs, dtype,
                                           seed)
    return res


# ---- comparing ------------------------------------------------------------------------------


def _finite_max(t: torch.Tensor | None) -> float:
    if t is None:
        return 0.0
    f = t[torch.isfinite(t)]
    return f.abs().max().item() if f.numel() else 0.0


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    both = torch.isfinite(got) & torch.isfinite(ref)
    if not both.any():
        return 0.0
    err = (got[both] - ref[both]).abs().max().item()
    return err / max(_finite_max(ref), 1e-300)


def _where(mask: torch.Tensor, got: torch.Tensor, ref: torch.Tensor) -> str:
    idx = tuple(int(i) for i in mask.nonzero()[0])
    return (f"{int(mask.sum())} entries, e.g. at {list(idx)}: path {got[idx].item():.6g}, "
            f"reference {ref[idx].item():.6g}")


def compare_tensor(got: torch.Tensor, ref: torch.Tensor, tol: float, spread: bool = False,
                   noise: float = 0.0, kinds_free: bool = False,
                   finite_for_nan: bool = False) -> tuple[str, str] | None:
    """(kind, detail) of the first difference of `got` from `ref`, or None: NaN and inf
    positions (and signs) must match (under `spread`, the path may be non-finite where the
    reference is finite; under `kinds_free`, NaN and ±inf may trade places; under
    `finite_for_nan`, the path may be finite where the reference is NaN); finite entries
    within max(tol * max|ref|, noise)."""
    if tuple(got.shape) != tuple(ref.shape):
        return "shape", f"{list(got.shape)}, the reference gives {list(ref.shape)}"
    got, ref = got.detach().double(), ref.detach().double()
    gf, rf = torch.isfinite(got), torch.isfinite(ref)
    lost = ~rf & gf
    if finite_for_nan:
        lost &= ~ref.isnan()
    if lost.any():
        return "nan (reference non-finite, path finite)", _where(lost, got, ref)
    if not spread:
        if (rf & ~gf).any():
            return "nan (path non-finite, reference finite)", _where(rf & ~gf, got, ref)
        odd = ~rf & ~gf & ((got.isnan() != ref.isnan()) | (~ref.isnan() & (got != ref)))
        if odd.any() and not kinds_free:
            return "inf (a different non-finite value)", _where(odd, got, ref)
    both = gf & rf
    if both.any():
        diff = (got - ref).abs().where(both, torch.zeros_like(got))
        err, scale = diff.max().item(), _finite_max(ref)
        if err > max(tol * scale, noise):
            return "value", (f"max error {err:.3g} > {tol:.1e} x {scale:.3g}: "
                             + _where(diff == err, got, ref))
    return None


def _precision_loss(ref64: Result, ref32: Result) -> dict[str, float]:
    """The float32 reference's relative error against the float64 one, per phase; 1 (no
    digits) where float32 overflowed and float64 did not: its intermediates do not fit."""
    if ref64.error is not None or ref32.error is not None:
        return {}
    pairs = [("forward", ref64.out, ref32.out)] + [
        (k, g, ref32.grads.get(k)) for k, g in ref64.grads.items()]
    return {k: 1.0 if bool((torch.isfinite(a) & ~torch.isfinite(b)).any()) else
            _relative_error(b.double(), a.double()) for k, a, b in pairs
            if a is not None and b is not None and a.shape == b.shape}


@dataclass
class Rules:
    """How one path is compared: dtype, tolerance allowances, exemptions."""

    dtype: torch.dtype
    loss: dict[str, float]  # the float32 reference's relative error, per phase
    spread: bool  # SPREADS_NAN applies
    clamp: float  # CLAMPED_WEIGHT's allowance (an absolute error)
    empty: bool  # a domain or the batch is empty: an itdsl error is an answer
    largest_input: float  # the largest finite |value| among the input tensors
    spread_grads: frozenset[str] = frozenset()  # EXPANDED_GRADIENTS applies to these
    masked: bool = False  # MASKED applies to the gradients
    grad_noise: float = 0.0  # FLASH_BACKWARD's allowance (an absolute error, gradients only)
    wider: Result | None = None  # for a float32 path, the float64 reference (see OVERFLOWED)

    def tolerance(self, phase: str) -> float:
        loss = SLACK * self.loss.get(phase, 0.0) * (EPS_RATIO if self.dtype == F64 else 1.0)
        return max(TOL[self.dtype], loss)


def compare_path(path: str, got: Result, ref: Result, rules: Rules) -> list[Failure]:
    """Failures of one path against the reference of its dtype (`ref`)."""
    if ref.error is not None:
        if isinstance(ref.error, ItdslError) and got.error is None:
            return [Failure(path, "forward", "no error",
                            f"computes a result; the reference raises {ref.error!r:.200}")]
        if isinstance(ref.error, ItdslError) and not isinstance(got.error, ItdslError):
            return [_raised(path, got)]
        return []
    if got.error is not None:
        if isinstance(got.error, ItdslError) and rules.empty:
            return []  # the math over no points may be an error rather than zeros
        return [_raised(path, got)]
    noise = max(rules.clamp, NOISE[rules.dtype] * max(
        [1.0, rules.largest_input, _finite_max(ref.out)]
        + [_finite_max(g) for g in ref.grads.values()]))
    out = []
    for phase, mine, want in [("forward", got.out, ref.out)] + [
            (k, got.grads.get(k), g) for k, g in ref.grads.items()]:
        if want is None:  # no gradient: the path may have none, or zeros
            if mine is not None and not bool((mine.abs() <= noise).all()):
                out.append(Failure(path, phase, "a gradient where the reference has none",
                                   f"max |g| = {mine.abs().max().item():.3g}"))
            continue
        if mine is None:
            mine = torch.zeros_like(want)  # a path may leave out a gradient that is 0
        grad = phase != "forward"
        masked = grad and (rules.masked or ref.out.numel() == 0)
        if rules.wider is not None:
            want = _overflow_spared(mine, want, rules.wider.out if phase == "forward"
                                    else rules.wider.grads.get(phase))
        diff = compare_tensor(mine, want, rules.tolerance(phase),
                              rules.spread or phase in rules.spread_grads or masked,
                              max(noise, rules.grad_noise) if grad else noise,
                              kinds_free=grad, finite_for_nan=masked)
        if diff is not None:
            out.append(Failure(path, phase, *diff))
    return out


def _overflow_spared(got: torch.Tensor, ref32: torch.Tensor,
                     ref64: torch.Tensor | None) -> torch.Tensor:
    """OVERFLOWED: where the float32 reference is non-finite only because one of its
    intermediates overflowed (the float64 one is finite there) and the float32 path stayed
    finite, the path is held to the float64 reference's value instead."""
    if ref64 is None or ref64.shape != ref32.shape or got.shape != ref32.shape:
        return ref32
    spared = ~torch.isfinite(ref32) & torch.isfinite(ref64) & torch.isfinite(got)
    if not spared.any():
        return ref32
    return torch.where(spared, ref64.to(ref32.dtype), ref32)


def _raised(path: str, res: Result) -> Failure:
    e = res.error
    message = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    last = res.trace.strip().splitlines()[-3:-1] if res.trace else []
    return Failure(path, res.stage, f"raised {type(e).__name__}",
                   f"{message} | {' / '.join(s.strip() for s in last)}")


def _largest_input(inputs: Inputs) -> float:
    return max([_finite_max(t.values) for t in inputs.tensors.values()] + [0.0])


def compare_all(results: dict[str, Result], op: ir.Operator, strategy: str | None,
                inputs: Inputs) -> list[Failure]:
    """Every path's failures; the reference's own exceptions that are not itdsl errors too."""
    out = [_raised(p, r) for p, r in results.items() if p in ("ref64", "ref32", "analysis")
           and r.error is not None and not isinstance(r.error, ItdslError)]
    if "analysis" in results and not out:  # an itdsl error from a program that checks
        out.append(_raised("analysis", results["analysis"]))
    loss = _precision_loss(results["ref64"], results["ref32"])
    met_non_finite = inputs.special or any(
        _finite_max(t) != t.abs().max().item() for t in
        [results["ref64"].out, *results["ref64"].grads.values()] if t is not None and t.numel())
    expanded = any(test(op) for test in EXPANDED_FORMS.values())
    spread_grads = frozenset().union(*(test(op) for test in EXPANDED_GRADIENTS.values())) \
        if met_non_finite else frozenset()
    bodies = [op.output.body, *(k.body for k in op.kernels)]
    # (the non-finite value may be computed, as x^-2 at 0, and leave no trace in the results)
    masked = any(isinstance(n, ir.Op) and n.fn in MASKED or isinstance(n, ir.Integral)
                 and any(q.rule.entry.drops for q in n.quads)
                 for b in bodies for n in ir.walk(b))
    largest = _largest_input(inputs)
    for path, res in results.items():
        if path in ("ref64", "ref32", "analysis"):
            continue
        dtype = F32 if path.endswith("32") else F64
        fast = path.startswith("strategy")
        clamp = CLAMPED_WEIGHT.get(strategy, 0.0) * SLACK * max(1.0, largest) ** 2 if fast \
            else 0.0
        spread = met_non_finite and (expanded or fast and strategy in SPREADS_NAN)
        flash = NOISE[dtype] * max(1.0, largest) ** 2 if fast and strategy in FLASH_BACKWARD \
            else 0.0
        rules = Rules(dtype, loss, spread, clamp, inputs.empty, largest, spread_grads, masked,
                      flash, results["ref64"] if dtype == F32 else None)
        out += compare_path(path, res, results["ref32" if dtype == F32 else "ref64"], rules)
    return out


# ---- one program ------------------------------------------------------------------------------


def run_case(seed: int, tvm: bool = False, text: str | None = None,
             options: dict[str, str] | None = None) -> Report:
    """Generate program `seed` (or take `text`), run every path, compare."""
    if text is None:
        g = generate(seed)
        report = Report(seed, g.family, g.text, g.name)
    else:
        report = Report(seed, "corpus", text)
    t0 = time.perf_counter()
    try:
        op = check(parse(report.text)).operators[0]
    except ItdslError as e:
        report.skipped = f"invalid: {str(e).splitlines()[0][:120]}"
        return report
    report.name = op.name
    inputs = make_inputs(op, seed, options)
    report.inputs = inputs.describe()
    results = run_paths(report.text, op.name, inputs, seed, tvm, report)
    report.failures = compare_all(results, op, report.strategy, inputs)
    for path, res in results.items():
        report.seconds[path] = res.seconds
    report.seconds["total"] = time.perf_counter() - t0
    return report
