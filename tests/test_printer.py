"""The printers: AST -> `.it` text (round trip), checked IR, `explain` and Plans -> text
(golden files).

`parse(print_program(tree)) == tree` for the examples and for hand-written programs chosen to
stress precedence, associativity and where an integrand ends. For each example the IR
printer's output is compared with `tests/golden/ir/<example>.txt`, and for each of its
operators (default strategy, target "reference") `explain` with
`tests/golden/explain/<example>.<operator>.txt` (the analysis time masked) and the Plan
(`show_plan`: spaces, forward and backward steps with kinds and shapes, gradients) with
`tests/golden/plans/<example>.<operator>.txt`. Run
`pytest tests/test_printer.py --update-golden` to rewrite those after an intended change
(and read the diff).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from itdsl.api import compile_file
from itdsl.frontend import ast, load_file, load_source, parse, parse_file
from itdsl.frontend.ast import BinOp, BoolOp, CmpOp
from itdsl.frontend.printer import format_ir_program, print_expr, print_program
from itdsl.symbolic.show import show_plan

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_FILES = sorted((REPO / "examples").glob("*.it"))
GOLDEN_ROOT = Path(__file__).resolve().parent / "golden"
GOLDEN = GOLDEN_ROOT / "ir"


def roundtrip(tree: ast.Program) -> str:
    text = print_program(tree)
    again = parse(text)
    assert again == tree, f"the round trip changed the program:\n{text}"
    assert print_program(again) == text, "printing is not idempotent"
    return text


# ---- the examples ------------------------------------------------------------------------------


def test_examples_exist():
    assert len(EXAMPLE_FILES) >= 7


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_example_roundtrip(path):
    tree = parse_file(path)
    text = roundtrip(tree)
    load_source(text)  # the canonical text still checks


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_example_roundtrip_of_canonical_text_is_fixed_point(path):
    once = print_program(parse_file(path))
    assert print_program(parse(once)) == once


# ---- hand-written expressions ------------------------------------------------------------------

OPERATOR = """operator a {{
    domain X = points(3)
    domain Y = points(3)
    input f : Y -> R
    input v : Y -> R^4
    param s : R = 0.5
    kernel k(x: X, y: Y) = exp(-sqnorm(x - y))
    output u(x: X) = {}
}}
"""


def expr_of(text: str) -> ast.Expr:
    """The AST of the output expression `text`."""
    tree = parse(OPERATOR.format(text))
    return tree.operators[0].decls[-1].body


TRICKY = [
    # integrals as factors and operands
    "2 * integral(y: Y) k(x, y) * f(y)",
    "(integral(y: Y) k(x, y) * f(y)) * 2",
    "integral(y: Y) k(x, y) * f(y) with sum * 2",
    "integral(y: Y) k(x, y) * f(y) with sum * integral(y: Y) f(y) with mean",
    "-integral(y: Y) f(y)",
    "-(integral(y: Y) f(y))",
    "-integral(y: Y) f(y) * 2 + s",
    "--integral(y: Y) f(y)",
    "s * -integral(y: Y) f(y)",
    "2 / -(integral(y: Y) f(y)) + 1",
    "exp(integral(y: Y) f(y))",
    "integral(y: Y) -f(y) * 2",
    "integral(y: Y) (f(y) + 1) * (s - f(y))",
    "integral(y: Y) f(y) ^ 2 * f(y) with montecarlo(8, importance = f(y) ^ 2 + 1)",
    "integral(y: Y) f(y) with weights(f) + 1",
    "s + integral(y: Y) k(x, y) * v(y) with mean",
    # an integral followed by `/` and `*`
    "integral(y: Y) k(x, y) * v(y) / integral(y: Y) k(x, y)",
    "integral(y: Y) k(x, y) * v(y) / integral(y: Y) k(x, y) * 2",
    "integral(y: Y) f(y) with sum / 2 * 3",
    "(integral(y: Y) f(y)) / 2 * 3",
    "integral(y: Y) f(y) * (1 / 2)",
    "2 / integral(y: Y) f(y)",
    "2 / (integral(y: Y) f(y)) * 3",
    # powers: right-associative, negative exponents
    "x[0]^-x[1]^2",
    "x[0]^x[1]^x[2]",
    "(x[0]^x[1])^x[2]",
    "-x[0]^2",
    "(-x[0])^2",
    "2^-1",
    "2^--1",
    "x[0]^(1 + 1)",
    "(x - x)[0]^2",
    "norm(x)^-0.5",
    # subtraction and division associate to the left
    "x[0] - (x[1] - x[2])",
    "x[0] - x[1] - x[2]",
    "x[0] / (x[1] / x[2])",
    "x[0] - -x[1]",
    "-(x[0] - x[1])",
    "x[0] * (x[1] + x[2]) / (s * s)",
    # conditions in Iverson brackets
    "[x[0] < x[1] <= x[2]]",
    "[0 <= x[0] < 1 == 1 != 2 > 0 >= -1]",
    "[x[0] < 1 and x[1] < 1 or x[2] < 1]",
    "[x[0] < 1 and (x[1] < 1 or x[2] < 1)]",
    "[(x[0] < 1 or x[1] < 1) and x[2] < 1]",
    "[x[0] < 1 or (x[1] < 1 and x[2] < 1)]",
    "[x[0] < 1 or (x[1] < 1 or x[2] < 1)]",
    "[(x[0] < 1)]",
    "[[x[0] < 1] == 1]",
    "[x[0] + 1 < 2 * x[1]] * [s > 0]",
    # numbers
    "1e-3 + .5 + 1. + 1e20 + 123456789012345678 + 0.1",
    "pi * 2",
]


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_roundtrip(text):
    tree = parse(OPERATOR.format(text))
    roundtrip(tree)


def _mul(a, b):
    return ast.Binary(op=BinOp.MUL, left=a, right=b)


def _name(n):
    return ast.Name(id=n)


def _num(v):
    return ast.Number(value=v)


def _call(f, *args):
    return ast.Call(func=f, args=tuple(args))


def test_power_with_negative_exponent_structure():
    # x^-y^2 is x^(-(y^2))
    e = expr_of("s^-s^2")
    assert e == ast.Binary(op=BinOp.POW, left=_name("s"), right=ast.Neg(
        operand=ast.Binary(op=BinOp.POW, left=_name("s"), right=_num(2))))
    assert print_expr(e) == "s^-s^2"


def test_negation_binds_looser_than_power():
    assert expr_of("-s^2") == ast.Neg(operand=ast.Binary(op=BinOp.POW, left=_name("s"),
                                                         right=_num(2)))


def test_integrand_extends_over_products_only():
    y = ast.Binder(name="y", domain="Y")
    kxy = _call("k", _name("x"), _name("y"))
    ratio = expr_of("integral(y: Y) k(x, y) * f(y) / integral(y: Y) k(x, y)")
    assert ratio == ast.Binary(
        op=BinOp.DIV,
        left=ast.Integral(vars=(y,), body=_mul(kxy, _call("f", _name("y"))), quad=None),
        right=ast.Integral(vars=(y,), body=kxy, quad=None))
    plus = expr_of("integral(y: Y) f(y) + s")
    assert isinstance(plus, ast.Binary) and plus.op is BinOp.ADD
    assert isinstance(plus.left, ast.Integral) and plus.right == _name("s")


def test_negated_open_integral():
    y = ast.Binder(name="y", domain="Y")
    assert expr_of("-integral(y: Y) f(y) * 2") == ast.Neg(operand=ast.Integral(
        vars=(y,), body=_mul(_call("f", _name("y")), _num(2)), quad=None))
    assert expr_of("-integral(y: Y) f(y)") == expr_of("-(integral(y: Y) f(y))")


def test_grammar_is_conflict_free():
    pytest.importorskip("interegular")
    import lark

    from itdsl.frontend import parser

    grammar = Path(parser.__file__).with_name("grammar.lark")
    lark.Lark.open(str(grammar), parser="lalr", lexer="basic", strict=True)


def test_closed_integral_is_an_operand():
    e = expr_of("integral(y: Y) f(y) with sum * 2")
    assert isinstance(e, ast.Binary) and e.op is BinOp.MUL
    assert isinstance(e.left, ast.Integral) and e.left.quad.rule == "sum"
    assert e.right == _num(2)


def test_parenthesised_integral_times_factor_is_printed_with_parentheses():
    e = expr_of("(integral(y: Y) f(y)) * 2")
    assert isinstance(e, ast.Binary) and isinstance(e.left, ast.Integral)
    assert print_expr(e) == "(integral(y: Y) f(y)) * 2"


def test_chained_comparison_structure():
    e = expr_of("[x[0] < x[1] <= x[2]]")
    assert isinstance(e, ast.Bracket) and isinstance(e.cond, ast.Compare)
    assert e.cond.ops == (CmpOp.LT, CmpOp.LE) and len(e.cond.operands) == 3


def test_and_binds_tighter_than_or():
    e = expr_of("[x[0] < 1 or x[1] < 1 and x[2] < 1]").cond
    assert e.op is BoolOp.OR and e.right.op is BoolOp.AND
    e = expr_of("[(x[0] < 1 or x[1] < 1) and x[2] < 1]").cond
    assert e.op is BoolOp.AND and e.left.op is BoolOp.OR
    assert print_expr(expr_of("[(x[0] < 1 or x[1] < 1) and x[2] < 1]")) == \
        "[(x[0] < 1 or x[1] < 1) and x[2] < 1]"


def test_declarations_roundtrip():
    text = """operator b {
    domain P = points(2)
    domain G = grid(-1.5, 2.5)
    domain I = index
    input f : P -> R^3
    input g : G -> R
    param c : R
    param d : R^3 = -0.25
    param e : R^3 = normal(0.02)
    param h : R = uniform(-1, 1)
    param phi : mlp(4 -> 8 -> 8 -> 1, act = tanh) = normal(0.1)
    param W : spline(6, 7)
    param V : spline(5)
    kernel k(p: P, q: P) = phi(p, q) * c
    output o(i: I) = i * d
}

operator c {
    domain T = grid(0, 3.5)
    input f : T -> R
    output o(t: T) = integral(s: T) f(s) with simpson
}
"""
    tree = parse(text)
    assert print_program(tree) == text  # this text is already canonical
    roundtrip(tree)


def test_print_program_canonical_form():
    text = ("operator  x{domain X=points(3) input f:X->R^2 "
            "output u(x:X)=integral(y:X)f(y)*(1+x[0])with mean}")
    assert print_program(parse(text)) == (
        "operator x {\n"
        "    domain X = points(3)\n"
        "    input f : X -> R^2\n"
        "    output u(x: X) = integral(y: X) f(y) * (1 + x[0]) with mean\n"
        "}\n")


# ---- golden files of the IR printer ------------------------------------------------------------


def compare_golden(text: str, golden: Path, what: str, update: bool) -> None:
    """`text` equals the golden file (or, with `--update-golden`, becomes it)."""
    if update:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text, encoding="utf-8")
        return
    assert golden.exists(), (f"no golden file {golden.relative_to(REPO)}; run "
                             "`pytest tests/test_printer.py --update-golden` and read it")
    assert text == golden.read_text(encoding="utf-8"), (
        f"{what} changed; if that is intended, run "
        "`pytest tests/test_printer.py --update-golden` and read the diff")


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_ir_golden(path, update_golden):
    compare_golden(format_ir_program(load_file(path)), GOLDEN / f"{path.stem}.txt",
                   f"the IR of {path.name}", update_golden)


EXAMPLE_OPERATORS = [(p, op.name) for p in EXAMPLE_FILES for op in load_file(p).operators]
OPERATOR_IDS = [f"{p.stem}.{name}" for p, name in EXAMPLE_OPERATORS]
ANALYSED_IN = re.compile(r"\(analysed in \d+ ms\)")


@pytest.fixture(scope="module")
def example_programs():
    return {p: compile_file(p, target="reference") for p in EXAMPLE_FILES}


@pytest.mark.parametrize("path, name", EXAMPLE_OPERATORS, ids=OPERATOR_IDS)
def test_explain_golden(path, name, example_programs, update_golden):
    text = ANALYSED_IN.sub("(analysed in … ms)", example_programs[path].explain(name))
    compare_golden(text, GOLDEN_ROOT / "explain" / f"{path.stem}.{name}.txt",
                   f"`explain` of {name} ({path.name})", update_golden)


@pytest.mark.parametrize("path, name", EXAMPLE_OPERATORS, ids=OPERATOR_IDS)
def test_plan_golden(path, name, example_programs, update_golden):
    compare_golden(show_plan(example_programs[path].plan(name)),
                   GOLDEN_ROOT / "plans" / f"{path.stem}.{name}.txt",
                   f"the Plan of {name} ({path.name})", update_golden)


def test_no_stale_golden_files():
    stems = {p.stem for p in EXAMPLE_FILES}
    stale = [p.name for p in GOLDEN.glob("*.txt") if p.stem not in stems]
    ids = set(OPERATOR_IDS)
    stale += [f"{kind}/{p.name}" for kind in ("explain", "plans")
              for p in (GOLDEN_ROOT / kind).glob("*.txt") if p.stem not in ids]
    assert not stale, f"golden files without an example: {stale}"
