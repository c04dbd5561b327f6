"""`cnnexplain --help`: each command's row shows its first help paragraph on one line; each
command's help is reflowed to the terminal's width."""

import inspect

import pytest

from cnnexplain.cli.main import _register, app, reflow
from clihelp import run_cli, run_inproc


def test_every_command_row_is_its_first_paragraph_on_one_line():
    _register()
    assert len(app.registered_commands) >= 6
    for info in app.registered_commands:
        text = info.help or inspect.getdoc(info.callback)
        first = text.split("\n\n")[0]
        assert info.short_help == " ".join(first.split()), info.name
        assert "\n" not in info.short_help


def test_reflow_joins_lines_within_paragraphs_but_keeps_list_items_and_paragraphs():
    text = "One sentence\nacross two lines.\n\n[bold]A[/]: first\nitem.\n[bold]B[/]: second."
    assert reflow(text) == "One sentence across two lines.\n\n[bold]A[/]: first item.\n[bold]B[/]: second."
    assert reflow("single") == "single"


def test_help_methods_fills_an_80_column_terminal():
    """No half-empty lines inside a paragraph of train-gated's --help-methods at 80 columns
    (the hard line breaks of the source used to survive Rich's wrapping)."""
    r = run_cli("train-gated", "--help-methods", env={"COLUMNS": "80"})
    assert r.code == 0
    lines = [line.strip() for line in r.out.splitlines()]
    paragraph = [line for line in lines if line]
    assert len(paragraph) > 20
    short = [a for a, b in zip(lines, lines[1:]) if a and b and len(a) < 45
             and not b.startswith(("std:", "cdcnn-", "picnn"))]
    assert short == []


@pytest.mark.parametrize("command", ["train-gated", "evaluate-entanglement", "saliency",
                                     "dissect", "tcav", "report"])
def test_help_opens_with_a_short_description_and_an_example(command):
    """Each command's --help starts with one to three sentences, then an example, before the
    options (the long explanations live behind --help-methods and in the README)."""
    r = run_cli(command, "--help", env={"COLUMNS": "100"})
    assert r.code == 0
    body = r.out.split("╭")[0].split("Usage:", 1)[1].split("\n", 1)[1]
    body = "\n".join(line.strip() for line in body.splitlines())
    paragraphs = [" ".join(p.split()) for p in body.split("\n\n") if p.strip()]
    assert 1 <= paragraphs[0].count(". ") + paragraphs[0].endswith(".") <= 3, paragraphs[0]
    assert paragraphs[1].startswith(f"Example: cnnexplain {command}"), paragraphs[1]
    assert len(body.splitlines()) < 25


def test_layers_shows_the_stem_training_builds():
    """`layers` probes the model train-gated would build for that input: the small stem at 32 px
    (layer4 4x4), torchvision's with --stem imagenet (layer4 1x1)."""
    import json as _json

    def layer4(*extra):
        r = run_inproc("layers", "--backbone", "resnet18", "--size", "32", "--json", *extra)
        assert r.code == 0, r.err
        return next(x["output"] for x in _json.loads(r.out) if x["layer"] == "layer4")

    assert layer4() == [512, 4, 4]
    assert layer4("--stem", "imagenet") == [512, 1, 1]
