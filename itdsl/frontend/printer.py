"""Printers: the AST back to canonical `.it` text, and the checked IR as readable text.

`parse(print_program(ast)) == ast` holds for every AST the parser produces
(tests/test_printer.py checks it on the examples and on generated programs).
"""

from __future__ import annotations

from . import ast, ir
from .ast import BinOp, ParamKind

# Precedence levels, loosest first.
OR, AND, CMP, SUM, TERM, UNARY, POW, POSTFIX = range(8)
_BIN_LEVEL = {BinOp.ADD: SUM, BinOp.SUB: SUM, BinOp.MUL: TERM, BinOp.DIV: TERM, BinOp.POW: POW}


def num(v: float) -> str:
    """A number as the shortest text that parses back to the same float."""
    if float(v).is_integer() and abs(v) < 1e16:
        return str(int(v))
    return repr(float(v))


# ---- AST -> .it text ------------------------------------------------------------------


def print_program(prog: ast.Program) -> str:
    return "\n".join(print_operator(op) for op in prog.operators)


def print_operator(op: ast.Operator) -> str:
    lines = [f"operator {op.name} {{"]
    lines += ["    " + print_decl(d) for d in op.decls]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _init(init: ast.Init | None) -> str:
    if init is None:
        return ""
    if init.kind == "const":
        return " = " + num(init.args[0])
    return f" = {init.kind}(" + ", ".join(num(a) for a in init.args) + ")"


def _vtype(width: int | None) -> str:
    return "R" if width is None else f"R^{width}"


def domain_text(d: ast.DomainDecl | ir.Domain) -> str:
    return d.kind.entry.text(d, num)


def param_type_text(p: ast.ParamDecl | ir.Param) -> str:
    if p.kind is ParamKind.REAL:
        return _vtype(p.width)
    if p.kind is ParamKind.MLP:
        return "mlp(" + " -> ".join(map(str, p.sizes)) + f", act = {p.act})"
    per = "" if p.per is None else f", per = {p.per}"
    return "spline(" + ", ".join(map(str, p.sizes)) + per + ")"


def binders_text(binders) -> str:
    """`u: U, p: P` of AST binders or IR binds."""
    return ", ".join(f"{getattr(b, 'name', None) or b.var}: {b.domain}" for b in binders)


def print_decl(d: ast.Decl) -> str:
    if isinstance(d, ast.DomainDecl):
        return f"domain {d.name} = {domain_text(d)}"
    if isinstance(d, ast.InputDecl):
        return f"input {d.name} : {' * '.join(d.domains)} -> {_vtype(d.width)}"
    if isinstance(d, ast.ParamDecl):
        return f"param {d.name} : {param_type_text(d)}{_init(d.init)}"
    if isinstance(d, ast.KernelDecl):
        (a, b) = d.params
        return (f"kernel {d.name}({a.name}: {a.domain}, {b.name}: {b.domain}) = "
                f"{print_expr(d.body)}")
    if isinstance(d, ast.OutputDecl):
        return f"output {d.name}({binders_text(d.vars)}) = {print_expr(d.body)}"
    raise TypeError(d)


def print_expr(e: ast.Expr) -> str:
    return _p(e, OR, False)


def _p(e: ast.Expr, level: int, product_follows: bool) -> str:
    """Print `e` where the context needs binding at least `level`; `product_follows` says
    whether a `*` may come right after (which an open integral would swallow)."""
    text, own = _p_raw(e, product_follows)
    if own < level or (isinstance(e, ast.Integral) and e.quad is None and product_follows):
        return f"({_p_raw(e, False)[0]})"
    return text


def _p_raw(e: ast.Expr, product_follows: bool) -> tuple[str, int]:
    if isinstance(e, ast.Number):
        return num(e.value), POSTFIX
    if isinstance(e, ast.Name):
        return e.id, POSTFIX
    if isinstance(e, ast.Call):
        return f"{e.func}(" + ", ".join(_p(a, OR, False) for a in e.args) + ")", POSTFIX
    if isinstance(e, ast.Tuple):
        return "(" + ", ".join(_p(a, OR, False) for a in e.items) + ")", POSTFIX
    if isinstance(e, ast.Component):
        return f"{_p(e.base, POSTFIX, True)}[{e.index}]", POSTFIX
    if isinstance(e, ast.Bracket):
        return f"[{_p(e.cond, OR, False)}]", POSTFIX
    if isinstance(e, ast.Neg):
        return "-" + _p(e.operand, UNARY, product_follows), UNARY
    if isinstance(e, ast.Binary):
        lv = _BIN_LEVEL[e.op]
        if e.op is BinOp.POW:  # right-associative; the base is a postfix, the exponent a power
            base = _p(e.left, POSTFIX, True)
            exp = e.right
            if isinstance(exp, ast.Neg):  # `x^-y` parses the exponent as a negated power
                return f"{base}^-{_p(exp.operand, POW, True)}", POW
            return f"{base}^{_p(exp, POW, True)}", POW
        left = _p(e.left, lv, e.op is BinOp.MUL)  # after `/`, an integrand has ended anyway
        right = _p(e.right, lv + 1, product_follows)
        return f"{left} {e.op.value} {right}", lv
    if isinstance(e, ast.Compare):
        parts = [_p(e.operands[0], SUM, False)]
        for op, o in zip(e.ops, e.operands[1:]):
            parts += [op.value, _p(o, SUM, False)]
        return " ".join(parts), CMP
    if isinstance(e, ast.Logic):
        lv = OR if e.op is ast.BoolOp.OR else AND
        return f"{_p(e.left, lv, False)} {e.op.value} {_p(e.right, lv + 1, False)}", lv
    if isinstance(e, ast.Integral):
        head = f"integral({binders_text(e.vars)}) {_integrand(e.body)}"
        if isinstance(e.quad, tuple):
            return f"{head} with (" + ", ".join(map(_quad, e.quad)) + ")", UNARY
        if e.quad is not None:
            return f"{head} with {_quad(e.quad)}", UNARY
        return head, UNARY
    raise TypeError(e)


def _integrand(body: ast.Expr) -> str:
    """The integrand: a product of unary factors (anything looser is parenthesised)."""
    if isinstance(body, ast.Binary) and body.op is BinOp.MUL:
        return f"{_integrand(body.left)} * {_factor(body.right)}"
    return _factor(body)


def _factor(e: ast.Expr) -> str:
    if isinstance(e, ast.Integral):  # an integral inside an integrand: always parenthesise
        return f"({_p_raw(e, False)[0]})"
    return _p(e, UNARY, True)


def _quad(q: ast.Quadrature) -> str:
    if q.args is None:
        return q.rule
    args = [(f"{a.key} = " if a.key else "") + _p(a.value, OR, False) for a in q.args]
    return f"{q.rule}(" + ", ".join(args) + ")"


# ---- checked IR -> readable text ------------------------------------------------------------


def format_ir_program(prog: ir.Program) -> str:
    return "\n".join(format_ir_operator(op) for op in prog.operators)


def format_ir_operator(op: ir.Operator) -> str:
    lines = [f"operator {op.name}"]
    for d in op.domains:
        lines.append(f"  domain {d.name} = {domain_text(d)}")
    for i in op.inputs:
        lines.append(f"  input  {i.name} : {' * '.join(i.domains)} -> {_vtype(i.width)}")
    for p in op.params:
        lines.append(f"  param  {p.name} : {param_type_text(p)}{_init(p.init)}")
    for k in op.kernels:
        lines.append(f"  kernel {k.name}({k.x}: {k.x_domain}, {k.y}: {k.y_domain}) : "
                     f"{_vtype(k.body.width)} = {format_ir_expr(k.body)}")
    o = op.output
    lines.append(f"  output {o.name}({binders_text(o.vars)}) : {_vtype(o.width)} =")
    lines.append(f"    {format_ir_expr(o.body)}")
    return "\n".join(lines) + "\n"


_FN_LEVEL = {ir.Fn.OR: OR, ir.Fn.AND: AND, ir.Fn.ADD: SUM, ir.Fn.SUB: SUM, ir.Fn.MUL: TERM,
             ir.Fn.DIV: TERM, ir.Fn.POW: POW, **{f: CMP for f in ir.CMP_FNS}}


def format_ir_expr(e: ir.Expr) -> str:
    return _f(e, OR)


def _f(e: ir.Expr, level: int) -> str:
    text, own = _f_raw(e)
    return f"({text})" if own < level else text


def _f_raw(e: ir.Expr) -> tuple[str, int]:
    if isinstance(e, ir.Const):
        return (num(e.value) if e.value >= 0 else f"({num(e.value)})"), POSTFIX
    if isinstance(e, ir.Coord):
        return e.var, POSTFIX
    if isinstance(e, ir.FieldAt):
        return f"{e.field}(" + ", ".join(map(affine_text, e.at)) + ")", POSTFIX
    if isinstance(e, ir.ParamRef):
        return e.param, POSTFIX
    if isinstance(e, ir.Component):
        return f"{_f(e.arg, POSTFIX)}[{e.index}]", POSTFIX
    if isinstance(e, ir.Reduce | ir.MlpCall | ir.SplineCall):
        name = e.fn.value if isinstance(e, ir.Reduce) else e.param
        args = [_f(a, OR) for a in e.args]
        if isinstance(e, ir.SplineCall) and e.at is not None:
            args.append(e.at)
        return f"{name}(" + ", ".join(args) + ")", POSTFIX
    if isinstance(e, ir.Op):
        if e.fn is ir.Fn.NEG:
            return "-" + _f(e.args[0], UNARY), UNARY
        if e.fn in ir.INFIX:
            lv = _FN_LEVEL[e.fn]
            a, b = e.args
            if e.fn is ir.Fn.POW:
                return f"{_f(a, POSTFIX)}^{_f(b, POSTFIX)}", POW
            text = f"{_f(a, lv)} {e.fn.value} {_f(b, lv + 1)}"
            if e.fn in ir.BRACKET_FNS:
                return f"[{text}]", POSTFIX
            return text, lv
        return f"{e.fn.value}(" + ", ".join(_f(a, OR) for a in e.args) + ")", POSTFIX
    if isinstance(e, ir.Integral):
        rules = [quad_text(q) for q in e.quads]
        rule = rules[0] if len(rules) == 1 else "(" + ", ".join(rules) + ")"
        return f"(integral({binders_text(e.vars)}) {_f(e.body, OR)} with {rule})", POSTFIX
    raise TypeError(e)


def quad_text(q: ir.Quad) -> str:
    """A rule as written: its positional arguments, then the options given."""
    rule = q.rule.value
    args = []
    for a in q.rule.entry.args:
        v = getattr(q, a.field)
        text = format_ir_expr(v) if isinstance(v, ir.Expr) else str(v)
        if a.keyword is None:
            args.append(text)
        elif v is not None:
            args.append(f"{a.keyword} = {text}")
    if args:
        rule += "(" + ", ".join(args) + ")"
    return rule if q.explicit else rule + " (default)"


def affine_text(a: ir.Affine) -> str:
    """`2*q + t - 1`."""
    text = ""
    for c, v in a.terms:
        term = v if abs(c) == 1 else f"{abs(c)}*{v}"
        text += (("-" if c < 0 else "") + term) if not text else (
            f" - {term}" if c < 0 else f" + {term}")
    if a.offset:
        text += f" - {-a.offset}" if a.offset < 0 else f" + {a.offset}"
    return text
