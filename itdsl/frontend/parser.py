"""Text -> AST: lark parses with positions on, then `_Builder` makes the AST.

Lark's own exceptions never leave this module: they are relabelled into
`ParseError`s that say what was expected in words and point at the file.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import lark
from lark import Token, Tree

from ..domains import KINDS, RULES, DeclarationError
from ..domains.entry import fmt
from ..errors import ItdslError, ParseError, Span, did_you_mean, raise_all
from ..functions import ACTIVATIONS
from . import ast

MAX_SOURCE_BYTES = 1 << 20  # 1 MiB of .it text is far beyond any real operator
MAX_DEPTH = 128  # nesting of the syntax tree (chains of operators), and of brackets
MAX_INIT_RANGE = 1e38  # b - a of `uniform(a, b)`: torch refuses a float32 range wider than this
MAX_INIT = 3.4028234663852886e38  # the largest float32: params are created in float32

DOMAIN_KINDS = {k.value: k for k in ast.DomainKind}
PARAM_CTORS = ("mlp", "spline")
INIT_KINDS = {"normal": 1, "uniform": 2}
DECL_WORDS = ("domain", "input", "param", "kernel", "output")
QUAD_WORDS = tuple(RULES)
RESERVED = ("operator", *DECL_WORDS, "integral", "with", "and", "or")

UNICODE_LOOKALIKES = {
    "\u2212": "a Unicode minus sign; write `-`", "\u00d7": "a multiplication sign; write `*`",
    "\u00b7": "a middle dot; write `*`", "\u2264": "a Unicode `≤`; write `<=`",
    "\u2265": "a Unicode `≥`; write `>=`", "\u2260": "a Unicode `≠`; write `!=`",
    "\u00a0": "a non-breaking space; write a plain space",
    "\u2018": "a curly quote", "\u2019": "a curly quote", "\u201c": "a curly quote",
    "\u201d": "a curly quote", "\u222b": "an integral sign; write `integral(y: Y) ...`",
}


def _either(words) -> str:
    """"a, b or c"."""
    words = list(words)
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else "".join(words)


@lru_cache(maxsize=1)
def _lark() -> lark.Lark:
    # The basic (not contextual) lexer: a keyword is always lexed as a keyword, so that a
    # reserved word used as a name is a parse error (`_token_error` says so) instead of
    # slipping through as a NAME wherever the parser happens to expect one.
    # cache=True: lark keeps the built tables in a temporary file keyed by the grammar
    return lark.Lark.open(str(Path(__file__).with_name("grammar.lark")), parser="lalr", cache=True,
                          lexer="basic", propagate_positions=True, maybe_placeholders=True)


def parse(source: str, filename: str = "<string>") -> ast.Program:
    """Parse `.it` text into an AST; raise `ParseError` (or several) on bad input."""
    if not isinstance(source, str):
        raise ParseError(f"expected the program text as a str, got {type(source).__name__}")
    if len(source.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
        raise ParseError(f"{filename}: file is larger than {MAX_SOURCE_BYTES} bytes",
                         hint="an .it file holds operator definitions, not data")
    if "\x00" in source:
        pos = source.index("\x00")
        line = source.count("\n", 0, pos) + 1
        col = pos - (source.rfind("\n", 0, pos) + 1) + 1
        raise ParseError("the file contains a NUL byte (is it a binary file?)",
                         Span(file=filename, line=line, col=col, end_line=line, end_col=col + 1,
                              source=source))
    tree = _parse_tree(source, filename)
    _check_depth(tree, source, filename)
    return _Builder(source, filename).program(tree)


def parse_file(path: str | Path) -> ast.Program:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_SOURCE_BYTES:
            raise ParseError(f"{path}: file is larger than {MAX_SOURCE_BYTES} bytes",
                             hint="an .it file holds operator definitions, not data")
        text = path.read_text(encoding="utf-8-sig")  # a byte order mark is not text
    except ItdslError:
        raise
    except UnicodeDecodeError as e:
        raise ParseError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ParseError(f"cannot read {path}: {e.strerror or e}") from None
    return parse(text, str(path))


# ---- lark's parse, with the nesting of brackets capped ------------------------

_OPENERS = ("LPAR", "LSQB")
_CLOSERS = ("RPAR", "RSQB")


def _parse_tree(source: str, filename: str) -> Tree:
    """Lark's parse tree of `source`, fed to its LALR parser one token at a time.

    Parentheses add no level to the tree (`(e)` is `e`), so `_check_depth` cannot see them;
    they are counted here, as they are read, so that 100,000 `(` fail at the first one past
    the cap instead of after lark has read them all."""
    ip = _lark().parse_interactive(source)
    depth, tok = 0, None
    try:
        for tok in ip.lexer_thread.lex(ip.parser_state):
            ip.feed_token(tok)  # first, so that a token out of place is reported as such
            if tok.type in _OPENERS:
                depth += 1
                if depth > MAX_DEPTH:
                    raise ParseError(
                        f"expression nested more than {MAX_DEPTH} levels deep",
                        _span_at(source, filename, tok.line, tok.column),
                        f"parentheses and brackets nest at most {MAX_DEPTH} deep: drop "
                        "redundant ones, or split the expression into several kernels")
            elif tok.type in _CLOSERS:
                depth -= 1
        return ip.feed_eof(tok)
    except lark.exceptions.UnexpectedInput as e:
        e.interactive_parser = ip  # as lark's own loop does: `_relabel` asks what it accepts
        raise _relabel(e, source, filename) from None


# ---- relabelling lark errors -------------------------------------------------

_OPERATORS = {"PLUS", "MINUS", "STAR", "SLASH", "CIRCUMFLEX"}


def _describe_token(tok: Token) -> str:
    return "end of file" if tok.type == "$END" else f"`{tok.value}`"


def _literal(term: str) -> str:
    try:
        pat = _lark().get_terminal(term).pattern
    except KeyError:
        return term.lower()
    if isinstance(pat, lark.lexer.PatternStr):
        return f"`{pat.value}`"
    return {"NAME": "a name", "NUMBER": "a number"}.get(term, term.lower())


def _describe_expected(expected: set[str]) -> str:
    """Say in words what the parser would have accepted."""
    expected = {t for t in expected if not t.startswith("$")}
    parts: list[str] = []
    if "NUMBER" in expected and "NAME" in expected:
        parts.append("an expression")
        expected -= {"NUMBER", "NAME", "LPAR", "MINUS", "LSQB", "INTEGRAL"}
    if expected & _OPERATORS:
        parts.append("an operator (`+ - * / ^`)")
        expected -= _OPERATORS | {"LSQB", "LPAR"}
    if "CMP" in expected:
        parts.append("a comparison (`<`, `<=`, `==`, ...)")
        expected -= {"CMP"}
    decls = {t for t in expected if t.lower() in DECL_WORDS}
    if decls and "RBRACE" in expected:
        parts.append("a declaration (`domain`, `input`, `param`, `kernel`, `output`) or `}`")
        expected -= decls | {"RBRACE"}
    parts.extend(sorted(_literal(t) for t in expected))
    if not parts:
        return "nothing more"
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " or " + parts[-1]


def _span_at(source: str, filename: str, line: int, col: int, width: int = 1) -> Span:
    return Span(file=filename, line=line, col=col, end_line=line, end_col=col + max(1, width),
                source=source)


def _relabel(e: lark.exceptions.UnexpectedInput, source: str, filename: str) -> ParseError:
    line, col = max(1, e.line or 1), max(1, e.column or 1)
    if isinstance(e, lark.exceptions.UnexpectedCharacters):
        ch = source[e.pos_in_stream] if e.pos_in_stream < len(source) else ""
        two = source[e.pos_in_stream:e.pos_in_stream + 2]
        hint = {"&&": "write `and`", "||": "write `or`", "**": "write powers with `^`"}.get(two)
        if hint is None and ch == "!":
            hint = "write `!=` for 'not equal'; there is no `not`"
        if hint is None and ch in "'\"":
            hint = "the language has no strings"
        if hint is None and ch == ";":
            hint = "declarations need no separator; put each on its own line"
        if hint is None and ch in UNICODE_LOOKALIKES:
            hint = f"this is {UNICODE_LOOKALIKES[ch]}"
        elif hint is None and not ch.isascii():
            hint = "outside comments, `.it` text is ASCII"
        shown = repr(ch)[1:-1] if not ch.isprintable() or ch.isspace() else ch
        return ParseError(f"unexpected character `{shown}`", _span_at(source, filename, line, col),
                          hint)
    if isinstance(e, lark.exceptions.UnexpectedToken):
        tok = e.token
        if tok.type == "$END":  # point just after the last non-blank text
            text = source.rstrip()
            line = text.count("\n") + 1
            col = len(text) - (text.rfind("\n") + 1) + 1
            span = _span_at(source, filename, line, col)
        else:
            span = _span_at(source, filename, line, col, len(str(tok.value)))
        expected = set(e.expected)
        # LALR's table over-approximates; ask the parser what it really accepts here (any
        # failure just keeps the table's answer).
        with contextlib.suppress(Exception):
            expected = set(e.interactive_parser.accepts()) or expected
        return _token_error(tok, expected, span, source)
    return ParseError("unexpected end of file", _span_at(source, filename, line, col))


def _token_error(tok: Token, expected: set[str], span: Span, source: str) -> ParseError:
    want = _describe_expected(expected)
    value = str(tok.value)
    if tok.type == "$END":
        hint = "an `operator` block is missing its closing `}`" if "RBRACE" in expected else None
        return ParseError(f"unexpected end of file; expected {want}", span, hint)
    if value in RESERVED and "NAME" in expected:
        if "NUMBER" in expected and value in ("operator", *DECL_WORDS):
            return ParseError(f"unexpected `{value}`; expected {want}", span,
                              "the expression before it is incomplete")
        return ParseError(f"`{value}` is a reserved word and cannot be used as a name", span,
                          "choose another name")
    hint = None
    offset = span_offset(source, span)
    if tok.type == "STAR" and source[offset - 1:offset] == "*":
        return ParseError("`**` is not an operator",
                          replace(span, col=span.col - 1, end_col=span.col + 1),
                          "write powers with `^`: `x^2`")
    elif tok.type == "EQUAL" and "CMP" in expected:
        hint = "compare with `==`"
    elif expected - {"$END"} == {"OPERATOR"}:  # between operator blocks
        if value in DECL_WORDS:
            hint = f"a `{value}` declaration goes inside an `operator NAME {{ ... }}` block"
        elif tok.type == "RBRACE":
            hint = "this `}` closes no `operator` block"
        else:
            hint = "a file holds `operator NAME { ... }` blocks; comments start with `#`"
    elif tok.type == "NAME" and value in QUAD_WORDS and "STAR" in expected:
        hint = f"a quadrature follows `with` after an integral: `... with {value}`"
    elif tok.type == "NAME" and "LBRACE" in expected:
        hint = "an operator name is one word"
    elif tok.type == "NAME" and "RBRACE" in expected and "DOMAIN" in expected:
        hint = did_you_mean(value, DECL_WORDS)
        if hint is None and ("STAR" in expected or "PLUS" in expected):
            hint = "write multiplication explicitly with `*`"
        if hint is None:
            hint = "declarations are `domain`, `input`, `param`, `kernel` and `output`"
    elif tok.type in ("NAME", "NUMBER", "LPAR") and ("STAR" in expected or "PLUS" in expected):
        hint = "write multiplication explicitly with `*`"
    elif tok.type == "WITH":
        hint = "`with` follows an integral: `integral(y: Y) k(x, y) * f(y) with mean`"
    elif tok.type == "OPERATOR" and "RBRACE" in expected:
        hint = "the previous `operator` block is missing its closing `}`"
    return ParseError(f"unexpected {_describe_token(tok)}; expected {want}", span, hint)


def span_offset(source: str, span: Span) -> int:
    """The character offset of a span's start in `source`."""
    off = 0
    for _ in range(span.line - 1):
        nl = source.find("\n", off)
        if nl < 0:
            break
        off = nl + 1
    return off + span.col - 1


def _check_depth(tree: Tree, source: str, filename: str) -> None:
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            meta = node.meta
            span = _span_at(source, filename, getattr(meta, "line", 1), getattr(meta, "column", 1))
            raise ParseError(f"expression nested more than {MAX_DEPTH} levels deep", span,
                             "split it into several kernels")
        # The factors of an integrand and the links of a comparison chain are one flat node
        # here but become left-deep chains (of products, of `and`s) later: count them so.
        step = len(node.children) if node.data in ("integrand", "compare") else 1
        # Leftmost child first, so that a long chain `a + b + ...` is reported where it starts.
        stack.extend((c, depth + step) for c in reversed(node.children) if isinstance(c, Tree))


# ---- parse tree -> AST -------------------------------------------------------------


class _Builder:
    """Builds the AST from lark's tree, collecting every error it finds."""

    def __init__(self, source: str, filename: str):
        self.source = source
        self.filename = filename
        self.errors: list[ItdslError] = []

    # spans -----------------------------------------------------------------
    def span(self, node: Tree | Token) -> Span:
        if isinstance(node, Token):
            return Span(file=self.filename, line=node.line, col=node.column,
                        end_line=node.end_line, end_col=node.end_column, source=self.source)
        m = node.meta
        if getattr(m, "empty", True):
            return Span(file=self.filename, source=self.source)
        return Span(file=self.filename, line=m.line, col=m.column, end_line=m.end_line,
                    end_col=m.end_column, source=self.source)

    def error(self, message: str, where: Tree | Token | Span, hint: str | None = None) -> None:
        span = where if isinstance(where, Span) else self.span(where)
        self.errors.append(ParseError(message, span, hint))

    # program -------------------------------------------------------------------
    def program(self, tree: Tree) -> ast.Program:
        ops = tuple(self.operator(t) for t in tree.children)
        raise_all(self.errors)
        return ast.Program(operators=ops, span=self.span(tree))

    def operator(self, t: Tree) -> ast.Operator:
        name, *decls = t.children
        built = tuple(d for d in (self.decl(d) for d in decls) if d is not None)
        return ast.Operator(name=str(name), decls=built, span=self.span(t),
                            name_span=self.span(name))

    def decl(self, t: Tree) -> ast.Decl | None:
        return getattr(self, t.data)(t)

    def domain_decl(self, t: Tree) -> ast.Decl | None:
        name, kind, args = t.children
        common = {"name": str(name), "span": self.span(t), "name_span": self.span(name)}
        k = DOMAIN_KINDS.get(str(kind))
        if k is None:
            self.error(f"unknown domain kind `{kind}`", kind,
                       did_you_mean(str(kind), DOMAIN_KINDS) or
                       "a domain is " + _either(f"`{k.usage}`" for k in KINDS.values()))
            return None
        argv = [] if args is None else list(args.children)
        want, usage = k.entry.arity, k.entry.usage
        if len(argv) not in want:
            counts = _either(map(str, want))
            self.error(f"`{kind}` takes {counts} argument{'s' if want != (1,) else ''}, got "
                       f"{len(argv)}", kind, f"write `{usage}`")
            return None
        vals = [self.domain_arg(a) for a in argv]
        if any(v is None for v in vals):
            return None
        try:
            fields = k.entry.declare(vals)
        except DeclarationError as e:
            self.error(e.message, argv[e.arg] if e.arg is not None else kind, e.hint)
            return None
        return ast.DomainDecl(kind=k, **fields, **common)

    def domain_arg(self, t: Tree | Token) -> float | tuple[float, ...] | None:
        """A declaration's argument: a constant, or a tuple of constants `(a, b)`."""
        if isinstance(t, Tree) and t.data == "tuple":
            items = [self.constant(c) for c in t.children]
            return None if any(v is None for v in items) else tuple(items)
        return self.constant(t)

    def input_decl(self, t: Tree) -> ast.Decl | None:
        name, domains, vtype = t.children
        width = self.value_type(vtype)
        if width is False:
            return None
        return ast.InputDecl(name=str(name), domains=tuple(str(d) for d in domains.children),
                             width=width, span=self.span(t), name_span=self.span(name),
                             domain_span=self.span(domains))

    def value_type(self, t: Tree) -> int | None | bool:
        """`R` -> None, `R^C` -> C; False after reporting an error."""
        base, exp = t.children
        if str(base) != "R":
            self.error(f"unknown value type `{base}`", base, "a value is `R` or `R^C`")
            return False
        if exp is None:
            return None
        width = self.positive_int(_number(exp), exp, "a vector width", 1 << 16)
        return False if width is None else width

    def param_decl(self, t: Tree) -> ast.Decl | None:
        name, ptype, init = t.children
        common = {"name": str(name), "span": self.span(t), "name_span": self.span(name)}
        init_v = None if init is None else self.init(init)
        if ptype.data == "param_real":
            width = self.value_type(ptype)
            if width is False:
                return None
            if init_v is not None and init_v.kind == "uniform" and init_v.args[0] >= init_v.args[1]:
                self.error("uniform(a, b) needs a < b", init)
            return ast.ParamDecl(kind=ast.ParamKind.REAL, width=width, init=init_v, **common)
        ctor, args = ptype.children
        ctor_s = str(ctor)
        if ctor_s not in PARAM_CTORS:
            self.error(f"unknown param type `{ctor_s}`", ctor,
                       did_you_mean(ctor_s, PARAM_CTORS) or
                       "a param is `R`, `R^C`, `mlp(I -> H -> O, act = gelu)` or `spline(n1, n2)`")
            return None
        sizes_args = [a for a in args.children if a.data == "ptype_sizes"]
        options = [a for a in args.children if a.data == "ptype_option"]
        if init_v is not None and init_v.kind == "const":
            self.error(f"{_a(ctor_s)} `{ctor_s}` param takes a random initialiser, not a constant",
                       init,
                       "write `= normal(0.02)` or `= uniform(-0.1, 0.1)`, or leave it out")
        if ctor_s == "mlp":
            if len(sizes_args) != 1 or len(sizes_args[0].children) < 2:
                self.error("an mlp needs its layer widths as `I -> H -> ... -> O`", ptype,
                           "e.g. `mlp(68 -> 64 -> 32, act = gelu)`")
                return None
            sizes = [self.positive_int(_number(n), n, "a layer width", 1 << 14)
                     for n in sizes_args[0].children]
            act, given = "gelu", False
            for opt in options:
                key, val = (str(c) for c in opt.children)
                if key != "act":
                    self.error(f"unknown mlp option `{key}`", opt.children[0],
                               "the option is `act`")
                elif given:
                    self.error("the option `act` is given twice", opt.children[0],
                               "an mlp has one activation")
                elif val not in ACTIVATIONS:
                    self.error(f"unknown activation `{val}`", opt.children[1],
                               did_you_mean(val, ACTIVATIONS) or
                               "one of: " + ", ".join(sorted(ACTIVATIONS)))
                else:
                    act = val
                given = given or key == "act"
            if any(s is None for s in sizes):
                return None
            return ast.ParamDecl(kind=ast.ParamKind.MLP, sizes=tuple(sizes), act=act,
                                 init=init_v, **common)
        # spline(n1) or spline(n1, n2), optionally `per = T`
        per, per_span = None, None
        for opt in options:
            key, val = opt.children
            if str(key) != "per":
                self.error(f"unknown spline option `{key}`", key,
                           "the option is `per = T`: one spline per point of the domain T")
                return None
            if per is not None:
                self.error("the option `per` is given twice", key, "a spline has one `per`")
                return None
            per, per_span = str(val), self.span(val)
        if not 1 <= len(sizes_args) <= 2 or any(len(a.children) != 1 for a in sizes_args):
            self.error("a spline is `spline(n)`, `spline(n1, n2)` or `spline(n1, n2, per = T)`",
                       ptype)
            return None
        sizes = [self.positive_int(_number(a.children[0]), a, "a spline size", 4096, minimum=2)
                 for a in sizes_args]
        if any(s is None for s in sizes):
            return None
        extra = {} if per is None else {"per": per, "per_span": per_span}
        return ast.ParamDecl(kind=ast.ParamKind.SPLINE, sizes=tuple(sizes), init=init_v,
                             **extra, **common)

    def init(self, t: Tree) -> ast.Init | None:
        span = self.span(t)
        if isinstance(t, Tree) and t.data == "call":
            fname, args = t.children
            argv = [] if args is None else list(args.children)
            fn = str(fname)
            if fn not in INIT_KINDS:
                self.error(f"unknown initialiser `{fn}`", fname,
                           did_you_mean(fn, INIT_KINDS) or
                           "an initial value is a number, `normal(std)` or `uniform(a, b)`")
                return None
            usage = {"normal": "normal(std)", "uniform": "uniform(a, b)"}[fn]
            if len(argv) != INIT_KINDS[fn]:
                n = INIT_KINDS[fn]
                self.error(f"`{fn}` takes {n} argument{'s' if n != 1 else ''}, got {len(argv)}", t,
                           f"write `{usage}`")
                return None
            vals = [self.constant(a) for a in argv]
            if any(v is None for v in vals):
                return None
            if fn == "normal" and vals[0] < 0:
                self.error("the standard deviation of `normal` must be >= 0", argv[0])
                return None
            if fn == "normal" and vals[0] > MAX_INIT:
                self.error(f"the standard deviation {vals[0]:g} of `normal` is beyond the "
                           "largest float32 (3.4e38): params are created in float32", argv[0])
                return None
            if fn == "uniform" and not vals[0] <= vals[1]:
                self.error(f"`uniform(a, b)` needs a <= b, got uniform({_fmt(vals[0])}, "
                           f"{_fmt(vals[1])})", t, f"write `uniform({_fmt(vals[1])}, "
                           f"{_fmt(vals[0])})`")
                return None
            if fn == "uniform" and not vals[1] - vals[0] <= MAX_INIT_RANGE:
                self.error(f"the range of `uniform` is wider than {MAX_INIT_RANGE:g}, more than "
                           "a float32 param can hold", t)
                return None
            return ast.Init(kind=fn, args=tuple(vals), span=span)
        value = self.constant(t)
        if value is not None and abs(value) > MAX_INIT:
            self.error(f"the initial value {value:g} is beyond the largest float32 (3.4e38): "
                       "params are created in float32", t,
                       "leave it out and set it on the module in float64: "
                       "`op.double(); op.p.data.fill_(...)`")
            return None
        return None if value is None else ast.Init(kind="const", args=(value,), span=span)

    def kernel_decl(self, t: Tree) -> ast.Decl:
        name, b1, b2, body = t.children
        return ast.KernelDecl(name=str(name), params=(self.binder(b1), self.binder(b2)),
                              body=self.expr(body), span=self.span(t), name_span=self.span(name))

    def output_decl(self, t: Tree) -> ast.Decl:
        name, b, body = t.children
        return ast.OutputDecl(name=str(name), vars=self.binders(b), body=self.expr(body),
                              span=self.span(t), name_span=self.span(name))

    def binders(self, t: Tree) -> tuple[ast.Binder, ...]:
        return tuple(self.binder(b) for b in t.children)

    def binder(self, t: Tree) -> ast.Binder:
        name, domain = t.children
        return ast.Binder(name=str(name), domain=str(domain), span=self.span(t))

    # constants -------------------------------------------------------------------
    def constant(self, t: Tree | Token) -> float | None:
        """Fold a constant expression (numbers, + - * / ^, `pi`); report it and return None
        if it is not one."""
        n_errors = len(self.errors)
        try:
            value = _fold(self.expr(t))
        except _NotConstant as e:
            self.error("expected a constant number here", e.span or self.span(t),
                       "only numbers, `pi` and + - * / ^ are allowed")
            return None
        # A number out of range is reported (and read as 0) by `e_number`: report nothing more
        return None if len(self.errors) != n_errors else value

    def positive_int(self, value: float | None, where, what: str, limit: int,
                     minimum: int = 1) -> int | None:
        if value is None:
            return None
        if not math.isfinite(value) or value != int(value) or not minimum <= value <= limit:
            self.error(f"{what} must be an integer in [{minimum}, {limit}], got {_fmt(value)}",
                       where)
            return None
        return int(value)

    # expressions -------------------------------------------------------------------
    def expr(self, t: Tree | Token) -> ast.Expr:
        if isinstance(t, Token):  # an inlined NUMBER inside ptype args etc.
            return ast.Number(value=_number(t), span=self.span(t))
        return getattr(self, "e_" + t.data.rstrip("_"))(t)

    def _binary(self, op: ast.BinOp, t: Tree) -> ast.Expr:
        left, right = t.children
        return ast.Binary(op=op, left=self.expr(left), right=self.expr(right), span=self.span(t))

    def e_add(self, t): return self._binary(ast.BinOp.ADD, t)
    def e_sub(self, t): return self._binary(ast.BinOp.SUB, t)
    def e_mul(self, t): return self._binary(ast.BinOp.MUL, t)
    def e_div(self, t): return self._binary(ast.BinOp.DIV, t)
    def e_pow(self, t): return self._binary(ast.BinOp.POW, t)

    def e_neg(self, t):
        return ast.Neg(operand=self.expr(t.children[0]), span=self.span(t))

    def e_number(self, t):
        tok = t.children[0]
        value = _number(tok)
        if not math.isfinite(value):
            self.error(f"number `{tok}` is out of range", tok)
            value = 0.0
        return ast.Number(value=value, span=self.span(t))

    def e_name(self, t):
        return ast.Name(id=str(t.children[0]), span=self.span(t))

    def e_call(self, t):
        fname, args = t.children
        argv = () if args is None else tuple(self.expr(a) for a in args.children)
        return ast.Call(func=str(fname), args=argv, span=self.span(t), func_span=self.span(fname))

    def e_component(self, t):
        base, idx = t.children
        index = self.positive_int(_number(idx), idx, "a component index", 1 << 16, minimum=0)
        return ast.Component(base=self.expr(base), index=index or 0, span=self.span(t))

    def e_bracket(self, t):
        return ast.Bracket(cond=self.expr(t.children[0]), span=self.span(t))

    def e_or(self, t):
        left, right = t.children
        return ast.Logic(op=ast.BoolOp.OR, left=self.expr(left), right=self.expr(right),
                         span=self.span(t))

    def e_and(self, t):
        left, right = t.children
        return ast.Logic(op=ast.BoolOp.AND, left=self.expr(left), right=self.expr(right),
                         span=self.span(t))

    def e_compare(self, t):
        kids = t.children
        operands = tuple(self.expr(k) for k in kids[0::2])
        ops = tuple(ast.CmpOp(str(k)) for k in kids[1::2])
        return ast.Compare(ops=ops, operands=operands, span=self.span(t))

    def e_tuple(self, t):
        return ast.Tuple(items=tuple(self.expr(c) for c in t.children), span=self.span(t))

    def e_open_integral(self, t):
        binders, integrand = t.children
        return ast.Integral(vars=self.binders(binders), body=self.integrand(integrand),
                            quad=None, span=self.span(t))

    def e_closed_integral(self, t):
        binders, integrand, quad = t.children
        q = (tuple(self.quadrature(c) for c in quad.children) if quad.data == "quad_list"
             else self.quadrature(quad))
        return ast.Integral(vars=self.binders(binders), body=self.integrand(integrand),
                            quad=q, span=self.span(t))

    def integrand(self, t: Tree) -> ast.Expr:
        factors = [self.expr(c) for c in t.children]
        out = factors[0]
        for f in factors[1:]:
            out = ast.Binary(op=ast.BinOp.MUL, left=out, right=f, span=out.span.to(f.span))
        return out

    def quadrature(self, t: Tree) -> ast.Quadrature:
        name, qargs = t.children
        args = None
        if qargs is not None:
            args = []
            for a in qargs.children:
                if isinstance(a, Tree) and a.data == "kwarg":
                    key, value = a.children
                    args.append(ast.QuadArg(key=str(key), value=self.expr(value),
                                            span=self.span(a)))
                else:
                    e = self.expr(a)
                    args.append(ast.QuadArg(key=None, value=e, span=e.span))
            args = tuple(args)
        return ast.Quadrature(rule=str(name), args=args, span=self.span(t))




class _NotConstant(Exception):
    def __init__(self, span: Span | None):
        self.span = span


def _fold(e: ast.Expr) -> float:
    """Evaluate a constant expression without `eval`."""
    if isinstance(e, ast.Number):
        return e.value
    if isinstance(e, ast.Name) and e.id == "pi":
        return math.pi
    if isinstance(e, ast.Neg):
        return -_fold(e.operand)
    if isinstance(e, ast.Binary):
        a, b = _fold(e.left), _fold(e.right)
        try:
            v = {ast.BinOp.ADD: lambda: a + b, ast.BinOp.SUB: lambda: a - b,
                 ast.BinOp.MUL: lambda: a * b, ast.BinOp.DIV: lambda: a / b,
                 ast.BinOp.POW: lambda: float(a) ** b if abs(b) <= 64 else math.inf}[e.op]()
        except (ZeroDivisionError, OverflowError, ValueError):
            raise _NotConstant(e.span) from None
        if isinstance(v, complex) or not math.isfinite(v):
            raise _NotConstant(e.span)
        return float(v)
    raise _NotConstant(e.span)


def _number(tok: Token) -> float:
    text = str(tok)
    try:
        return float(text)
    except ValueError:  # pragma: no cover - the lexer only yields valid numbers
        return math.nan


def _a(word: str) -> str:
    """The indefinite article for `word` ("an mlp", "a spline")."""
    return "an" if word[:1].lower() in "aeio" or word == "mlp" else "a"


_fmt = fmt  # a number in a message as written
