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
    how = "itdsl.set_small_pairs or $ITDSL_SMALL_PAIRS sets one count instead; 0 turns them off"
    where = "" if plan.strategy == "dense" else " (where the strategy hands a call to them)"
    head = (f"  small calls: a call the tiled kernels would run{where} but with few pairs "
            "(batch entries × points of every side) runs materialised in torch by the Plan "
            "evaluator, autograd for its gradients")
    limits = {(train, size): small_limit(work, train, size, "cpu")
              for train in (False, True) for size in (4, 8)}
    fixed = limits[False, 4]
    if fixed.by == "setting":
        if fixed.pairs == 0:
            return ["  small calls: off (itdsl.set_small_pairs or $ITDSL_SMALL_PAIRS is 0): "
                    "every call the tiled kernels would run runs in them"]
        return [head, f"    at most {fixed.pairs:,} pairs, set by itdsl.set_small_pairs or "
                      "$ITDSL_SMALL_PAIRS (0 turns them off)"]
    why = {"memory": "the memory budget's cap", "time": "where the two costs cross"}

    def at(train: bool) -> str:
        a, b = limits[train, 4], limits[train, 8]
        text = f"≤ {a.pairs:,} pairs ({why[a.by]})"
        return text if a == b else f"{text}; float64 ≤ {b.pairs:,} ({why[b.by]})"
    return [head,
            f"    on the CPU, by a cost model of this operator's work per pair "
            f"({work.ops_forward} operations forward, {work.ops_backward} backward; "
            f"{work.values} values, {work.gemm} of the operations in GEMMs, materialised):",
            f"      forward calls (nothing needs a gradient, or under torch.no_grad): {at(False)}",
            f"      training calls (an input or a param needs a gradient, as params do by "
            f"default): {at(True)}",
            f"    on CUDA: ≤ {small_limit(work, False, 4, 'cuda').pairs:,} pairs; under "
            f"torch.compile: always the kernels ({how})"]


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
