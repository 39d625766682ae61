"""`explain`: what the compiler made of an operator, for a person to read."""

from __future__ import annotations

from ..frontend.printer import format_ir_expr
from .plan import Plan
from .show import show as format_pexpr
from .show import show_program

ALGORITHMS = {
    "attention": ("tiled online softmax: a running max and sum per x, causal tiles skipped; the "
                  "backward recomputes the scores (flash attention)",
                  "O(n·m·d) time, O(n·d) extra memory"),
    "convolution": ("direct sum over the kernel's support (compact), or FFT (global); "
                    "quadrature weights modulate f",
                    "O(n·w·C) direct (w points in the support), O(n log n·C) by FFT"),
    "recurrence": ("chunked linear scan: parallel inside a chunk, recurrent across chunks; the "
                   "step is built from exp(-a·Δ)",
                   "O(n·S·C) time for S states, O(S·C) state"),
    "lowrank": ("two passes: Σ_y ψ(y) f(y)ᵀ once, then φ(x)·(that) per x",
                "O((n+m)·r·C) time for rank r"),
    "matmul": ("the kernel sampled once into an n×m matrix per param version and sizes, then a "
               "GEMM (an Integral Neural Network layer)", "O(n·m·C) time, O(n·m) for the matrix"),
    "dense": ("tiled, fused pair reduction: each tile of x sweeps the points of y, the kernel is "
              "evaluated in registers and reduced at once", "O(n·m·p) time for p operations per "
              "pair, O((n+m)·C) extra memory"),
}


def _runs_as(plan: Plan, form) -> list[str]:
    """What computes the strategy (`form`: its library form, or None): which parts are
    generated and which are library calls."""
    from . import library as L
    if plan.strategy == "dense":
        return ["    runs as: generated TVM kernels (LLVM on the CPU, CUDA source for GPUs) for "
                "the pair sums; per-point steps in torch"]
    if not form:
        return ["    runs as: the dense lowering (generated tiled pair kernels): this kernel's "
                "form is not one the strategy's algorithm takes yet"]
    head = "    runs as (torch, no generated kernel; torch autograd gives the gradients):"
    if plan.strategy == "matmul":
        return [head, "      the matrix sampled from the per-point tensors below (kept while "
                "params and sizes stay), then torch.matmul (a library GEMM)"]
    if isinstance(form, L.SoftmaxForm):
        extra = f" + ({format_pexpr(form.rest)}) per tile" if form.rest is not None else ""
        mask = {"<=": "causal [y <= x]: tiles above the diagonal skipped",
                "<": "causal [y < x]: tiles above the diagonal skipped"}.get(
                    form.causal, "mask evaluated per tile" if form.mask is not None else "no mask")
        if form.sdpa:
            return ["    runs as (torch, no generated kernel):",
                    "      torch's scaled_dot_product_attention (a library flash kernel, forward "
                    "and backward) on a(x), b(y), v(y); the sums are taken relative to the "
                    "row's log-sum-exp"]
        return ["    runs as (torch, no generated kernel):",
                f"      scores = a(x)·b(y) by torch GEMM per tile (rank {L.rank(list(form.terms))})"
                f"{extra}; {mask}",
                "      online softmax over column tiles (running max and sum), Σ exp(s − max)·v "
                "by GEMM; O(n·C) memory",
                "      backward: its own flash backward (scores recomputed per tile, 5 GEMMs)"]
    out = [head]
    for f in form:
        if isinstance(f, L.LowRankSum):
            r = L.rank(list(f.terms))
            how = ("chunked causal scan: per chunk a masked L×L product, across chunks a "
                   "running Σ ψ(y) f(y)ᵀ" if f.causal else
                   "two GEMMs: Σ_y ψ(y) f(y)ᵀ, then φ(x)·that")
            out.append(f"      {f.sum.step}: rank {r}: {how}")
        elif isinstance(f, L.DecaySum):
            out.append(f"      {f.sum.step}: {len(f.exps)} decaying exponential(s): chunked scan "
                       "built from exp(rate·Δ), Δ >= 0 (recursive over chunks)")
        else:
            how = (f"direct depthwise conv1d over the support |x − y| <= {f.half_width} (FFT "
                   "when it spans many points)" if f.half_width is not None else "FFT (torch.fft)")
            out.append(f"      {f.sum.step}: taps g(x − y) sampled on the grid, then {how}; "
                       "quadrature weights modulate f")
    return out


def _gradient_lines(plan: Plan) -> list[str]:
    by_name = {st.name: st for st in plan.backward.steps}
    lines = []
    for key, names in plan.backward.outputs.items():
        kind, name = key.split(":", 1)
        what = {"input": f"input `{name}`", "param": f"param `{name}`",
                "coords": f"coordinates of `{name}`"}[kind]
        passes = set()
        for dep in plan.backward.depends_on(names):
            st = by_name[dep]
            if st.kind == "sum":
                passes.add(f"Σ over {st.over} per {st.side}")
        how = "; ".join(sorted(passes)) or "per point, no pair reduction"
        lines.append(f"    ∂/∂ {what}: {', '.join(names)}   [{how}]")
    return lines


def explain(plan: Plan, seconds: float | None = None) -> str:
    op, v = plan.op, plan.verdict
    lines = [f"operator {op.name}"]
    lines.append(f"  output {op.output.name}({op.output.var}: {op.output.domain}) = "
                 f"{format_ir_expr(op.output.body)}")
    forced = v is not None and v.strategy != plan.strategy
    lines.append(f"  strategy: {plan.strategy}" + ("  (forced; the analysis found "
                                                    f"{v.strategy})" if forced else ""))
    if v is not None:
        lines.append(f"    rule:  {v.rule}")
        lines.append(f"    form:  {v.form}")
        lines.append(f"    why:   {v.reason}")
        if v.details:
            lines.append("    facts: " + ", ".join(f"{k}={val}" for k, val in v.details.items()))
        for rule, why in v.rejected:
            lines.append(f"    not {rule}: {why}")
    alg, cx = ALGORITHMS[plan.strategy]
    lines.append(f"  algorithm: {alg}")
    lines.append(f"    complexity: {cx}")
    from .library import library_form
    form = library_form(plan)
    lines += _runs_as(plan, form)
    fwd_b = sum(c for k, c in plan.pair_ops_before.items() if _is_forward(plan, k))
    fwd_a = sum(c for k, c in plan.pair_ops_after.items() if _is_forward(plan, k))
    bwd_b = sum(c for k, c in plan.pair_ops_before.items() if not _is_forward(plan, k))
    bwd_a = sum(c for k, c in plan.pair_ops_after.items() if not _is_forward(plan, k))
    lines.append(f"  operations per pair (x, y): forward {fwd_b} -> {fwd_a}, backward "
                 f"{bwd_b} -> {bwd_a}  (naive -> planned: hoisting and rewrites)")
    if plan.hoisted:
        lines.append("  hoisted out of the pair loop (computed once per point or per call):")
        seen = set()
        for h in plan.hoisted:
            if (h.side, h.text) in seen:
                continue
            seen.add((h.side, h.text))
            where = "per call" if h.side == "const" else f"per point of {h.side}"
            lines.append(f"    {h.text}   [{where}, {h.cost} ops]")
    lines.append("  gradients (each a program of pair reductions; nothing is n×m):")
    lines += _gradient_lines(plan)
    if plan.strategy != "dense" and form:
        lines.append("  (the programs below are what the dense lowering compiles; this strategy "
                     "runs its own algorithm, above, and differentiates that)")
    lines.append("  forward program:")
    lines.append(show_program(plan.forward, "    "))
    lines.append("  backward program:")
    lines.append(show_program(plan.backward, "    "))
    if seconds is not None:
        lines.append(f"  (analysed in {seconds * 1000:.0f} ms)")
    return "\n".join(lines) + "\n"


def _is_forward(plan: Plan, step: str) -> bool:
    return step.startswith(("I", "m")) and step[1:].isdigit()
