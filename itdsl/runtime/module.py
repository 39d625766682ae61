"""Compiled operators as PyTorch modules and `torch.library` custom ops.

Each operator's Plan is registered as two custom ops, `itdsl::<name>_<hash>` (the
forward: the output and the values the backward needs) and `..._bwd` (every gradient),
each with a fake (meta) implementation, and tied together by `register_autograd`. So
`torch.compile(fullgraph=True)` traces a model using them without graph breaks, and
gradients flow to inputs and params. The module holds the params; it checks a call's
inputs (`binding.bind`), draws montecarlo samples with the call's generator, and calls
the forward op.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import os
import threading
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, LoweringError, UnsupportedError
from ..frontend.printer import format_ir_operator
from ..symbolic.costmodel import PairWork, pair_work, small_limit
from ..symbolic.pexpr import toposort
from ..symbolic.plan import X_SIDE, GradKey, GradKind, Plan, param_shapes
from ..symbolic.strategies import Call, get
from .binding import RESERVED_KEYWORDS, Facts, bind, check_call
from .cache import canonical, kernel_key
from .compiled import CompiledEvaluator, KernelSet
from .params import register_params
from .plan_eval import (
    PlanEvaluator,
    evaluate_plan,
    gradients,
    output_axes,
    set_cotangent,
    tshape,
    unflatten_output,
)
from .sampling import compact
from .strategies import Declined, runner_for

_LOCK = threading.Lock()
_REGISTERED: dict[str, OpDef] = {}  # one entry per distinct compiled operator


def load_kernel(spec, dtype: str, target: str):
    """A kernel function: from the cache, else compiled by TVM (and cached)."""
    from . import cache
    key = kernel_key(spec, dtype, target)
    fn = cache.load(key) if target == "cpu" else None
    if fn is not None:
        return fn
    from ..lowering import compile_module, schedule_kernel
    exe = compile_module(schedule_kernel(spec, dtype, target), target)
    if target == "cpu":
        cache.store(key, exe)
    return exe["main"]


def op_name(plan: Plan, target: str) -> str:
    """The custom op's name: it changes with the checked operator (its quadratures and grid
    bounds are not in the steps' expressions), the Plan and this code (torch.compile caches
    graphs that call ops by name, across processes)."""
    steps = [st for prog in (plan.forward, plan.backward) for st in prog.steps]
    text = "\n".join([format_ir_operator(plan.op), plan.strategy, target, _code_version(),
                      *(f"{st.kind},{st.name},{st.side},{st.over}" for st in steps),
                      canonical([e for st in steps for e in (st.expr, st.mask) if e is not None])])
    return f"itdsl::{plan.op.name}_{hashlib.sha256(text.encode()).hexdigest()[:12]}"


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    from ..cache.disk import versions as _versions
    return _versions() + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        raise LoweringError("this operator was compiled for CUDA, but no CUDA device is "
                            "available here", hint="use target=\"cpu\"")


def _ensure_threads() -> None:
    # TVM's CPU pool starts with one thread on small machines unless told otherwise
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    # and its workers spin (300,000 sched_yield calls) after each kernel, which starves the
    # torch (OpenMP) work that follows them in a model: a 1 ms FFT took 30 ms after a kernel
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")


class OpDef:
    """Everything the custom ops of one compiled operator need (shared by its modules)."""

    def __init__(self, plan: Plan, target: str):
        self.plan, self.op, self.target = plan, plan.op, target
        self.kernels: dict[torch.dtype, KernelSet] = {}
        op = plan.op
        self.tensor_names = [d.name for d in op.domains if d.kind.entry.given] + \
                            [i.name for i in op.inputs]
        # the sizes given as numbers: one int per axis (-1: not given); a stencil has none
        self.int_names = [d.name for d in op.domains
                          if not d.kind.entry.given and d.fixed is None]
        self.int_axes = [op.domain(n).naxes for n in self.int_names]
        fwd_names = {st.name for st in plan.forward.steps}
        used = {n.name for st in plan.backward.steps for n in toposort(st.roots)
                if n.op == "ref"}
        self.saved = sorted(used & fwd_names)
        self.param_names = [n for p in op.params for n in param_shapes(p)]
        self.mc_sides = sampled_sides(plan)
        self.name = op_name(plan, target)
        self._facts = Facts.of(op)
        # the call its module bound just before calling the op (`CompiledOperator.forward`),
        # per thread: the op's forward reuses it when given the very same tensors
        self._pending = threading.local()
        self._needed_steps: dict[tuple, frozenset[str]] = {}
        self._register()

    # ---- binding the op's arguments back to a call ------------------------------------------
    def kwargs(self, tensors, ints) -> dict:
        # a points domain whose coordinates were not given travels as an empty 1-D tensor
        kw = {n: t for n, t in zip(self.tensor_names, tensors) if not (t.dim() == 1 and
                                                                        t.numel() == 0)}
        at = 0
        for n, k in zip(self.int_names, self.int_axes):
            v = tuple(ints[at:at + k])
            at += k
            if v[0] >= 0:
                kw[n] = v[0] if k == 1 else v
        return kw

    def ints(self, kwargs: dict) -> list[int]:
        """The sizes a call gave as numbers, one int per axis (-1: not given)."""
        out = []
        for n, k in zip(self.int_names, self.int_axes):
            v = kwargs.get(n, -1)
            out += list(v) if isinstance(v, tuple) else [v] * k
        return out

    def kernelset(self, dtype: torch.dtype) -> KernelSet:
        with _LOCK:
            ks = self.kernels.get(dtype)
            if ks is None:
                if self.target == "cuda":
                    _need_cuda()
                _ensure_threads()
                ks = self.kernels[dtype] = KernelSet(self.plan, dtype, self.target, load_kernel)
        return ks

    def bind(self, tensors, params, ints):
        """The call again, from the op's arguments (an operator with no input tensor takes
        its dtype from its params)."""
        return bind(self.op, self.kwargs(tensors, ints), params[0].dtype if params else None,
                    self._facts)

    def _needed(self, keys: tuple) -> frozenset[str]:
        """The backward steps the gradients `keys` need (worked out once per set of keys)."""
        got = self._needed_steps.get(keys)
        if got is None:
            got = self._needed_steps[keys] = frozenset(self.plan.backward.needed(keys))
        return got

    def bound_for(self, bound, tensors, ints) -> None:
        """Offer the op's next forward on this thread the call `bound` of `tensors`."""
        self._pending.call = (bound, tensors, list(ints))

    def _bound(self, tensors, params, ints):
        """The offered call where the op got exactly its tensors (by identity), else the
        call bound again from the op's arguments."""
        offered = getattr(self._pending, "call", None)
        self._pending.call = None
        if offered is not None and offered[0] is not None:
            bound, given, gints = offered
            if (len(given) == len(tensors) and gints == list(ints)
                    and all(a is b for a, b in zip(given, tensors))):
                return bound
        return self.bind(tensors, params, ints)

    def evaluator(self, tensors, params, weights, ints, offered: bool = False
                  ) -> CompiledEvaluator:
        bound = (self._bound if offered else self.bind)(tensors, params, ints)
        pdict = dict(zip(self.param_names, params))
        return CompiledEvaluator(self.plan, pdict, bound, self.kernelset(bound.dtype),
                                 weights=dict(zip(self.mc_sides, weights)))

    # ---- the custom ops ------------------------------------------------------------------------
    def _register(self) -> None:
        name = self.name

        @torch.library.custom_op(name, mutates_args=())
        def forward(tensors: list[torch.Tensor], params: list[torch.Tensor],
                    weights: list[torch.Tensor], ints: list[int]) -> list[torch.Tensor]:
            ev = self.evaluator(tensors, params, weights, ints, offered=True)
            ev.run_program(self.plan.forward, "forward")
            out = ev.env["out"]
            if self.plan.out_shape == ():
                out = out[..., 0]
            out = unflatten_output(self.plan, ev.bound, out)
            return _unaliased([out] + [ev.env[s] for s in self.saved],
                              list(tensors) + list(params) + list(weights))

        @forward.register_fake
        def _(tensors, params, weights, ints):
            bound = self.bind(tensors, params, ints)
            return [torch.empty(s, dtype=bound.dtype, device=bound.device)
                    for s in self.forward_shapes(bound)]

        @torch.library.custom_op(name + "_bwd", mutates_args=())
        def backward(tensors: list[torch.Tensor], params: list[torch.Tensor],
                     weights: list[torch.Tensor], ints: list[int], saved: list[torch.Tensor],
                     dout: torch.Tensor, needed: list[int]) -> list[torch.Tensor]:
            """Gradients for every tensor and param (zeros where `needed` says 0: the steps
            only they need are not run)."""
            ev = self.evaluator(tensors, params, weights, ints)
            for s, t in zip(self.saved, saved):
                ev.env[s] = t
            set_cotangent(self.plan, ev, dout)
            keys = [k for k, want in zip(self.grad_keys, needed) if want]
            ev.run_program(self.plan.backward, "backward", self._needed(tuple(keys)))
            # a gradient can be the cotangent passed through (`h(x) + ...`), or an input
            # (`weights(w)`): never return an alias of an argument
            return _unaliased(self.collect_grads(ev, tensors, params, set(keys)),
                              [*tensors, *params, *weights, *saved, dout])

        @backward.register_fake
        def _(tensors, params, weights, ints, saved, dout, needed):
            return [torch.empty_like(t) for t in tensors] + [torch.empty_like(p) for p in params]

        def setup(ctx, inputs, output):
            tensors, params, weights, ints = inputs
            ctx.save_for_backward(*tensors, *params, *weights, *output[1:])
            ctx.counts = (len(tensors), len(params), len(weights))
            ctx.ints = ints
            ctx.needed = [int(t.requires_grad) for t in (*tensors, *params)]

        def grad_fn(ctx, grads):
            nt, npar, nw = ctx.counts
            saved = ctx.saved_tensors
            tensors, params = list(saved[:nt]), list(saved[nt:nt + npar])
            weights, fsaved = list(saved[nt + npar:nt + npar + nw]), list(saved[nt + npar + nw:])
            g = backward(tensors, params, weights, ctx.ints, fsaved, grads[0].contiguous(),
                         ctx.needed)
            # (an empty int list counts as an empty list of tensors to autograd, a full one as
            # one non-tensor)
            return list(g[:nt]), list(g[nt:]), [None] * nw, (None if ctx.ints else [])

        forward.register_autograd(grad_fn, setup_context=setup)

        def second_derivative(ctx, grads):
            raise UnsupportedError(
                f"second derivatives of the compiled operator `{self.plan.op.name}` are not "
                "implemented",
                hint='target="reference" differentiates any number of times (torch autograd '
                     "of the pair tensors); or take the first derivative only")

        backward.register_autograd(second_derivative,
                                   setup_context=lambda ctx, inputs, output: None)
        self.forward_op = forward

    def forward_shapes(self, bound) -> list[tuple]:
        plan = self.plan
        n = _side_size(plan, X_SIDE, bound)
        shapes = [(*bound.batch, *output_axes(plan, bound), *plan.out_shape)]
        for s in self.saved:
            st = plan.forward.step(s)
            ts = tshape(st.shape)
            if st.side is None:
                shapes.append(ts)
            else:
                side_n = n if st.side == X_SIDE else _side_size(plan, st.side, bound)
                shapes.append((*bound.batch, side_n, *ts))
        return shapes

    @property
    def grad_keys(self) -> list[GradKey]:
        """The gradient key of each tensor argument, then of each param."""
        domains = {d.name for d in self.op.domains}
        return ([GradKey(GradKind.COORDS if n in domains else GradKind.INPUT, n)
                 for n in self.tensor_names]
                + [GradKey(GradKind.PARAM, n) for n in self.param_names])

    def collect_grads(self, ev, tensors, params, keys: set[str]) -> list[torch.Tensor]:
        grads = gradients(self.plan, ev, keys)
        out = []
        for key, t in zip(self.grad_keys, (*tensors, *params)):
            g = grads.get(key)
            out.append(torch.zeros_like(t) if g is None else g.to(t.dtype).reshape(t.shape))
        return out


def _side_size(plan: Plan, side: str, bound) -> int:
    """The number of points of a side: the product of its variables' (own nodes: n per
    axis)."""
    n = 1
    for f in plan.spaces[side].factors:
        m = bound.sizes.get(f.domain, 0)
        if f.quad is not None and f.quad.rule.entry.own_nodes:
            m = f.quad.n ** plan.op.domain(f.domain).naxes
        n *= m
    return n


def _on_empty(plan: Plan, params: dict, bound, generator) -> torch.Tensor:
    """A call with an empty domain, by the Plan evaluator in torch (autograd differentiates
    it). An empty result still depends on the inputs, with zero gradients, as the
    reference's does."""
    out = evaluate_plan(plan, params, bound, generator)[0]
    leaves = [t for t in (*bound.coords.values(), *bound.fields.values(), *params.values())
              if t.requires_grad]
    if out.numel() == 0 and leaves and torch.is_grad_enabled():
        out = out + sum(t.sum() for t in leaves) * 0
    return out


def _empty(plan: Plan, bound) -> bool:
    """The call has no output points, no batch entries, or an integral over no points."""
    return math.prod(bound.batch) == 0 or any(
        _side_size(plan, side, bound) == 0 for side in plan.spaces)


def pairs(plan: Plan, bound) -> int:
    """A call's pairs: its batch entries times the points of every side (B·n·m for one
    integral) — the size of what a materialised evaluation forms."""
    return math.prod(bound.batch) * math.prod(_side_size(plan, s, bound) for s in plan.spaces)


def _small(plan: Plan, work: PairWork, bound, train: bool) -> bool:
    """Whether this call runs materialised in torch (`small_limit`); never inside
    torch.compile, which traces the custom ops as they are."""
    if torch.compiler.is_compiling():
        return False
    limit = small_limit(work, train, bound.dtype.itemsize, bound.device.type)
    return pairs(plan, bound) <= limit.pairs


def sampled_sides(plan: Plan) -> list[str]:
    """The sides whose weights are drawn per call (montecarlo)."""
    return [s for s, sp in plan.spaces.items()
            if any(f.quad is not None and f.quad.rule.entry.sampled for f in sp.factors)]


def _own_domain(plan: Plan, side: str) -> str | None:
    """The domain of a side that is one domain no other side ranges over (its Monte Carlo
    draws can then be gathered, `sampling.compact`), else None."""
    (factor, *more) = plan.spaces[side].factors
    alone = not more and all(f.domain != factor.domain for s, sp in plan.spaces.items()
                             if s != side for f in sp.factors)
    return factor.domain if alone else None


def _drawn_only(plan: Plan, params: dict, bound, kwargs: dict, generator, reduce: bool = True
                ) -> tuple[dict, dict[str, torch.Tensor]]:
    """The draws of the call's Monte Carlo sides (once: every path then reads them), and
    (`reduce`) the call reduced to the points drawn (`sampling.compact`) for each side over a
    domain of its own (`_own_domain`); the others as they are (their sums then run over every
    point, the points not drawn masked out: their rule `drops` them)."""
    with torch.no_grad():
        ev = PlanEvaluator(plan, params, bound, generator)
    weights = {}
    for side in sampled_sides(plan):
        w, domain = ev.sides[side].weights, _own_domain(plan, side)
        done = compact(plan.op, domain, kwargs, w) if reduce and domain is not None else None
        if done is not None:
            kwargs, w = done
        weights[side] = w.contiguous()
    return kwargs, weights


def _unaliased(outs: list[torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous outputs sharing memory with no input and no other output (a custom op may
    not return an alias; with one point a step can be a view of its input)."""
    taken = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    res = []
    for t in outs:
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in taken:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        taken.add(ptr)
        res.append(t)
    return res


class CompiledOperator(nn.Module):
    """An operator compiled to fast code; call it like the reference. With `target` None the
    device follows the tensors: kernels for the device of each call's tensors (the CPU's LLVM
    kernels, or CUDA kernels for tensors on a GPU), built on first use per device and dtype;
    "cpu" or "cuda" forces one."""

    def __init__(self, plan: Plan, target: str | None = None):
        super().__init__()
        op = plan.op
        for name in RESERVED_KEYWORDS:
            if any(d.name == name for d in op.domains) or any(i.name == name for i in op.inputs):
                raise InputError(f"`{name}` is a reserved keyword of operator calls; rename "
                                 f"that domain or input of `{op.name}`")
        register_params(self, op)
        self.ir, self.plan, self.target = op, plan, target
        self._facts = Facts.of(op)  # what binding a call reads from the body
        self.strategy = plan.strategy
        self._opdefs: dict[str, OpDef] = {}
        # the custom ops are registered here, not on a first call (which torch.compile may
        # trace): for the forced target, else for the CPU and, where there is one, CUDA
        for t in ([target] if target else ["cpu"] + (["cuda"] if torch.cuda.is_available()
                                                      else [])):
            self.opdef(t)
        self._entry = get(plan.strategy)
        self._runner = runner_for(plan)  # the strategy's own algorithm (None: the kernels)
        self._sampled = bool(sampled_sides(plan))  # montecarlo: draws per call
        # the Plan's work per pair, which the small-call cost model reads (worked out here:
        # a lazy property's lock is not something torch.compile traces)
        self.pair_work: PairWork = pair_work(plan)
        self.last_run = None  # what ran the last call: "kernels", "materialised" (a small
        # call, in torch), "empty" or the strategy's name

    def __deepcopy__(self, memo) -> CompiledOperator:
        """A module with copies of the params; the compiled code (custom ops, kernels, the
        strategy's runner state aside) is per Plan and shared."""
        new = type(self)(self.plan, self.target)
        memo[id(self)] = new
        for name, a in self.named_parameters(remove_duplicate=False):
            owner, _, leaf = name.rpartition(".")
            # (through the memo: a param shared with another module stays shared)
            setattr(new.get_submodule(owner) if owner else new, leaf, copy.deepcopy(a, memo))
        new.train(self.training)
        return new

    def extra_repr(self) -> str:
        target = self.target or "the tensors' device"
        return f"operator={self.ir.name}, target={target}, strategy={self.strategy}"

    def opdef(self, target: str) -> OpDef:
        """The custom ops of this operator for `target` (one registration per process)."""
        opdef = self._opdefs.get(target)
        if opdef is None:
            name = op_name(self.plan, target)
            with _LOCK:
                opdef = _REGISTERED.get(name)
                if opdef is None:
                    opdef = _REGISTERED[name] = OpDef(self.plan, target)
            self._opdefs[target] = opdef
        return opdef

    def _target(self, bound) -> str:
        """The kernels' target for this call: the forced one, else the tensors' device."""
        if self.target == "cuda" and bound.device.type != "cuda":
            _need_cuda()
            raise InputError(f"this operator was compiled for CUDA; its inputs are on "
                             f"{bound.device}", hint="move them with `.cuda()`")
        if self.target is not None:
            return self.target
        return "cuda" if bound.device.type == "cuda" else "cpu"

    def choice(self, bound) -> str | None:
        """None where the strategy's own algorithm runs this call, else why the tiled
        kernels run it (the strategy's one per-call rule, over sizes, dtype and device)."""
        if self._runner is None:
            return "the strategy has no algorithm of its own"
        sizes = {side: _side_size(self.plan, side, bound) for side in self.plan.spaces}
        call = Call(sizes, math.prod(bound.batch), bound.dtype.itemsize, bound.device.type,
                    bound.batched)
        return self._entry.choose(self.plan.form, call)

    def forward(self, *args, generator: torch.Generator | None = None,
                **kwargs) -> torch.Tensor:
        check_call(args, generator)
        named = dict(self.named_parameters())
        bound = bind(self.ir, kwargs, next(iter(named.values())).dtype if named else None,
                     self._facts)
        for name, p in named.items():
            if p.dtype != bound.dtype:
                raise InputError(f"param `{name}` is {p.dtype} but the inputs are {bound.dtype}; "
                                 f"call `.to({bound.dtype})` on the module (or pass "
                                 f"{p.dtype} inputs)")
        target = self._target(bound)
        if _empty(self.plan, bound):  # no work to tile: the Plan evaluator, differentiated
            self.last_run = "empty"
            return _on_empty(self.plan, named, bound, generator)
        draws, small, full = {}, True, bound  # (the paths are chosen at the full sizes)
        if self._sampled:  # every path below runs on the points drawn (a runner traced by
            # torch.compile on every point: the number drawn is data, its loops need sizes)
            reduce = self._runner is None or not torch.compiler.is_compiling()
            kwargs, draws = _drawn_only(self.plan, named, bound, kwargs, generator, reduce)
            bound = bind(self.ir, kwargs, bound.dtype, self._facts)
        if self.choice(full) is None:  # a strategy computed in torch (GEMMs, conv1d, FFT)
            try:
                out = self._runner(named, bound, generator, weights=draws)
                self.last_run = self.strategy
                return out
            except Declined:  # values its algorithm would spread: the kernels, which mask
                small = False  # per pair in the backward too (autograd of a materialised
                # evaluation multiplies a masked 0 by them)
        train = torch.is_grad_enabled() and any(
            t.requires_grad for t in (*kwargs.values(), *named.values())
            if isinstance(t, torch.Tensor))
        if small and _small(self.plan, self.pair_work, full, train):  # the kernels would
            # not pay off
            self.last_run = "materialised"
            return evaluate_plan(self.plan, named, bound, generator, weights=draws)[0]
        self.last_run = "kernels"
        opdef = self.opdef(target)
        weights = [draws[s] for s in opdef.mc_sides]
        params = [named[n] for n in opdef.param_names]  # the custom op's order, by name
        tensors = []
        for name in opdef.tensor_names:
            t = kwargs.get(name)
            tensors.append(t.contiguous() if t is not None else
                           torch.empty(0, dtype=bound.dtype, device=bound.device))
        ints = opdef.ints(kwargs)
        # the op need not bind the call again where it gets the very tensors bound here
        offer = not weights and not torch.compiler.is_compiling() and all(
            t is kwargs[name] for name, t in zip(opdef.tensor_names, tensors) if name in kwargs)
        if offer:
            opdef.bound_for(bound, tensors, ints)
        try:
            return opdef.forward_op(tensors, params, weights, ints)[0]
        finally:
            if offer:
                opdef.bound_for(None, (), ())
