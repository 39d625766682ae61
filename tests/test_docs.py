"""The documentation states what the code does."""

from util import ROOT


def test_language_reference_contains_the_grammar():
    grammar = (ROOT / "itdsl/frontend/grammar.lark").read_text()
    doc = (ROOT / "docs/language.md").read_text()
    assert grammar.strip() in doc, "copy itdsl/frontend/grammar.lark into the Grammar section " \
                                   "of docs/language.md"


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0] == "```sh"
    assert lines[1].startswith("make demo") and lines[2].startswith("make test")
    ci = (ROOT / ".ci/run").read_text()
    assert "make test" in ci


def test_examples_are_the_shared_ones_unchanged():
    shared = ROOT.parent / "shared" / "examples"
    if not shared.is_dir():  # a clone without the steering repo beside it
        return
    for f in shared.glob("*.it"):
        assert (ROOT / "examples" / f.name).read_text() == f.read_text(), f.name
