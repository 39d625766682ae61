"""Front end: `.it` text -> AST (parser) -> checked IR (checker)."""

from __future__ import annotations

from pathlib import Path

from . import ast, ir
from .check import check
from .parser import parse, parse_file


def load_source(source: str, filename: str = "<string>") -> ir.Program:
    """Parse and check `.it` text."""
    return check(parse(source, filename))


def load_file(path: str | Path) -> ir.Program:
    """Parse and check a `.it` file."""
    return check(parse_file(path))


__all__ = ["ast", "ir", "parse", "parse_file", "check", "load_source", "load_file"]
