"""Recipes: flag > recipe > env > default precedence, sections, unknown keys, bad types."""

from pathlib import Path
from typing import Annotated, Optional

import pytest
import typer

from cnnexplain.cli import _click
from cnnexplain.errors import UsageError
from cnnexplain.cli.recipes import expand_recipe

seen: dict = {}
app = typer.Typer()


@app.command("train")
def _train(epochs: Annotated[int, typer.Option("--epochs", min=0)] = 1,
           lr: Annotated[float, typer.Option("--lr")] = 0.1,
           name: Annotated[str, typer.Option("--name", envvar="T_NAME")] = "dflt",
           amp: Annotated[bool, typer.Option("--amp/--no-amp")] = False,
           layer: Annotated[Optional[list[str]], typer.Option("--layer")] = None,
           recipe: Annotated[Optional[Path], typer.Option("--recipe")] = None):
    seen.clear()
    seen.update(epochs=epochs, lr=lr, name=name, amp=amp, layer=layer)


@app.command("other")
def _other(size: Annotated[int, typer.Option("--size")] = 3,
           recipe: Annotated[Optional[Path], typer.Option("--recipe")] = None):
    seen.clear()
    seen.update(size=size)


def run(args):
    root = typer.main.get_command(app)
    args, origin = expand_recipe(root, list(args))
    root.main(args=args, prog_name="t", standalone_mode=False)
    return dict(seen), origin


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_flat_recipe_fills_and_flags_override(tmp_path, monkeypatch):
    r = write(tmp_path, "epochs: 5\nlr: 0.5\nname: fromrecipe\namp: true\nlayer: [layer3, layer4]\n")
    vals, origin = run(["train", "--recipe", str(r), "--lr", "0.01"])
    assert vals == {"epochs": 5, "lr": 0.01, "name": "fromrecipe", "amp": True,
                    "layer": ["layer3", "layer4"]}
    assert "lr" not in origin and origin["epochs"] == "epochs"
    # the command line wins for multiple-valued options too (no merging)
    vals, _ = run(["train", "--recipe", str(r), "--layer", "conv1"])
    assert vals["layer"] == ["conv1"]
    # flags > recipe > env > default
    monkeypatch.setenv("T_NAME", "fromenv")
    assert run(["train", "--recipe", str(r)])[0]["name"] == "fromrecipe"
    assert run(["train"])[0]["name"] == "fromenv"
    monkeypatch.delenv("T_NAME")
    assert run(["train"])[0]["name"] == "dflt"


def test_sectioned_recipe_with_common(tmp_path):
    r = write(tmp_path, "common:\n  lr: 0.3\ntrain:\n  epochs: 7\nother:\n  size: 9\n")
    assert run(["train", "--recipe", str(r)])[0]["epochs"] == 7
    assert run(["train", "--recipe", str(r)])[0]["lr"] == 0.3
    r2 = write(tmp_path, "train:\n  epochs: 7\nother:\n  size: 9\n")
    assert run(["other", "--recipe", str(r2)])[0]["size"] == 9


@pytest.mark.parametrize("text,words", [
    ("epochz: 3\n", ["unknown key 'epochz'", "did you mean 'epochs'"]),
    ("trian:\n  epochs: 3\nother: {}\n", ["unknown key 'trian'"]),
    ("epochs: [1\n", ["not valid YAML"]),
    ("- a\n- b\n", ["must be a mapping"]),
    ("amp: maybe\n", ["must be true or false"]),
    ("lr: {a: 1}\n", ["single value"]),
])
def test_bad_recipes_are_usage_errors_naming_the_key(tmp_path, text, words):
    r = write(tmp_path, text)
    with pytest.raises(UsageError) as info:
        run(["train", "--recipe", str(r)])
    for w in words:
        assert w in info.value.line()


def test_wrong_type_and_range_are_caught_by_the_same_parser(tmp_path):
    r = write(tmp_path, "epochs: abc\n")
    with pytest.raises(_click.UsageError) as info:
        run(["train", "--recipe", str(r)])
    assert getattr(info.value, "param").name == "epochs"
    r = write(tmp_path, "epochs: -3\n")
    with pytest.raises(_click.UsageError):
        run(["train", "--recipe", str(r)])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        run(["train", "--recipe", str(tmp_path / "nope.yaml")])
