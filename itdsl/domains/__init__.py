"""The domain kinds and the quadrature rules: one entry each, read by every stage.

A kind (`Kind` in `entry.py`) says how its points are declared and passed, where they are
(a grid's uniform points, an index's integers), their spacing, their measure (what
`montecarlo` weights are relative to) and the rule an integral over it takes by default. A
rule (`Rule`) says how it is written (its arguments, with what each means for the
checker's messages), which kinds it applies to, and where its weights come from: fixed
weights on the domain's own points, nodes of its own (the integrand is evaluated there),
an input field, or random draws. `ast.DomainKind`, `ir.QuadRule`, the checker's table of
which rule goes with which kind, the printer, the Plan builder, the recognisers, the call
binding and the runtime's points and draws (`runtime/sampling.py`) all read these.
Adding a quadrature is adding an entry to `rules.py` (plus its tests and docs/language.md).

Like `itdsl.functions`, nothing here imports torch, TVM or sympy (numpy only): the
weights and nodes are numpy arrays of the declared domain (`d.lo`, `d.hi`) and a size.
"""

from __future__ import annotations

from enum import Enum

from . import kinds, rules
from .entry import Arg, DeclarationError, Kind, Rule
from .rules import MAX_NODES, MAX_SAMPLES


def _table(entries: list, what: str) -> dict:
    table = {}
    for e in entries:
        if e.name in table:
            raise ValueError(f"{what} `{e.name}` is defined twice")
        table[e.name] = e
    return table


KINDS: dict[str, Kind] = _table(kinds.KINDS, "domain kind")
RULES: dict[str, Rule] = _table(rules.RULES, "quadrature")


class TableEnum(Enum):
    """A member per entry of a table (`NAME = "name"`), with the entry itself as `.entry`."""

    @property
    def entry(self):
        return type(self)._table[self.value]


def table_enum(name: str, table: dict, module: str) -> type[TableEnum]:
    """The Enum `name` (defined in `module`, so that its members pickle) of `table`'s entries:
    `ast.DomainKind` of `KINDS`, `ir.QuadRule` of `RULES`."""
    cls = TableEnum(name, [(key.upper(), key) for key in table], module=module)
    cls._table = table
    return cls


def rules_on(kind: str) -> list[Rule]:
    """The rules that apply to domains of `kind`, in the table's order."""
    return [r for r in RULES.values() if r.applies_to(kind)]


def _consistent() -> None:
    for k in KINDS.values():
        if k.default not in RULES or not RULES[k.default].applies_to(k.name):
            raise ValueError(f"the default quadrature of `{k.name}` does not apply to it")
    for r in RULES.values():
        where = [r.weights is not None, r.own_nodes, r.from_input, r.sampled]
        if sum(where) != 1:
            raise ValueError(f"quadrature `{r.name}` must take its weights from exactly one "
                             "place (weights, nodes, from_input, sampled)")
        if r.own_nodes and not any(a.field == "n" and a.keyword is None for a in r.args):
            raise ValueError(f"quadrature `{r.name}` has nodes of its own: its number of "
                             "nodes is the argument filling `n`")
        for k in r.kinds or ():
            if k not in KINDS:
                raise ValueError(f"quadrature `{r.name}` names the unknown kind `{k}`")


_consistent()

__all__ = ["KINDS", "MAX_NODES", "MAX_SAMPLES", "RULES", "Arg", "DeclarationError", "Kind",
           "Rule", "TableEnum", "rules_on", "table_enum"]
