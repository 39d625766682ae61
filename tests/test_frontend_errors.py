"""The front end reports every error of an expression at once, caps the nesting of brackets,
and refuses a file without an operator.

`tests/test_errors.py` checks the first error of each malformed program; here each test lists
*all* the errors a program must raise, in source order, as (a piece of the message, line:col):
no error may be missing, and none may follow from one already reported.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from test_errors import REPO, body, out

import itdsl
from itdsl.errors import CheckError, ItdslError, ItdslErrors, ParseError
from itdsl.frontend import load_source, parse_file
from itdsl.frontend.parser import MAX_DEPTH


def errors_of(source: str) -> list[tuple[str, str]]:
    """(message, "line:col") of every error `source` raises."""
    with pytest.raises(ItdslError) as info:
        load_source(source, "bad.it")
    errs = info.value.errors if isinstance(info.value, ItdslErrors) else [info.value]
    return [(e.message, f"{e.span.line}:{e.span.col}") for e in errs]


def assert_errors(source: str, want: list[tuple[str, str]]) -> None:
    got = errors_of(source)
    assert len(got) == len(want), got
    for (message, where), (piece, want_where) in zip(got, want):
        assert piece in message and where == want_where, (got, want)


# ---- every independent error of an expression -----------------------------------------------


@pytest.mark.parametrize("source, want", [
    # the operands of `+` and `*`, and the argument of a call
    (out("exp(sqnrm(x)) + foo(x) * bar"),
     [("unknown function `sqnrm`", "8:26"), ("unknown function `foo`", "8:38"),
      ("unknown name `bar`", "8:47")]),
    # an unknown function and its arguments; a built-in's arity and its arguments
    (out("foo(qq) + exp(x[0], zz)"),
     [("unknown function `foo`", "8:22"), ("unknown name `qq`", "8:26"),
      ("`exp` takes 1 argument, got 2", "8:32"), ("unknown name `zz`", "8:42")]),
    # inside and outside Iverson brackets
    (out("[x[0] < qq and zz > 1] + (x[0] < yy)"),
     [("unknown name `qq`", "8:30"), ("unknown name `zz`", "8:37"),
      ("a comparison is a condition", "8:48"), ("unknown name `yy`", "8:55")]),
    (out("x[0] < 1 and 2 + qq"),
     [("`and` combines conditions", "8:22"), ("unknown name `qq`", "8:39")]),
    (out("[qq + 1] * 2"),
     [("an Iverson bracket holds a condition", "8:23"), ("unknown name `qq`", "8:23")]),
    # a component of a failed vector is not checked again
    (out("(qq + zz)[7]"), [("unknown name `qq`", "8:23"), ("unknown name `zz`", "8:28")]),
    # the body, the sample count and the importance of an integral
    (out("integral(y: Y) qq(y) with montecarlo(0, importance = zz)"),
     [("unknown function `qq`", "8:37"), ("the number of samples", "8:59"),
      ("unknown name `zz`", "8:75")]),
    # a sampled field under `gauss` (in the integrand) and its node count (after `with`)
    (body("input h : T -> R", "output u(t: T) = integral(s: T) h(s) with gauss(0)"),
     [("`gauss` evaluates the integrand between the points", "9:37"),
      ("the number of Gauss nodes", "9:53")]),
    # a quadrature on the wrong domain with the wrong arguments
    (out("integral(y: Y) w(y) with riemann(2, bogus = 1)"),
     [("quadrature `riemann` works only on `grid` domains", "8:47"),
      ("quadrature `riemann` takes 0 arguments, got 1", "8:47"),
      ("quadrature `riemann` has no option `bogus`", "8:58")]),
    # both arguments of a kernel call
    (body("kernel k(x: X, y: Y) = 1",
          "output u(x: X) = integral(y: Y) k(qq, 2) * k(y, x)"),
     [("must be evaluated at a point variable", "9:39"),
      ("must be evaluated at a point variable", "9:43"),
      ("kernel `k` takes a point of X here, but `y` is a point of Y", "9:50"),
      ("kernel `k` takes a point of Y here, but `x` is a point of X", "9:53")]),
    # a spline's arity and each of its arguments
    (body("param W : spline(4, 4)", "output u(x: X) = W(x, qq, 1)"),
     [("the spline `W` is a function of 2 variables, got 3 arguments", "9:22"),
      ("a spline argument must be a scalar", "9:24"), ("unknown name `qq`", "9:27")]),
    # an mlp's arguments, and a second call whose widths do not add up
    (body("param phi : mlp(4 -> 4)", "output u(x: X) = sum(phi(qq, [x[0]])) + sum(phi(x))"),
     [("unknown name `qq`", "9:30"), ("an Iverson bracket holds a condition", "9:35"),
      ("the mlp `phi` takes 4 inputs, but its arguments have 3 = 3", "9:49")]),
    # a base and an exponent
    (out("qq ^ 100 + x[0] ^ 200"),
     [("unknown name `qq`", "8:22"), ("exponent 100 is too large", "8:27"),
      ("exponent 200 is too large", "8:40")]),
    # a point called, and its argument; a param called, and its argument
    (body("param s : R", "output u(x: X) = x(qq) + s(zz)"),
     [("`x` is a point, not a function", "9:22"), ("unknown name `qq`", "9:24"),
      ("the param `s` is a value, not a function", "9:30"), ("unknown name `zz`", "9:32")]),
])
def test_every_error_of_an_expression(source, want):
    assert_errors(source, want)


@pytest.mark.parametrize("expr, want", [
    # an unknown name has no width: no width mismatch is reported with it
    ("qq * x + f(x)", [("unknown name `qq`", "8:22"), ("`f` lives on Y", "8:31")]),
    ("dot(qq, x) + norm(zz)", [("unknown name `qq`", "8:26"), ("unknown name `zz`", "8:40")]),
    ("[qq < x] * x", [("unknown name `qq`", "8:23")]),
    # nor an integral whose integrand failed, nor an mlp or a spline with a failed argument
    ("integral(y: Y) qq(y) * f(y) + x", [("unknown function `qq`", "8:37")]),
    ("[x[0] < 1] * (qq + f(x)) - zz",
     [("unknown name `qq`", "8:36"), ("`f` lives on Y", "8:41"), ("unknown name `zz`", "8:49")]),
])
def test_no_error_follows_from_another(expr, want):
    assert_errors(out(expr), want)


def test_every_declaration_and_every_expression():
    src = body("kernel k(x: X, y: Y) = exp(-sqnrm(x - y)) * qq",
               "kernel h(x: X, y: Y) = k(x, y) * zz",
               "output u(x: X) = integral(y: Y) h(x, y) * f(y) + foo(x)")
    assert_errors(src, [("unknown function `sqnrm`", "8:33"), ("unknown name `qq`", "8:49"),
                        ("unknown name `zz`", "9:38"), ("unknown function `foo`", "10:54")])


def test_all_errors_are_rendered_with_their_count():
    with pytest.raises(ItdslErrors) as info:
        load_source(out("exp(sqnrm(x)) + foo(x) * bar"), "bad.it")
    text = info.value.render()
    assert text.count("bad.it:8:") == 3 and text.endswith("3 errors")


def test_a_valid_expression_still_checks():
    prog = load_source(body("param phi : mlp(4 -> 2)", "param W : spline(4)",
                            "kernel k(x: X, y: Y) = exp(-sqnorm(x - y))",
                            "output u(x: X) = integral(y: Y) k(x, y) * phi(f(y)) "
                            "* W(sigmoid(w(y))) * [x[0] < 1 and y[0] >= 0] with mean"))
    assert prog["a"].output.width == 2


# ---- the nesting of parentheses and brackets --------------------------------------------------


def _depth_error(expr: str) -> ParseError:
    with pytest.raises(ParseError) as info:
        load_source(out(expr), "bad.it")
    return info.value


@pytest.mark.parametrize("expr, col", [
    ("(" * 5000 + "1" + ")" * 5000, 22 + MAX_DEPTH),  # the first `(` past the cap
    ("exp(" * 5000 + "1" + ")" * 5000, 22 + 4 * MAX_DEPTH + 3),
    ("(" * MAX_DEPTH + "x[0]" + ")" * MAX_DEPTH, 22 + MAX_DEPTH + 1),  # the `[` of `x[0]`
    ("[(" * 100 + "x[0] < 1" + ")]" * 100, 22 + MAX_DEPTH),
])
def test_parentheses_and_brackets_count_toward_the_cap(expr, col):
    err = _depth_error(expr)
    assert err.message == f"expression nested more than {MAX_DEPTH} levels deep"
    assert (err.span.line, err.span.col) == (8, col)
    assert "parentheses and brackets nest at most" in err.hint


def test_a_syntax_error_before_the_cap_is_reported_first():
    err = _depth_error("x[0] " + "(" * 1000 + "1")
    assert err.message.startswith("unexpected `(`")
    assert (err.span.line, err.span.col) == (8, 27)


def test_a_program_at_the_cap_runs():
    expr = "(" * (MAX_DEPTH - 1) + "-x[0]" + ")" * (MAX_DEPTH - 1)
    prog = itdsl.compile_source(f"operator a {{\n    domain X = points(3)\n"
                                f"    output u(x: X) = {expr}\n}}\n", target="reference")
    coords = torch.rand(5, 3)
    assert torch.equal(prog["a"](X=coords), -coords[:, 0])


@pytest.mark.parametrize("expr", ["(" * 100_000, "[" * 100_000, "exp(" * 100_000,
                                  "(" * 100_000 + "1" + ")" * 100_000])
def test_deep_input_fails_fast(expr):
    start = time.perf_counter()
    err = _depth_error(expr)  # a ParseError: no RecursionError, nothing from lark
    assert "nested more than" in err.message
    assert time.perf_counter() - start < 1.0


# ---- a file without an operator -----------------------------------------------------------------


@pytest.mark.parametrize("source", ["", "\n\n", "   # nothing yet\n# still nothing\n"])
def test_a_file_without_an_operator_is_an_error(source):
    with pytest.raises(CheckError) as info:
        itdsl.compile_source(source, filename="empty.it")
    err = info.value
    assert err.message == "no operator in empty.it"
    assert (err.span.line, err.span.col) == (1, 1)
    assert "`operator NAME { ... }`" in err.hint
    assert err.render().startswith("empty.it:1:1: error: no operator in empty.it\n")


def test_cli_check_fails_on_a_file_without_an_operator(tmp_path):
    empty = tmp_path / "empty.it"
    empty.write_text("# to do\n")
    res = subprocess.run([sys.executable, "-m", "itdsl", "check", str(empty)], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 1
    assert f"{empty}:1:1: error: no operator in {empty}" in res.stderr
    assert "Traceback" not in res.stdout + res.stderr


# ---- odd text ------------------------------------------------------------------------------------


def test_a_byte_order_mark_is_not_text(tmp_path):
    path = tmp_path / "bom.it"
    path.write_bytes(b"\xef\xbb\xbfoperator a {\n    domain Z = pionts(3)\n}\n")
    with pytest.raises(ParseError) as info:
        parse_file(path)
    assert (info.value.span.line, info.value.span.col) == (2, 16)
    path.write_bytes(b"\xef\xbb\xbfoperator a { domain X = index output u(x: X) = x }\n")
    assert [op.name for op in parse_file(path).operators] == ["a"]


@pytest.mark.parametrize("source", [
    body("domain Z = points(1e999)"),  # one error, not a second about the dimension 0
    body("param p : R^2 = 1e999"),
])
def test_a_number_out_of_range_is_reported_once(source):
    assert len(errors_of(source)) == 1


def test_many_names_and_many_errors_check_quickly():
    """Each unknown name is compared with every declared name for a "did you mean" hint; that
    search is made for the errors that are shown only, or this file would take a minute."""
    n = 3000
    src = ("operator a {\n    domain X = index\n"
           + "".join(f"    param p{i} : R\n" for i in range(n))
           + "".join(f"    kernel k{i}(x: X, y: X) = x * pp{i}\n" for i in range(n))
           + "    output u(x: X) = 1\n}\n")
    start = time.perf_counter()
    with pytest.raises(ItdslErrors) as info:
        load_source(src)
    assert time.perf_counter() - start < 15
    errs = info.value.errors
    assert len(errs) == n and errs[0].message == "unknown name `pp0`"
    assert errs[0].hint == "did you mean `p0`?"
