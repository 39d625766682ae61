"""The `itdsl` command line: check, explain, compile, cache, bench.

Errors in a user's program are printed as `file:line:col: error: ...` with the
source line and a caret; the exit status is 1. No Python traceback is ever
shown for them; an internal failure says so and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields, is_dataclass
from enum import Enum
from pathlib import Path

from .errors import ItdslError, Span

EMITS = ("ast", "it", "ir", "tir", "cuda")


def _dump_ast(node, indent: int = 0) -> list[str]:
    """An indented dump of an AST, each node with its line:col."""
    pad = "  " * indent
    if not is_dataclass(node):
        return [pad + (node.value if isinstance(node, Enum) else repr(node))]
    span = getattr(node, "span", None)
    at = f" @{span.line}:{span.col}" if isinstance(span, Span) and span.source else ""
    lines = [f"{pad}{type(node).__name__}{at}"]
    for f in fields(node):
        if f.name in ("span", "name_span", "func_span", "domain_span"):
            continue
        value = getattr(node, f.name)
        if isinstance(value, tuple) and value and is_dataclass(value[0]):
            lines.append(f"{pad}  {f.name}:")
            for v in value:
                lines += _dump_ast(v, indent + 2)
        elif is_dataclass(value):
            lines.append(f"{pad}  {f.name}:")
            lines += _dump_ast(value, indent + 2)
        else:
            shown = value.value if isinstance(value, Enum) else value
            lines.append(f"{pad}  {f.name}: {shown!r}")
    return lines


def cmd_check(args) -> int:
    from .frontend import check, parse_file
    status = 0
    for path in args.files:
        try:
            prog = check(parse_file(path))
        except ItdslError as e:
            print(e.render(), file=sys.stderr)
            status = 1
            continue
        names = ", ".join(prog.names)
        print(f"{path}: ok ({len(prog.operators)} operator{'s' * (len(prog.operators) != 1)}: "
              f"{names})")
    return status


def _select(prog, name: str | None) -> list[str]:
    if name is None:
        return list(prog.names)
    prog._op_ir(name)  # raises a helpful error for an unknown name
    return [name]


def cmd_explain(args) -> int:
    from .api import compile_file
    prog = compile_file(args.file, target="reference")
    texts = [prog.explain(n) for n in _select(prog, args.op)]
    print("\n".join(texts), end="")
    return 0


def cmd_compile(args) -> int:
    from .frontend import check, parse_file
    from .frontend.printer import format_ir_program, print_program
    tree = parse_file(args.file)
    if args.emit == "ast":
        text = "\n".join(_dump_ast(tree)) + "\n"
    elif args.emit == "it":
        text = print_program(tree)
    else:
        prog = check(tree)
        if args.emit == "ir":
            text = format_ir_program(prog)
        else:
            from .api import Program
            p = Program(prog, args.target, None)
            text = "\n".join(p.source(n, args.emit) for n in _select(p, args.op))
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text, end="")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


def cmd_cache(args) -> int:
    from .cache import disk
    where = disk.cache_dir()
    if args.action == "clear":
        libs = sum(p.suffix == ".so" for p in disk.contents()["kernels"])
        removed = disk.clear()
        total = sum(b for _, b in removed.values())
        print(f"{where}: removed {libs} compiled kernels, {removed['plans'][0]} Plans and "
              f"{removed['partial'][0]} unfinished writes ({_size(total)})")
        return 0
    entries = disk.contents()
    print(f"cache: {where}" + ("" if where.is_dir() else " (not made yet)"))
    print("  set by " + ("$ITDSL_CACHE_DIR" if "ITDSL_CACHE_DIR" in os.environ
                         else "the default ($XDG_CACHE_HOME/itdsl or ~/.cache/itdsl)"))
    libs = [p for p in entries["kernels"] if p.suffix == ".so"]
    rows = [("compiled kernels", len(libs), entries["kernels"]),
            ("analysed operators (Plans)", len(entries["plans"]), entries["plans"]),
            ("unfinished writes", len(entries["partial"]), entries["partial"])]
    total = 0
    for what, count, paths in rows:
        size = sum(p.stat().st_size for p in paths if p.exists())
        total += size
        print(f"  {what:<28} {count:>6}   {_size(size):>10}")
    print(f"  {'total':<28} {'':>6}   {_size(total):>10}")
    print(f"  entries are keyed by the code that made them ({disk.versions()}); "
          "`itdsl cache clear` removes them all")
    return 0


def cmd_bench(args) -> int:
    from . import bench  # torch, and matplotlib for the plot: only for this command
    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="itdsl", description="A compiler for integral operators.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="parse and check .it files; exit 1 on errors")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("explain", help="what the compiler recognised in each operator")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--op", metavar="NAME", help="only this operator")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("compile", help="print a stage of the compilation")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--target", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--emit", choices=EMITS, default="ir",
                   help="ast: syntax tree; it: canonical .it text; ir: checked IR; "
                        "tir: TVM script; cuda: CUDA source")
    p.add_argument("--op", metavar="NAME", help="only this operator (tir, cuda)")
    p.add_argument("-o", "--output", metavar="OUT", help="write to OUT instead of stdout")
    p.set_defaults(func=cmd_compile)
    p = sub.add_parser("cache", help="the compile cache: where it is, what it holds; clear it")
    p.add_argument("action", choices=("info", "clear"), nargs="?", default="info")
    p.set_defaults(func=cmd_cache)
    p = sub.add_parser("bench", help="time against size for itdsl and its peers: a markdown "
                       "table and a PNG plot")
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    p.add_argument("--only", metavar="TEXT", help="only the cases whose name contains TEXT")
    p.add_argument("--out", metavar="DIR", default="itdsl-bench",
                   help="where bench.md and bench.png go (default: itdsl-bench/)")
    p.add_argument("--no-plot", action="store_true", help="the table only (no matplotlib)")
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ItdslError as e:
        print(e.render(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        print(f"itdsl: internal error: {type(e).__name__}: {e}\n"
              "This is a bug in itdsl, not in your program; please report it with the file.",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
