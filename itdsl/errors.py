"""One error hierarchy for every stage.

Every error a user can cause is an `ItdslError`. It carries the span of the
offending `.it` text (when there is one), a message that says what is wrong
and, where one helps, a hint that says how to fix it. `str(err)` renders the
familiar compiler form::

    examples/bad.it:7:34: error: unknown function `sqnrm`
        kernel k(x: X, y: Y) = exp(-sqnrm(x - y))
                                     ^~~~~
    hint: did you mean `sqnorm`?
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

MAX_RENDERED = 50  # errors shown by `ItdslErrors.render`; the rest are counted
MAX_SHOWN_LINE = 160  # characters of a source line quoted under an error


@lru_cache(maxsize=4)
def _lines(source: str) -> list[str]:
    """The lines of a source text, split the way the lexer counts them (at "\n" only).

    Cached: rendering many errors of one large file must not split it once per error."""
    return [ln.removesuffix("\r") for ln in source.split("\n")]


@dataclass(frozen=True, kw_only=True)
class Span:
    """A region of a source file; lines and columns are 1-based, `end_col` exclusive."""

    file: str = "<string>"
    line: int = 1
    col: int = 1
    end_line: int = 1
    end_col: int = 2
    # The whole source text, kept so an error can quote its line. Excluded from
    # equality so that spans never make two equal trees compare unequal.
    source: str | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    def source_line(self) -> str | None:
        if self.source is None:
            return None
        lines = _lines(self.source)
        if 1 <= self.line <= len(lines):
            return lines[self.line - 1]
        return None

    def to(self, other: Span) -> Span:
        """The span from the start of `self` to the end of `other`."""
        return Span(file=self.file, line=self.line, col=self.col, end_line=other.end_line,
                    end_col=other.end_col, source=self.source)


class ItdslError(Exception):
    """Base of every error itdsl reports to a user."""

    kind = "error"

    def __init__(self, message: str, span: Span | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint

    def render(self) -> str:
        where = f"{self.span}: " if self.span is not None else ""
        out = [f"{where}{self.kind}: {self.message}"]
        if self.span is not None:
            text = self.span.source_line()
            if text is not None:
                text = text.expandtabs(1)
                col = self.span.col
                width = (self.span.end_col - col) if self.span.end_line == self.span.line else 1
                width = max(1, min(width, len(text) - col + 1))
                if len(text) > MAX_SHOWN_LINE:  # show a window of a very long line
                    start = max(0, min(col - 1 - MAX_SHOWN_LINE // 3, len(text) - MAX_SHOWN_LINE))
                    lead = "..." if start > 0 else ""
                    tail = "..." if start + MAX_SHOWN_LINE < len(text) else ""
                    text = lead + text[start:start + MAX_SHOWN_LINE] + tail
                    col = col - start + len(lead)
                    width = max(1, min(width, len(text) - len(tail) - col + 1))
                out.append(f"    {text}")
                out.append("    " + " " * (col - 1) + "^" + "~" * (width - 1))
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()


class ParseError(ItdslError):
    """The text is not a well-formed `.it` program."""


class CheckError(ItdslError):
    """The program is well-formed but breaks a rule of the language."""


class AnalysisError(ItdslError):
    """The symbolic layer cannot handle a (valid) program."""


class LoweringError(ItdslError):
    """A Plan cannot be lowered to the requested target."""


class InputError(ItdslError):
    """An operator was called with missing or ill-shaped inputs."""


class UnsupportedError(ItdslError):
    """A valid request itdsl does not implement (e.g. a second derivative of a kernel)."""


class ItdslErrors(ItdslError):
    """Several errors found together (the checker reports all it finds)."""

    def __init__(self, errors: Sequence[ItdslError]):
        errors = list(errors)
        first = errors[0]
        super().__init__(first.message, first.span, first.hint)
        self.errors = errors

    def render(self) -> str:
        n = len(self.errors)
        body = "\n".join(e.render() for e in self.errors[:MAX_RENDERED])
        if n > MAX_RENDERED:
            body += f"\n... and {n - MAX_RENDERED} more"
        return body + (f"\n{n} errors" if n > 1 else "")


def raise_all(errors: Iterable[ItdslError]) -> None:
    """Raise the collected errors (one plainly, several together); do nothing if none."""
    errors = list(errors)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ItdslErrors(errors)


def did_you_mean(name: str, choices: Iterable[str]) -> str | None:
    """A hint naming the closest known name, if any is close."""
    close = difflib.get_close_matches(name, sorted(set(choices)), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None
