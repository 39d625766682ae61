"""AST -> checked IR.

The checker resolves names (declared before use, one namespace per operator),
the domain of every point variable, the width of every expression, the
quadrature of every integral, and inlines kernel calls. It collects all the
errors it finds and raises them together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from itertools import chain

from ..domains import rules_on
from ..errors import MAX_RENDERED, CheckError, ItdslError, Span, did_you_mean, raise_all
from ..functions import FUNCTIONS
from . import ast, ir
from .ast import ParamKind

MAX_EXPONENT = 64  # a constant exponent beyond this is surely a typo, and blows up algebra
# Kernel calls are inlined, so a chain of kernels that each call the previous one twice
# grows exponentially; these bound one declaration's expression once its kernels are inlined.
MAX_IR_NODES = 100_000
MAX_IR_DEPTH = 160  # the reference and the symbolic layer recurse ~4 frames a level

REDUCE_FNS = {f.value: f for f in ir.RFn}
CALL_KEYWORDS = ("self", "generator")  # taken by the operator modules' forward()
BUILTINS = ({"pi"} | set(ir.CALL_FNS) | set(REDUCE_FNS))

MAX_AFFINE = 2**31 - 1  # of a read's coefficients and offset: int32 indices


class _Bad(Exception):
    """An expression failed to check; its error is already recorded."""


def _wname(w: int | None) -> str:
    return "R" if w is None else f"R^{w}"


def _a(word: str) -> str:
    """`word` with its indefinite article: "an input", "a kernel"."""
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _ast_nodes(e: ast.Expr):
    """Every node of an AST expression (iterative)."""
    stack = [e]
    while stack:
        node = stack.pop()
        yield node
        for f in fields(node):
            v = getattr(node, f.name)
            if isinstance(v, ast.Expr):
                stack.append(v)
            elif isinstance(v, tuple):
                stack.extend(x for x in v if isinstance(x, ast.Expr))


@dataclass
class _Scope:
    vars: dict[str, str]  # point variable -> its domain
    in_output: bool
    integral_var: str | None = None


class Checker:
    def __init__(self):
        self.errors: list[ItdslError] = []

    def error(self, message: str, span: Span, hint: str | None = None) -> None:
        self.errors.append(CheckError(message, span, hint))

    def program(self, prog: ast.Program) -> ir.Program:
        if not prog.operators:  # an empty file (or only comments) is surely not what was meant
            self.error(f"no operator in {prog.span.file}", prog.span,
                       "a file holds `operator NAME { ... }` blocks, e.g. "
                       "`operator g { domain X = index  output u(x: X) = x }`")
        ops = []
        seen: dict[str, ast.Operator] = {}
        for op in prog.operators:
            if op.name in seen:
                self.error(f"operator `{op.name}` is defined twice", op.name_span,
                           f"the first definition is at line {seen[op.name].name_span.line}")
                continue
            seen[op.name] = op
            checked = _OperatorChecker(self, op).run()
            if checked is not None:
                ops.append(checked)
        raise_all(self.errors)
        return ir.Program(operators=tuple(ops))


class _OperatorChecker:
    def __init__(self, parent: Checker, op: ast.Operator):
        self.parent = parent
        self.op = op
        self.domains: dict[str, ir.Domain] = {}
        self.inputs: dict[str, ir.Input] = {}
        self.params: dict[str, ir.Param] = {}
        self.kernels: dict[str, ir.Kernel] = {}
        self.output: ir.Output | None = None
        self.decl_of: dict[str, ast.Decl] = {}
        # Every name the operator declares, wherever (to tell "declared later" from "unknown").
        self.all_decls: dict[str, ast.Decl] = {}
        for d in op.decls:
            self.all_decls.setdefault(d.name, d)
        # Names whose declaration failed to check: their uses are not reported again.
        self.broken: set[str] = set()
        # Variables of the integrals in the output being checked (to explain a use outside).
        self.integral_vars: dict[str, ast.Binder] = {}
        # Size of each checked kernel's body, and of the declaration being checked so far.
        self.kernel_size: dict[str, int] = {}
        self.inlined = 0
        self.current: str | None = None  # the declaration being checked

    def error(self, message: str, span: Span, hint: str | None = None) -> None:
        self.parent.error(message, span, hint)

    def suggest(self, name: str, declared: Iterable[str]) -> str | None:
        """`did_you_mean` among the names the operator declares, for the errors that are shown:
        the search compares `name` with every one of them, so a file of thousands of names
        and thousands of errors would take minutes to check."""
        if len(self.parent.errors) >= MAX_RENDERED:
            return None
        return did_you_mean(name, declared)

    # ---- declarations ------------------------------------------------------------
    def run(self) -> ir.Operator | None:
        n_errors = len(self.parent.errors)
        for d in self.op.decls:
            if not self.declare(d):
                continue
            self.inlined = 0
            self.current = d.name
            getattr(self, "decl_" + type(d).__name__)(d)
            self.current = None
            made = (self.domains, self.inputs, self.params, self.kernels)
            if not any(d.name in m for m in made) and not (
                    self.output is not None and self.output.name == d.name):
                self.broken.add(d.name)
        if self.output is None:
            if len(self.parent.errors) == n_errors:
                self.error(f"operator `{self.op.name}` has no `output`", self.op.name_span,
                           "add one: `output g(x: X) = integral(y: Y) k(x, y) * f(y)`")
            return None
        if len(self.parent.errors) != n_errors:
            return None
        return ir.Operator(name=self.op.name, domains=tuple(self.domains.values()),
                           inputs=tuple(self.inputs.values()), params=tuple(self.params.values()),
                           kernels=tuple(self.kernels.values()), output=self.output,
                           span=self.op.span)

    def declare(self, d: ast.Decl) -> bool:
        if d.name in CALL_KEYWORDS and isinstance(d, ast.DomainDecl | ast.InputDecl):
            self.error(f"`{d.name}` cannot name a domain or an input: operators are called with "
                       f"those as keywords, and `{d.name}` is taken", d.name_span,
                       "choose another name")
            return False
        if d.name in BUILTINS:
            self.error(f"`{d.name}` is a built-in and cannot be redefined", d.name_span,
                       "choose another name")
            return False
        if d.name in self.decl_of:
            first = self.decl_of[d.name]
            self.error(f"`{d.name}` is already declared (line {first.name_span.line})", d.name_span,
                       "every name in an operator is declared once")
            return False
        if isinstance(d, ast.OutputDecl) and self.output is not None:
            self.error("an operator has exactly one `output`", d.name_span,
                       "put each output in an operator of its own")
            return False
        self.decl_of[d.name] = d
        return True

    def decl_DomainDecl(self, d: ast.DomainDecl) -> None:
        self.domains[d.name] = ir.Domain(name=d.name, kind=d.kind, dim=d.dim, lo=d.lo, hi=d.hi,
                                         boxes=d.boxes, sizes=d.sizes,
                                         span=d.span).with_parts()

    def lookup_domain(self, name: str, span: Span) -> ir.Domain | None:
        dom = self.domains.get(name)
        if dom is None:
            if name in self.decl_of:
                self.error(f"`{name}` is not a domain", span,
                           f"it is declared as {_a(self._what(name))}")
            elif name in self.all_decls:
                self.used_before(name, span)
            else:
                self.error(f"unknown domain `{name}`", span,
                           self.suggest(name, self.domains) or
                           f"declare it first: `domain {name} = points(D)`, `grid(a, b)` or "
                           "`index`")
        return dom

    def used_before(self, name: str, span: Span):
        """Report a use of `name` above its declaration."""
        d = self.all_decls[name]
        what = {ast.DomainDecl: "domain", ast.InputDecl: "input", ast.ParamDecl: "param",
                ast.KernelDecl: "kernel", ast.OutputDecl: "output"}.get(type(d), "name")
        self.error(f"`{name}` is used before its declaration (the {what} `{name}` is declared "
                   f"at line {d.name_span.line})", span,
                   f"move the declaration of `{name}` above line {span.line}: names are "
                   "declared before use")

    def decl_InputDecl(self, d: ast.InputDecl) -> None:
        found = [self.lookup_domain(name, d.domain_span) for name in d.domains]
        if all(dom is not None for dom in found):
            self.inputs[d.name] = ir.Input(name=d.name, domains=d.domains, width=d.width,
                                           span=d.span)

    def decl_ParamDecl(self, d: ast.ParamDecl) -> None:
        per_shape = ()
        if d.per is not None:
            dom = self.lookup_domain(d.per, d.per_span)
            if dom is None:
                return
            if dom.fixed is None:
                self.error(f"`per = {d.per}` needs a domain of fixed size, but `{d.per}` is "
                           f"`{dom.kind.value}`, sized by the call", d.per_span,
                           "one spline per point of a stencil: `domain T = stencil(3, 3)`, "
                           "`param W : spline(16, 16, per = T)`")
                return
            per_shape = dom.fixed
        self.params[d.name] = ir.Param(name=d.name, kind=d.kind, width=d.width, sizes=d.sizes,
                                       act=d.act, per=d.per, per_shape=per_shape, init=d.init,
                                       span=d.span)

    def binders(self, binders, what: str) -> dict[str, str] | None:
        scope: dict[str, str] = {}
        ok = True
        for b in binders:
            if self.lookup_domain(b.domain, b.span) is None:
                ok = False
            elif b.name in self.decl_of or b.name in BUILTINS:
                self.error(f"point variable `{b.name}` of {what} hides the {self._what(b.name)} "
                           f"`{b.name}`", b.span, "give the point another name")
                ok = False
            elif b.name in scope:
                self.error(f"`{b.name}` names two points of {what}", b.span,
                           "give each point its own name, e.g. `(x: X, y: Y)`")
                ok = False
            else:
                scope[b.name] = b.domain
        return scope if ok else None

    def decl_KernelDecl(self, d: ast.KernelDecl) -> None:
        scope = self.binders(d.params, f"kernel `{d.name}`")
        if scope is None:
            return
        try:
            body = self.expr(d.body, _Scope(vars=scope, in_output=False))
            self.kernel_size[d.name] = self.expansion(body, f"kernel `{d.name}`", d.name_span)
        except _Bad:
            return
        (x, y) = d.params
        self.kernels[d.name] = ir.Kernel(name=d.name, x=x.name, x_domain=x.domain, y=y.name,
                                         y_domain=y.domain, body=body, span=d.span)

    def decl_OutputDecl(self, d: ast.OutputDecl) -> None:
        scope = self.binders(d.vars, f"output `{d.name}`")
        if scope is None:
            return
        self.integral_vars = {b.name: b for n in _ast_nodes(d.body)
                              if isinstance(n, ast.Integral) for b in n.vars}
        try:
            body = self.expr(d.body, _Scope(vars=scope, in_output=True))
            self.expansion(body, f"output `{d.name}`", d.name_span)
        except _Bad:
            return
        self.output = ir.Output(name=d.name, vars=tuple(ir.Bind(var=v, domain=dom)
                                                        for v, dom in scope.items()),
                                body=body, span=d.span)

    def expansion(self, body: ir.Expr, what: str, span: Span) -> int:
        """The number of nodes of `body`; fail if it is too large or too deep."""
        size = 0
        stack = [(body, 1)]
        while stack:
            node, depth = stack.pop()
            size += 1
            if depth > MAX_IR_DEPTH:
                self.fail(f"{what} is nested more than {MAX_IR_DEPTH} levels deep (with the "
                          "kernels it calls inlined)", span,
                          "simplify it, or let fewer kernels call one another")
            stack.extend((c, depth + 1) for c in ir.children(node))
        return size

    def _what(self, name: str) -> str:
        if name in BUILTINS:
            return "built-in"
        d = self.decl_of.get(name)
        return {ast.DomainDecl: "domain", ast.InputDecl: "input", ast.ParamDecl: "param",
                ast.KernelDecl: "kernel", ast.OutputDecl: "output"}.get(type(d), "name")

    # ---- expressions -----------------------------------------------------------------
    # A method that checks an expression returns its IR or raises `_Bad` once its errors are
    # recorded. Independent parts (the operands of `+`, the arguments of a call, the body and
    # the quadrature of an integral) are checked each on its own, so that one pass reports
    # all of their errors; a node whose part failed then fails without an error of its own
    # (a width mismatch with an unknown name would only repeat the first error).

    def fail(self, message: str, span: Span, hint: str | None = None):
        self.error(message, span, hint)
        raise _Bad

    def attempt(self, check, *args):
        """`check(*args)`, or None if it failed (its errors are recorded)."""
        try:
            return check(*args)
        except _Bad:
            return None

    def each(self, check, items, *args) -> list:
        """`check(item, *args)` for every item, each on its own; fail if any failed."""
        out, failed = [], False
        for item in items:
            try:
                out.append(check(item, *args))
            except _Bad:
                failed = True
        if failed:
            raise _Bad
        return out

    def expr(self, e: ast.Expr, scope: _Scope) -> ir.Expr:
        method = getattr(self, "e_" + type(e).__name__)
        return method(e, scope)

    def e_Number(self, e: ast.Number, scope: _Scope) -> ir.Expr:
        return ir.Const(value=e.value, width=None, span=e.span)

    def e_Name(self, e: ast.Name, scope: _Scope) -> ir.Expr:
        if e.id in self.broken:
            raise _Bad  # its declaration is already reported
        if e.id in scope.vars:
            dom = self.domains[scope.vars[e.id]]
            return ir.Coord(var=e.id, domain=dom.name, width=dom.coord_width, span=e.span)
        if e.id == "pi":
            return ir.Const(value=math.pi, width=None, span=e.span)
        p = self.params.get(e.id)
        if p is not None and p.kind is ParamKind.REAL:
            return ir.ParamRef(param=e.id, width=p.width, span=e.span)
        what = self._what(e.id)
        if e.id in self.inputs:
            doms = self.inputs[e.id].domains
            at = [next((v for v, d in scope.vars.items() if d == dom), None) for dom in doms]
            self.fail(f"`{e.id}` is a field: evaluate it at a point of {' * '.join(doms)}",
                      e.span, f"write `{e.id}({', '.join(at)})`" if all(at) else
                      f"integrate over {doms[0]}: `integral(y: {doms[0]}) ...`")
        if p is not None or e.id in self.kernels or e.id in ir.UNARY_FNS or e.id in REDUCE_FNS:
            if e.id in self.kernels:
                hint = f"write `{e.id}(x, y)` with two points"
            else:
                hint = f"write `{e.id}(...)`"
            self.fail(f"`{e.id}` is {_a('param' if p else what)} that must be called", e.span,
                      hint)
        if e.id in self.decl_of:
            if what == "output":
                self.fail(f"the output `{e.id}` cannot be used in an expression", e.span)
            if what == "kernel" and e.id == self.current:
                self.fail(f"the kernel `{e.id}` is used in its own definition", e.span,
                          "a kernel cannot refer to itself")
            self.fail(f"`{e.id}` is {_a(what)}, not a value", e.span,
                      "a point variable names a point of a domain: `(x: X)`" if what == "domain"
                      else None)
        if self.out_of_scope(e.id, e.span, scope):
            raise _Bad
        hint = self.suggest(e.id, chain(scope.vars, self.decl_of, ["pi"]))
        if hint is None and scope.in_output and scope.integral_var is None:
            hint = (f"declare it before use (e.g. `param {e.id} : R = 1.0`), or, for a point of "
                    f"another domain, integrate over it: `integral({e.id}: Y) ...`")
        elif hint is None:
            hint = f"declare it before use, e.g. `param {e.id} : R = 1.0`"
        self.fail(f"unknown name `{e.id}`", e.span, hint)

    def out_of_scope(self, name: str, span: Span, scope: _Scope) -> bool:
        """Report `name` if it is declared later or is an integral's variable used outside its
        integrand, and say whether it did (a name simply unknown is left to the caller)."""
        if name in self.all_decls and name not in self.decl_of:
            if isinstance(self.all_decls[name], ast.OutputDecl):
                self.error(f"the output `{name}` cannot be used in an expression", span)
            else:
                self.used_before(name, span)
            return True
        if name in self.integral_vars and name not in scope.vars:
            b = self.integral_vars[name]
            self.error(f"`{name}` is not defined here: it is the variable of the integral at "
                       f"{b.span.line}:{b.span.col}, known only inside its integrand", span,
                       "an integrand extends over `*` and stops at `+`, `-`, `/` and `with`; "
                       f"parenthesise a sum to put it inside: `integral({name}: {b.domain}) "
                       "(a + b)`")
            return True
        return False

    def e_Neg(self, e: ast.Neg, scope: _Scope) -> ir.Expr:
        a = self.expr(e.operand, scope)
        if isinstance(a, ir.Const):
            return ir.Const(value=-a.value, width=None, span=e.span)
        return ir.Op(fn=ir.Fn.NEG, args=(a,), width=a.width, span=e.span)

    def elementwise(self, fn: ir.Fn, args: list[ir.Expr], span: Span) -> ir.Expr:
        widths = {a.width for a in args if a.width is not None}
        if len(widths) > 1:
            shown = " and ".join(_wname(a.width) for a in args)
            self.fail(f"`{fn.value}` of values of different widths: {shown}", span,
                      "vectors combine elementwise only with vectors of the same width, "
                      "or with scalars")
        width = widths.pop() if widths else None
        return ir.Op(fn=fn, args=tuple(args), width=width, span=span)

    def e_Binary(self, e: ast.Binary, scope: _Scope) -> ir.Expr:
        fn = ir.Fn(e.op.value)
        left = self.attempt(self.expr, e.left, scope)
        right = self.attempt(self.expr, e.right, scope)
        if fn is ir.Fn.POW and isinstance(right, ir.Const) and abs(right.value) > MAX_EXPONENT:
            self.error(f"exponent {right.value:g} is too large (the limit is {MAX_EXPONENT})",
                       e.right.span)
            right = None
        if left is None or right is None:
            raise _Bad
        return self.elementwise(fn, [left, right], e.span)

    def e_Compare(self, e: ast.Compare, scope: _Scope) -> ir.Expr:
        self.error("a comparison is a condition, which is only allowed inside an Iverson bracket",
                   e.span, "write `[a < b]` for 1 where a < b holds, else 0")
        self.condition(e, scope)  # the errors it would still have inside a bracket
        raise _Bad

    def e_Logic(self, e: ast.Logic, scope: _Scope) -> ir.Expr:
        self.error(f"`{e.op.value}` combines conditions, which are only allowed inside an Iverson "
                   "bracket", e.span, "write `[a < b and c < d]`")
        for side in (e.left, e.right):  # the errors they would still have inside a bracket
            is_condition = isinstance(side, ast.Compare | ast.Logic)
            self.attempt(self.condition if is_condition else self.expr, side, scope)
        raise _Bad

    def e_Tuple(self, e: ast.Tuple, scope: _Scope) -> ir.Expr:
        self.each(self.expr, e.items, scope)  # the items' own errors first
        self.fail("a tuple `(a, b)` is only an axis of a grid's declaration", e.span,
                  "write `domain S = grid((0, 1), (0, 1))`; in an expression, build a vector "
                  "with its components, or parenthesise one value")

    def e_Bracket(self, e: ast.Bracket, scope: _Scope) -> ir.Expr:
        return replace(self.condition(e.cond, scope), span=e.span)

    def condition(self, e: ast.Expr, scope: _Scope) -> ir.Expr:
        """A condition (comparisons joined by and/or) as a 0/1 expression."""
        if isinstance(e, ast.Compare):
            operands = self.each(self.expr, e.operands, scope)
            parts = [self.elementwise(ir.Fn(op.value), [a, b], e.span)
                     for op, a, b in zip(e.ops, operands, operands[1:])]
            out = parts[0]
            for p in parts[1:]:
                out = self.elementwise(ir.Fn.AND, [out, p], e.span)
            return out
        if isinstance(e, ast.Logic):
            left, right = self.each(self.condition, (e.left, e.right), scope)
            return self.elementwise(ir.Fn(e.op.value), [left, right], e.span)
        self.error("an Iverson bracket holds a condition", e.span,
                   "compare something: `[abs(t - s) <= 0.2]`, `[s <= t and t < s + 8]`")
        self.attempt(self.expr, e, scope)  # the errors of the expression itself
        raise _Bad

    def e_Component(self, e: ast.Component, scope: _Scope) -> ir.Expr:
        base = self.expr(e.base, scope)
        if base.width is None:
            self.fail("only a vector has components, but this is a scalar (R)", e.base.span)
        if e.index >= base.width:
            self.fail(f"component {e.index} is out of range for a vector of width {base.width}",
                      e.span, f"components are numbered 0 to {base.width - 1}")
        return ir.Component(arg=base, index=e.index, width=None, span=e.span)

    def e_Integral(self, e: ast.Integral, scope: _Scope) -> ir.Expr:
        if not scope.in_output:
            self.fail("an integral may only appear in an `output`", e.span,
                      "a kernel is a function of two points; integrate it in the output")
        if scope.integral_var is not None:
            self.fail("integrals cannot be nested", e.span,
                      "integrate over several variables at once: `integral(v: V, t: T) ...`")
        doms = [self.lookup_domain(b.domain, b.span) for b in e.vars]
        if any(d is None for d in doms):
            raise _Bad
        seen: set[str] = set()
        for b in e.vars:
            if b.name in scope.vars:
                self.fail(f"the integration variable `{b.name}` is already the output's point",
                          b.span, "give it another name, e.g. `integral(y: Y)`")
            if b.name in self.decl_of or b.name in BUILTINS:
                self.fail(f"the integration variable `{b.name}` hides the "
                          f"{self._what(b.name)} `{b.name}`", b.span, "give it another name")
            if b.name in seen:
                self.fail(f"`{b.name}` names two variables of the integral", b.span,
                          "give each variable its own name: `integral(v: V, t: T)`")
            seen.add(b.name)
        own = {b.name: d.name for b, d in zip(e.vars, doms)}
        inner = _Scope(vars={**scope.vars, **own}, in_output=True,
                       integral_var=e.vars[0].name)
        body = self.attempt(self.expr, e.body, inner)
        quads = self.attempt(self.quadratures, e, doms, body)
        if body is None or quads is None:
            raise _Bad
        return ir.Integral(vars=tuple(ir.Bind(var=b.name, domain=d.name)
                                      for b, d in zip(e.vars, doms)),
                           body=body, quads=quads, width=body.width, span=e.span)

    def quadratures(self, e: ast.Integral, doms: list[ir.Domain],
                    body: ir.Expr | None) -> tuple[ir.Quad, ...]:
        """One rule per variable of the integral: as listed `with (R1, R2)`, one rule for
        all `with R`, or each domain's default."""
        q, n = e.quad, len(e.vars)
        if isinstance(q, tuple):
            if len(q) != n:
                names = ", ".join(b.name for b in e.vars)
                self.fail(f"the integral over {_plural(n, 'variable')} ({names}) has "
                          f"{_plural(len(q), 'rule')}", q[0].span.to(q[-1].span),
                          "write one rule per variable, in order: `with ("
                          + ", ".join(d.kind.entry.default for d in doms) + ")`, or one rule "
                          "for all: `with sum`")
            rules = list(q)
        else:
            rules = [q] * n
        out = self.each(lambda item: self.quadrature(item[0], item[1], item[2].name, body,
                                                     e.span), zip(rules, doms, e.vars))
        if n > 1:
            for quad in out:
                if quad.rule.entry.sampled:
                    self.fail(f"`{quad.rule.value}` samples the points of one domain, but this "
                              f"integral runs over {n} variables", quad.span,
                              "integrate with `montecarlo` over one variable: "
                              "`integral(y: Y) ... with montecarlo(S)`")
        return tuple(out)

    def quadrature(self, q: ast.Quadrature | None, dom: ir.Domain, var: str,
                   body: ir.Expr | None, span: Span) -> ir.Quad:
        """The quadrature of an integral over `dom`; `body` is its integrand (None if that
        failed to check). What each rule takes and where it applies: `itdsl.domains`."""
        if q is None:
            return ir.Quad(rule=ir.QuadRule(dom.kind.entry.default), span=span)
        try:
            rule = ir.QuadRule(q.rule)
        except ValueError:
            self.fail(f"unknown quadrature `{q.rule}`", q.span,
                      did_you_mean(q.rule, [r.value for r in ir.QuadRule]) or
                      "one of: " + ", ".join(r.value for r in ir.QuadRule))
        args = q.args or ()
        positional = [a for a in args if a.key is None]
        keywords = {a.key: a for a in args if a.key is not None}
        if not self.quad_form(q, rule, dom, positional):
            raise _Bad
        entry = rule.entry
        sampled = None
        if entry.own_nodes:
            sampled = next((node for node in (() if body is None else ir.walk(body))
                            if isinstance(node, ir.FieldAt) and var in node.vars), None)
            if sampled is not None:  # reported first: the integrand comes before the rule
                self.error(f"`{rule.value}` evaluates the integrand between the points of "
                           f"`{dom.name}`, but the field `{sampled.field}` is only known at "
                           "them", sampled.span,
                           "use `trapezoid` or `simpson` to integrate sampled fields")
        given = [*zip(entry.positional, positional),
                 *((a, keywords[a.keyword]) for a in entry.args if a.keyword in keywords)]
        values = {a.field: self.attempt(self.quad_arg, a, written.value, var, dom)
                  for a, written in given}
        if sampled is not None or any(v is None for v in values.values()):
            raise _Bad
        return ir.Quad(rule=rule, explicit=True, span=q.span, **values)

    def quad_arg(self, arg, e: ast.Expr, var: str, dom: ir.Domain):
        """One argument of a quadrature, checked as its kind says (`itdsl.domains.Arg`)."""
        if arg.kind == "count":
            return self.count(e, arg.noun or arg.what, arg.limit)
        if arg.kind == "field":
            return self.weights(e, dom)
        return self.importance(e, var, dom)

    def quad_form(self, q: ast.Quadrature, rule: ir.QuadRule, dom: ir.Domain,
                  positional: list[ast.QuadArg]) -> bool:
        """Report a quadrature on a domain it does not work on, or with the wrong arguments;
        say whether it has neither problem."""
        fits = True
        entry = rule.entry
        if not entry.applies_to(dom.kind.value):
            fits = False
            kinds = " or ".join(f"`{k}`" for k in sorted(entry.kinds))
            self.error(f"quadrature `{rule.value}` works only on {kinds} domains, but "
                       f"`{dom.name}` is `{dom.kind.value}`", q.span,
                       f"on `{dom.kind.value}` use " + ", ".join(
                           f"`{r.name}`" for r in rules_on(dom.kind.value)))
        want = entry.positional
        kw_ok = entry.options
        hint = f"write {entry.usage}"
        if len(positional) != len(want) or (q.args is not None and not q.args):
            what = f" ({', '.join(a.what for a in want)})" if want else ""
            fits = False
            self.error(f"quadrature `{rule.value}` takes {_plural(len(want), 'argument')}{what}, "
                       f"got {len(positional)}", q.span, hint)
        seen: set[str] = set()
        for a in q.args or ():
            if a.key is None:
                continue
            if a.key not in kw_ok:
                self.error(f"quadrature `{rule.value}` has no option `{a.key}`", a.span,
                           did_you_mean(a.key, kw_ok) or hint)
                fits = False
            elif a.key in seen:
                self.error(f"the option `{a.key}` of `{rule.value}` is given twice", a.span,
                           hint)
                fits = False
            seen.add(a.key)
        return fits

    def weights(self, w: ast.Expr, dom: ir.Domain) -> str:
        """The input field named by `weights(w)` of an integral over `dom`."""
        f = self.inputs.get(w.id) if isinstance(w, ast.Name) else None
        if f is None:
            self.fail("`weights(w)` needs the name of an input field", w.span,
                      f"declare `input w : {dom.name} -> R` and write `weights(w)`")
        if f.domains != (dom.name,):
            self.fail(f"the weights `{f.name}` live on {' * '.join(f.domains)}, but the "
                      "integral runs "
                      f"over {dom.name}", w.span,
                      f"the weights of an integral over {dom.name} are a field "
                      f"`input {f.name} : {dom.name} -> R`")
        if f.width is not None:
            self.fail(f"the weights `{f.name}` must be a scalar field (R), but `{f.name}` is "
                      f"{_wname(f.width)}", w.span,
                      f"declare `input {f.name} : {dom.name} -> R`")
        return f.name

    def importance(self, e: ast.Expr, var: str, dom: ir.Domain) -> ir.Expr:
        """The importance density of `montecarlo(S, importance = e)`: a scalar of `var`."""
        imp = self.expr(e, _Scope(vars={var: dom.name}, in_output=False))
        if imp.width is not None:
            self.fail(f"the importance must be a scalar, but it is {_wname(imp.width)}", e.span)
        return imp

    def count(self, e: ast.Expr, what: str, limit: int) -> int:
        if not isinstance(e, ast.Number) or e.value != int(e.value) or not 1 <= e.value <= limit:
            got = f", got {e.value:g}" if isinstance(e, ast.Number) else ""
            self.fail(f"{what} must be an integer in [1, {limit}]{got}", e.span,
                      None if isinstance(e, ast.Number) else "write a plain number")
        return int(e.value)

    # ---- calls --------------------------------------------------------------------------

    def e_Call(self, e: ast.Call, scope: _Scope) -> ir.Expr:
        check = self.call_checker(e.func, scope)
        if check is not None:
            return check(e, scope)
        if e.func in scope.vars or e.func not in self.broken:  # else already reported
            self.not_callable(e, scope)
        self.each(self.expr, e.args, scope)  # the arguments may hold errors of their own
        raise _Bad

    def call_checker(self, f: str, scope: _Scope):
        """The method that checks a call of `f`, or None if `f` cannot be called here."""
        if f in scope.vars or f in self.broken:
            return None
        if f in self.inputs:
            return self.field_at
        if f in self.kernels:
            return self.kernel_call
        if f in self.params:
            return None if self.params[f].kind is ParamKind.REAL else self.param_call
        if f in ir.CALL_FNS or f in REDUCE_FNS:
            return self.builtin_call
        return None

    def not_callable(self, e: ast.Call, scope: _Scope) -> None:
        """Report why `e.func` cannot be called."""
        f = e.func
        if f in scope.vars:
            self.error(f"`{f}` is a point, not a function", e.func_span,
                       "fields, kernels, mlps, splines and built-ins are called; a point is not")
        elif f in self.params:
            self.error(f"the param `{f}` is a value, not a function", e.func_span,
                       f"write `{f}` without arguments")
        elif f in self.decl_of:
            what = self._what(f)
            if what == "kernel" and f == self.current:
                self.error(f"the kernel `{f}` calls itself", e.func_span,
                           "a kernel cannot be recursive")
            else:
                self.error(f"`{f}` is {_a(what)} and cannot be called", e.func_span,
                           "a domain is named in a binder, `(x: X)`" if what == "domain" else None)
        elif not self.out_of_scope(f, e.func_span, scope):
            functions = sorted(BUILTINS - {"pi"})  # none of them can be declared
            self.error(f"unknown function `{f}`", e.func_span,
                       self.suggest(f, chain(functions, self.inputs, self.kernels, self.params))
                       or "built-ins: " + ", ".join(functions))

    def arity(self, e: ast.Call, n: int) -> bool:
        """Report a call of `e.func` with other than `n` arguments; say whether it has `n`."""
        if len(e.args) != n:
            self.error(f"`{e.func}` takes {n} argument{'s' if n != 1 else ''}, got {len(e.args)}",
                       e.span)
            return False
        return True

    def builtin_call(self, e: ast.Call, scope: _Scope) -> ir.Expr:
        f = e.func
        fn = ir.CALL_FNS.get(f)
        fits = self.arity(e, FUNCTIONS[f].arity if fn else 2 if f == ir.RFn.DOT.value else 1)
        args = self.each(self.expr, e.args, scope)
        if not fits:
            raise _Bad
        if fn is not None:
            return self.elementwise(fn, args, e.span)
        rfn = REDUCE_FNS[f]
        if rfn is ir.RFn.DOT and args[0].width != args[1].width:
            self.fail(f"`dot` of values of different widths: {_wname(args[0].width)} and "
                      f"{_wname(args[1].width)}", e.span)
        return ir.Reduce(fn=rfn, args=tuple(args), width=None, span=e.span)

    def point_arg(self, a: ast.Expr, scope: _Scope, who: str, domain: str) -> tuple[str, str]:
        """The point variable `a` (an argument of a field or kernel that wants a point of
        `domain`) and its domain."""
        if isinstance(a, ast.Name) and a.id not in scope.vars and \
                self.out_of_scope(a.id, a.span, scope):
            raise _Bad
        if not isinstance(a, ast.Name) or a.id not in scope.vars:
            names = ", ".join(f"`{v}`" for v in scope.vars)
            self.fail(f"{who} must be evaluated at a point variable ({names}), not at an "
                      "expression", a.span,
                      "fields and kernels are known only at the points of their domains; "
                      + self._point_hint(scope, domain))
        return a.id, scope.vars[a.id]

    def field_at(self, e: ast.Call, scope: _Scope) -> ir.Expr:
        field = self.inputs[e.func]
        doms = field.domains
        if len(e.args) != len(doms):
            product = " * ".join(doms)
            self.error(f"`{field.name}` lives on {product}: it is read at "
                       f"{_plural(len(doms), 'point')}, got {len(e.args)}", e.span,
                       f"write `{field.name}(" + ", ".join(
                           next((v for v, d in scope.vars.items() if d == dom), dom.lower())
                           for dom in doms) + ")`, one point per domain, in order")
            self.each(self.expr, e.args, scope)  # the arguments may hold errors of their own
            raise _Bad
        at = self.each(lambda item: self.read_point(item[0], item[1], scope, field, e.span),
                       zip(e.args, doms))
        plain = all(a.var is not None and scope.vars[a.var] == dom for a, dom in zip(at, doms))
        return ir.FieldAt(field=field.name, at=tuple(at), plain=plain, width=field.width,
                          span=e.span)

    def read_point(self, a: ast.Expr, domain: str, scope: _Scope, field: ir.Input,
                   call: Span) -> ir.Affine:
        """The point of `domain` at which `field` is read: a point variable of `domain`, or,
        on an index lattice, an integer affine point `c*q + t - d` of lattice points."""
        dom = self.domains[domain]
        if isinstance(a, ast.Name) and a.id in scope.vars and scope.vars[a.id] == domain:
            return ir.Affine(terms=((1, a.id),))
        if not dom.lattice or dom.fixed is not None:
            if isinstance(a, ast.Name) and a.id in scope.vars:
                one = len(field.domains) == 1
                self.fail(f"`{field.name}` lives on {' * '.join(field.domains)} but `{a.id}` is "
                          f"a point of {scope.vars[a.id]}"
                          + ("" if one else f" (it is read at a point of {domain} here)"),
                          call if one else a.span, self._point_hint(scope, domain))
            self.point_arg(a, scope, f"the field `{field.name}`", domain)  # fails: explains
        terms, offset = self.affine(a, scope, field, dom)
        terms = {v: c for v, c in terms.items() if c != 0}
        big = [x for x in (*terms.values(), offset) if abs(x) > MAX_AFFINE]
        if big:
            self.fail(f"`{field.name}` is read at an affine point with the constant {big[0]:g}, "
                      f"beyond ±{MAX_AFFINE:,} (a point that far is outside any lattice)",
                      a.span, "coefficients and offsets of a read are small integers: "
                      f"`{field.name}(2*q + t - 1)`")
        if not terms:
            self.fail(f"`{field.name}` is read at a constant point", a.span,
                      "read a field at a point that moves: `" + field.name + "(p + t)`")
        return ir.Affine(terms=tuple((c, v) for v, c in terms.items()), offset=offset)

    def affine(self, a: ast.Expr, scope: _Scope, field: ir.Input,
               dom: ir.Domain) -> tuple[dict[str, int], int]:
        """`a` as Σ c·var + d with integer c and d and variables of lattices (index or
        stencil) of the same number of axes as `dom`."""
        usage = (f"an index lattice is read at an integer affine point, `{field.name}(p + t)`, "
                 f"`{field.name}(2*q + t - 1)`: points of lattices and stencils, integer "
                 "coefficients and offsets")
        if isinstance(a, ast.Number):
            if a.value != int(a.value):
                self.fail(f"`{field.name}` is read at a non-integer point ({a.value:g} is not "
                          "an integer)", a.span, usage)
            return {}, int(a.value)
        if isinstance(a, ast.Name) and a.id in scope.vars:
            vdom = self.domains[scope.vars[a.id]]
            if not vdom.lattice:
                self.fail(f"`{field.name}` is read at a non-integer point: `{a.id}` is a point of "
                          f"the {vdom.kind.value} `{vdom.name}`", a.span, usage)
            if vdom.coord_width != dom.coord_width:
                k, want = vdom.coord_width or 1, dom.coord_width or 1
                self.fail(f"`{a.id}` is a point of {_plural(k, 'axis').replace('axiss', 'axes')}"
                          f" but `{dom.name}` has {want}", a.span, usage)
            return {a.id: 1}, 0
        if isinstance(a, ast.Neg):
            t, d = self.affine(a.operand, scope, field, dom)
            return {v: -c for v, c in t.items()}, -d
        if isinstance(a, ast.Binary) and a.op in (ast.BinOp.ADD, ast.BinOp.SUB):
            (t1, d1), (t2, d2) = self.each(lambda x: self.affine(x, scope, field, dom),
                                           (a.left, a.right))
            sign = 1 if a.op is ast.BinOp.ADD else -1
            out = dict(t1)
            for v, c in t2.items():
                out[v] = out.get(v, 0) + sign * c
            return out, d1 + sign * d2
        if isinstance(a, ast.Binary) and a.op is ast.BinOp.MUL:
            (t1, d1), (t2, d2) = self.each(lambda x: self.affine(x, scope, field, dom),
                                           (a.left, a.right))
            if t1 and t2:
                self.fail(f"`{field.name}` is read at a product of points", a.span, usage)
            (t, d), k = ((t1, d1), d2) if not t2 else ((t2, d2), d1)
            return {v: c * k for v, c in t.items()}, d * k
        if isinstance(a, ast.Name) and a.id not in scope.vars:
            self.expr(a, scope)  # an unknown or misplaced name: its own error
        self.fail(f"`{field.name}` must be read at an integer affine point, not at this "
                  "expression", a.span, usage)

    def _point_hint(self, scope: _Scope, domain: str) -> str | None:
        same = [v for v, d in scope.vars.items() if d == domain]
        if same:
            return f"evaluate it at `{same[0]}`, the point of {domain} here"
        return f"integrate over its domain: `integral(y: {domain}) ...`"

    def kernel_call(self, e: ast.Call, scope: _Scope) -> ir.Expr:
        k = self.kernels[e.func]
        if not self.arity(e, 2):
            raise _Bad
        points = ((k.x, k.x_domain), (k.y, k.y_domain))
        x, y = self.each(self.kernel_arg, zip(e.args, points), scope, k)
        self.inlined += self.kernel_size[k.name]
        if self.inlined > MAX_IR_NODES:
            self.fail(f"this expression grows past {MAX_IR_NODES} nodes once its kernels are "
                      "inlined", e.span, "kernels are inlined at every call; call a kernel that "
                      "calls other kernels fewer times")
        return _rename(k.body, {k.x: x, k.y: y})

    def kernel_arg(self, arg_and_param, scope: _Scope, k: ir.Kernel) -> str:
        """The point variable passed to kernel `k` for one of its parameters."""
        a, (_, dom) = arg_and_param
        var, vdom = self.point_arg(a, scope, f"the kernel `{k.name}`", dom)
        if vdom != dom:
            self.fail(f"kernel `{k.name}` takes a point of {dom} here, but `{var}` is a point "
                      f"of {vdom}", a.span, self._point_hint(scope, dom))
        return var

    def param_call(self, e: ast.Call, scope: _Scope) -> ir.Expr:
        p = self.params[e.func]
        if p.kind is ParamKind.MLP:
            args = self.each(self.expr, e.args, scope)
            total = sum(1 if a.width is None else a.width for a in args)
            if total != p.sizes[0]:
                shown = " + ".join(str(1 if a.width is None else a.width) for a in args) or "0"
                self.fail(f"the mlp `{p.name}` takes {p.sizes[0]} inputs, but its arguments have "
                          f"{shown} = {total}", e.span,
                          "the arguments are concatenated; their widths must add up to the "
                          "mlp's input width")
            out = p.sizes[-1]
            return ir.MlpCall(param=p.name, args=tuple(args), width=None if out == 1 else out,
                              span=e.span)
        want = len(p.sizes) + (p.per is not None)
        fits = len(e.args) == want
        if not fits:
            what = _plural(len(p.sizes), 'variable')
            if p.per is not None:
                what += f" and a point of {p.per}"
            self.error(f"the spline `{p.name}` is a function of {what}, got "
                       f"{_plural(len(e.args), 'argument')}", e.span,
                       f"`{p.name}` is declared `{_spline_text(p)}`")
        coords = e.args[:len(p.sizes)] if p.per is not None and fits else e.args
        args = self.each(self.spline_arg, coords, scope)
        if not fits:
            raise _Bad
        at = None
        if p.per is not None:
            at, dom = self.point_arg(e.args[-1], scope, f"the spline `{p.name}`'s last argument",
                                     p.per)
            if dom != p.per:
                self.fail(f"the last argument of `{p.name}` is a point of {p.per}, but `{at}` "
                          f"is a point of {dom}", e.args[-1].span,
                          self._point_hint(scope, p.per))
        return ir.SplineCall(param=p.name, args=tuple(args), at=at, width=None, span=e.span)

    def spline_arg(self, a: ast.Expr, scope: _Scope) -> ir.Expr:
        arg = self.expr(a, scope)
        if arg.width is not None:
            self.fail(f"a spline argument must be a scalar in [0, 1], but this is "
                      f"{_wname(arg.width)}", a.span)
        return arg


def _spline_text(p: ir.Param) -> str:
    per = "" if p.per is None else f", per = {p.per}"
    return "spline(" + ", ".join(map(str, p.sizes)) + per + ")"


def _rename(e: ir.Expr, renames: dict[str, str]) -> ir.Expr:
    """`e` with its point variables renamed (kernel inlining)."""
    if isinstance(e, ir.Coord):
        return replace(e, var=renames.get(e.var, e.var))
    if isinstance(e, ir.FieldAt):
        return replace(e, at=tuple(
            ir.Affine(terms=tuple((c, renames.get(v, v)) for c, v in a.terms), offset=a.offset)
            for a in e.at))
    if isinstance(e, ir.SplineCall) and e.at is not None:
        return replace(e, args=tuple(_rename(a, renames) for a in e.args),
                       at=renames.get(e.at, e.at))
    if isinstance(e, ir.Op | ir.Reduce | ir.MlpCall | ir.SplineCall):
        return replace(e, args=tuple(_rename(a, renames) for a in e.args))
    if isinstance(e, ir.Component):
        return replace(e, arg=_rename(e.arg, renames))
    return e


def check(prog: ast.Program) -> ir.Program:
    """Check a parsed program; raise `CheckError` (or several together) if it is invalid."""
    return Checker().program(prog)
