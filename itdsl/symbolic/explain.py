"""`explain`: what the compiler made of an operator, for a person to read."""

from __future__ import annotations

from ..frontend.printer import binders_text, format_ir_expr
from .plan import GradKind, Plan, StepKind
from .show import show_program
from .strategies import get


def _gradient_lines(plan: Plan) -> list[str]:
    by_name = {st.name: st for st in plan.backward.steps}
    lines = []
    for key, names in plan.backward.outputs.items():
        what = {GradKind.INPUT: f"input `{key.name}`", GradKind.PARAM: f"param `{key.name}`",
                GradKind.COORDS: f"coordinates of `{key.name}`"}[key.kind]
        passes = set()
        for dep in plan.backward.depends_on(names):
            st = by_name[dep]
            if st.kind is StepKind.SUM:
                passes.add(f"Σ over {st.over} per {st.side}")
            elif st.kind is StepKind.SCATTER:
                passes.add("added at the points it was read at")
        how = "; ".join(sorted(passes)) or "per point, no pair reduction"
        lines.append(f"    ∂/∂ {what}: {', '.join(names)}   [{how}]")
    return lines


def _small_call_lines(plan: Plan) -> list[str]:
    """Which calls the kernels would run but torch runs materialised instead (the Plan
    evaluator, autograd for the gradients), by the setting or the cost model."""
    from .costmodel import pair_work, small_limit
    work = pair_work(plan)
    how = "itdsl.set_small_pairs, $ITDSL_SMALL_PAIRS; 0: always the kernels"
    cpu = [small_limit(work, train, 4, "cpu") for train in (False, True)]
    if cpu[0].by == "setting":
        return [f"  small calls: a call the kernels would run but with at most {cpu[0].pairs:,} "
                f"pairs (batch entries × points of every side) runs materialised in torch by "
                f"the Plan evaluator (set by {how})"]
    why = {"memory": "the memory budget's cap", "time": "where the costs cross"}
    parts = [f"{what} ≤ {c.pairs:,} ({why[c.by]})" for what, c in zip(("forward", "training"), cpu)]
    return [f"  small calls: on the CPU a call the kernels would run runs materialised in "
            f"torch by the Plan evaluator when its pairs (batch entries × points of every "
            f"side) are few enough that the kernels' fixed cost does not pay off, by a cost "
            f"model of this operator's work per pair ({work.ops_forward} operations forward, "
            f"{work.ops_backward} backward; {work.values} values and {work.gemm} GEMM "
            f"operations materialised): float32 {', '.join(parts)}; on CUDA ≤ "
            f"{small_limit(work, False, 4, 'cuda').pairs:,} ({how})"]


def explain(plan: Plan, seconds: float | None = None) -> str:
    op, v = plan.op, plan.verdict
    lines = [f"operator {op.name}"]
    lines.append(f"  output {op.output.name}({binders_text(op.output.vars)}) = "
                 f"{format_ir_expr(op.output.body)}")
    forced = v is not None and v.strategy != plan.strategy and not plan.notes
    lines.append(f"  strategy: {plan.strategy}" + ("  (forced; the analysis found "
                                                    f"{v.strategy})" if forced else ""))
    for note in plan.notes:
        lines.append(f"    note:  {note}")
    if v is not None:
        lines.append(f"    rule:  {v.rule}")
        lines.append(f"    form:  {v.form}")
        lines.append(f"    why:   {v.reason}")
        if v.details:
            lines.append("    facts: " + ", ".join(f"{k}={val}" for k, val in v.details.items()))
        for rule, why in v.rejected:
            lines.append(f"    not {rule}: {why}")
    entry = get(plan.strategy)
    lines.append(f"  algorithm: {entry.algorithm}")
    lines.append(f"    complexity: {entry.complexity}")
    lines += entry.runs_as(plan, plan.form)
    if plan.form is not None:
        from ..settings import memory_budget
        lines.append(f"    which runs: {entry.choice(plan.form, memory_budget())}")
    lines += _small_call_lines(plan)
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
    if plan.form is not None:
        lines.append("  (the programs below are what the tiled kernels run, at the calls the rule "
                     "above gives them; otherwise this strategy runs its own algorithm, above, "
                     "and differentiates that)")
    lines.append("  forward program:")
    lines.append(show_program(plan.forward, "    "))
    lines.append("  backward program:")
    lines.append(show_program(plan.backward, "    "))
    if seconds is not None:
        lines.append(f"  (analysed in {seconds * 1000:.0f} ms)")
    return "\n".join(lines) + "\n"


def _is_forward(plan: Plan, step: str) -> bool:
    return step.startswith(("I", "m")) and step[1:].isdigit()
