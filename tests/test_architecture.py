"""The floor plan: options declared once, a library that names fields (never flags), pure
metrics, fast help, and every command generated from its declarations."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cnnexplain.config.fields import build, check, declared, flags
from cnnexplain.errors import UsageError

PACKAGE = Path(__file__).resolve().parents[1] / "cnnexplain"
FLAG = re.compile(r"(?<![\w-])--[a-z]")


def _strings(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_no_flag_literal_outside_the_cli():
    """Library errors, notices, help texts and docstrings name option fields (`epochs`); only
    cnnexplain/cli/ spells flags (the recipe loader reads --recipe off the command line)."""
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "cli":
            continue
        for line, text in _strings(path):
            if FLAG.search(text):
                hits.append(f"{path.relative_to(PACKAGE)}:{line}: {text[:60]!r}")
    assert hits == []


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_metrics_are_pure():
    """metrics/ computes on arrays and tensors: it never touches the cache, activations,
    datasets, files or the CLI."""
    banned = ("cnnexplain.cache", "cnnexplain.activations", "cnnexplain.data", "cnnexplain.io",
              "cnnexplain.cli", "cnnexplain.jobs", "cnnexplain.runs", "h5py")
    for path in sorted((PACKAGE / "metrics").glob("*.py")):
        bad = [m for m in _imports(path) if m.startswith(banned)]
        assert bad == [], (path.name, bad)


def test_the_library_never_imports_the_cli_or_the_jobs():
    for path in sorted(PACKAGE.rglob("*.py")):
        top = path.relative_to(PACKAGE).parts[0]
        if top in ("cli", "jobs", "__main__.py"):
            continue
        bad = [m for m in _imports(path) if m.startswith(("cnnexplain.cli", "cnnexplain.jobs"))]
        assert bad == [], (path, bad)


def test_options_are_declared_only_in_config():
    """typer.Option / typer.Argument appear only where the commands are generated."""
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        if path.name in ("declare.py", "main.py"):  # main.py: the root's eager --version
            continue
        text = path.read_text(encoding="utf-8")
        assert "typer.Option(" not in text and "typer.Argument(" not in text, path.name


def _commands():
    import typer

    from cnnexplain.cli.main import _register, app

    _register()
    root = typer.main.get_command(app)
    out = {}
    for name, cmd in root.commands.items():
        subs = getattr(cmd, "commands", None)
        for sub_name, sub in (subs or {name: cmd}).items():
            out[f"{name} {sub_name}" if subs else name] = sub
    return out


def _options_class(command: str):
    from cnnexplain.config import data, dissect, evaluate, info, report, saliency, tcav, train, \
        visualize

    return {"train-gated": train.TrainOptions, "evaluate-entanglement": evaluate.EvaluateOptions,
            "saliency": saliency.SaliencyOptions, "dissect": dissect.DissectOptions,
            "tcav": tcav.TcavOptions, "report": report.ReportOptions,
            "visualize": visualize.VisualizeOptions,
            "data synth": data.SynthOptions, "data inspect": data.InspectOptions,
            "cache info": info.CacheOptions, "cache clear": info.CacheOptions,
            "backbones": info.BackbonesOptions, "layers": info.LayersOptions}[command]


def test_every_command_is_generated_from_its_declarations():
    """Every parameter of every command is a declared option (or an eager --help-methods /
    --list-methods flag), with the declared flag and default: a default exists once."""
    commands = _commands()
    assert len(commands) == 13
    for name, cmd in commands.items():
        decls = {d.name: d for d in declared(_options_class(name)) if d.opt.cli}
        params = {p.name: p for p in cmd.params if p.name not in ("help",)}
        extra = set(params) - set(decls)
        assert extra <= {"help_methods", "list_methods", "list_metrics"}, (name, extra)
        assert set(decls) <= set(params), (name, set(decls) - set(params))
        for key, d in decls.items():
            p = params[key]
            if d.opt.argument:
                continue
            assert p.opts[0] == d.flag, (name, key)
            default = p.default
            if d.multiple:
                default = list(default) if default else None
                expected = list(d.default) if d.default else None
            else:
                expected = d.default
            if d.required:
                assert p.required, (name, key)
            else:
                assert default == expected, (name, key, default, expected)


def test_help_shows_the_declared_defaults():
    """What `--help` prints as [default: X] is the dataclass default."""
    from cnnexplain.config.train import TrainConfig

    r = subprocess.run([sys.executable, "-m", "cnnexplain", "train-gated", "--help"],
                       capture_output=True, text=True, env={"COLUMNS": "250", "PATH": ""})
    text = " ".join(r.stdout.split())
    cfg = TrainConfig()
    for field_name in ("epochs", "lr", "lambda2", "gate_lr", "method", "preset"):
        flag = flags(TrainConfig)[field_name]
        value = getattr(cfg, field_name)
        m = re.search(re.escape(flag) + r"\s+<\w+>(?:(?!│ --).)*?\[default: ([^\]]+)\]", text.split("╭", 1)[1])
        assert m and m.group(1).strip() == str(value), (flag, m and m.group(1), value)


def test_help_does_not_import_torch():
    code = ("import sys; from cnnexplain.cli.main import main\n"
            "try:\n    main(['train-gated', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip().splitlines()[-1] == "False", r.stdout + r.stderr


def test_check_names_the_field_and_rejects_non_finite_values():
    from cnnexplain.config.train import TrainConfig

    with pytest.raises(UsageError, match="`epochs` must be at least 1, got 0"):
        check(TrainConfig(epochs=0))
    with pytest.raises(UsageError, match="`lr` must be a finite number"):
        check(TrainConfig(lr=float("nan")))
    with pytest.raises(UsageError, match="unknown `method` 'picnnn'.*did you mean 'picnn'"):
        check(TrainConfig(method="picnnn"))


def test_build_fills_groups_from_flat_values():
    from cnnexplain.config.tcav import TcavOptions

    o = build(TcavOptions, {"cav_loss": "logistic", "alpha": 0.01, "concepts_dir": Path("c"),
                            "target": ["star"], "seed": 3})
    assert o.tcav.cav.loss == "logistic" and o.tcav.alpha == 0.01
    assert o.concepts.concepts_dir == Path("c") and o.compute.seed == 3
    assert flags(TcavOptions)["concepts_dir"] == "--concepts"
    assert flags(TcavOptions)["cav_loss"] == "--cav-loss"


def test_render_writes_fields_as_flags():
    from cnnexplain.cli.declare import render
    from cnnexplain.config.evaluate import EvaluateOptions

    fields = {d.name: d for d in declared(EvaluateOptions)}
    text = "`draws` must be at least 0; pass e.g. `draws=10`; drop `scores=false` or `mu`"
    assert render(text, fields) == ("--draws must be at least 0; pass e.g. --draws 10; drop "
                                    "--no-scores or --mu")
    assert render("`unknown_thing` stays", fields) == "`unknown_thing` stays"


def test_gate_registry_implements_the_declared_methods():
    from cnnexplain.config.train import METHODS
    from cnnexplain.models.gates import GATES

    assert set(METHODS) == {"std", *GATES}
