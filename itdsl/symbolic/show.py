"""Readable text for plan expressions and programs (for `explain` and debugging)."""

from __future__ import annotations

from .pexpr import ELEMENTWISE, Node, toposort
from .plan import Program, StepKind

_INFIX = {"+": 1, "-": 1, "*": 2, "/": 2, "^": 4, "<": 0, "<=": 0, ">": 0, ">=": 0, "==": 0,
          "!=": 0, "and": 0, "or": 0}


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:.6g}"


def show(n: Node, names: dict[Node, str] | None = None) -> str:
    return _show(n, names or {}, 0)


def _show(n: Node, names: dict[Node, str], level: int) -> str:
    if n in names:
        return names[n]
    op, a = n.op, n.args
    if op == "const":
        v = n.value
        return _num(v) if v >= 0 else f"({_num(v)})"
    if op == "coord":
        return n.var
    if op == "pos":
        return f"pos({n.var})"
    if op == "field":
        return f"{n.name}({n.side})"
    if op == "read":
        return f"{n.name}@(" + ", ".join(_show(x, names, 0) for x in a) + ")"
    if op == "weight":
        return f"w({n.var})"
    if op == "param":
        return n.name
    if op in ("ref", "cot"):
        name, side = n.name, n.side
        return name if side is None else f"{name}[{side}]"
    if op == "zeros":
        return "0"
    if op in _INFIX:
        lv = _INFIX[op]
        text = f"{_show(a[0], names, lv)} {op} {_show(a[1], names, lv + 1)}"
        if op in ("<", "<=", ">", ">=", "==", "!=", "and", "or"):
            return f"[{text}]"
        return f"({text})" if lv < level else text
    if op == "neg":
        return "-" + _show(a[0], names, 3)
    if op == "component":
        return f"{_show(a[0], names, 5)}[{n.attr('index')}]"
    if op == "linear":
        col, k, tr = n.attrs
        W = _show(a[0], names, 5)
        sl = "" if (col == 0 and k == a[0].shape[1]) else f"[:, {col}:{col + k}]"
        return f"{W}{sl}{'ᵀ' if tr else ''}·{_show(a[1], names, 5)}"
    if op == "outer":
        col, cols = n.attrs
        hi = col + (a[1].shape[0] if a[1].shape else 1)
        at = "" if (col, hi) == (0, cols) else f"; columns {col}:{hi} of {cols}"
        return f"outer({_show(a[0], names, 0)}, {_show(a[1], names, 0)}{at})"
    if op == "basis":
        n_nodes, d = n.attrs
        return f"basis{n_nodes}{chr(39) * d}({_show(a[0], names, 0)})"
    if op == "onehot":
        return f"e{n.attr('index')}·{_show(a[0], names, 5)}"
    if op == "slice":
        return f"{_show(a[0], names, 5)}[{n.attr('lo')}:{n.attr('hi')}]"
    if op == "bcast":
        return _show(a[0], names, level)
    if op in ELEMENTWISE or op in ("dot", "sum", "concat", "where"):
        return f"{op}(" + ", ".join(_show(x, names, 0) for x in a) + ")"
    return f"{op}(" + ", ".join(_show(x, names, 0) for x in a) + ")"


def show_shared(roots: list[Node], min_uses: int = 2) -> tuple[list[str], list[str]]:
    """Lines `tK = ...` for subexpressions used more than once, then the roots using them."""
    uses: dict[Node, int] = {}
    order = toposort(roots)
    for n in order:
        for c in n.args:
            uses[c] = uses.get(c, 0) + 1
    names: dict[Node, str] = {}
    lets = []
    for n in order:
        if uses.get(n, 0) >= min_uses and n.args and n.op not in ("bcast",):
            text = _show(n, names, 0)
            if len(text) > 12:
                name = f"t{len(names)}"
                lets.append(f"{name} = {text}")
                names[n] = name
    return lets, [_show(r, names, 0) for r in roots]


def show_program(prog: Program, indent: str = "  ", shapes: bool = False) -> str:
    """One line per step (shared subexpressions first, as `tK = ...`); with `shapes`, each
    step's shape after it."""
    lines = []
    for st in prog.steps:
        lets, texts = show_shared(st.roots)
        for let in lets:
            lines.append(f"{indent}  {let}")
        body = texts[0]
        if st.kind is StepKind.POINT:
            lines.append(f"{indent}{st.name}[{st.side}] = {body}")
        elif st.kind is StepKind.CONST:
            lines.append(f"{indent}{st.name} = {body}")
        elif st.kind is StepKind.MAX:
            lines.append(f"{indent}{st.name}[{st.side}] = max over {st.over} of {body} "
                         f"where {texts[1]}")
        elif st.kind is StepKind.SUM:
            lines.append(f"{indent}{st.name}[{st.side}] = sum over {st.over} of {body}")
        elif st.kind is StepKind.SCATTER:
            at = ", ".join(texts[1:])
            lines.append(f"{indent}{st.name} = scatter {body} into {st.target} at ({at})")
        else:
            lines.append(f"{indent}{st.name} = sum over {st.over} of {body}")
        if shapes:
            lines[-1] += f"   : {st.kind} {_shape(st.shape)}"
    return "\n".join(lines)


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _quad(q) -> str:
    args = [str(a) for a in (q.weights, q.n, q.samples) if a is not None]
    return q.rule.value + (f"({', '.join(args)})" if args else "")


def show_plan(plan) -> str:
    """A Plan as stable text (the golden files of tests/golden/plans/): its spaces, both
    programs with every step's kind and shape, and the backward's outputs. No timings."""
    lines = [f"plan {plan.op.name}: strategy {plan.strategy}, output {_shape(plan.out_shape)}",
             "spaces:"]
    for side, sp in plan.spaces.items():
        text = "  " + side + ": " + ", ".join(
            f"{f.var} in {f.domain}" + ("" if f.quad is None else f" ({_quad(f.quad)})")
            for f in sp.factors)
        if sp.importance is not None:
            text += f", importance {show(sp.importance)}"
        lines.append(text)
    lines += ["forward:", show_program(plan.forward, "  ", shapes=True),
              "backward:", show_program(plan.backward, "  ", shapes=True), "gradients:"]
    for key, names in plan.backward.outputs.items():
        lines.append(f"  {key} = {' + '.join(names)}")
    return "\n".join(lines) + "\n"
