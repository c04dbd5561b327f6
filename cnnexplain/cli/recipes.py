"""Recipes: YAML files that hold command options.

A recipe is a mapping of option names (``epochs: 3`` or ``num-classes: 6``) to values. It may
instead be sectioned by command (``train-gated: {...}``, ``dissect: {...}``) with an optional
``common:`` section merged into every command, so one file can drive a whole pipeline.
Precedence: command-line flags > recipe > environment variables > defaults. Unknown keys and
values of the wrong type are usage errors naming the key. Recipes are read with
``yaml.safe_load`` only.

The recipe is applied by rewriting the command line before parsing (:func:`expand_recipe`): each
recipe option becomes the flag it names, placed *before* the user's own flags, so the very same
parser validates it and a flag given on the command line wins.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from cnnexplain.errors import UsageError, close_matches

COMMON_SECTION = "common"


def read_recipe(path: str | Path) -> dict:
    """Parse a recipe file into a mapping (safe_load; one-line errors for bad files)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"recipe {path} is a directory, not a YAML file",
                         "pass --recipe FILE.yaml")
    if not path.is_file():
        raise UsageError(f"recipe {path} does not exist", "check the --recipe path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"recipe {path} is not valid YAML{where}",
                         "fix the syntax (key: value per line)") from None
    except UnicodeDecodeError:
        raise UsageError(f"recipe {path} is not a UTF-8 text file", "pass a YAML file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"recipe {path} must be a mapping of option: value, not a {type(data).__name__}",
                         "write one 'option: value' per line")
    return data


def recipe_section(data: dict, command: str, commands: list[str], path: str | Path) -> dict:
    """The options a recipe gives ``command``.

    Sectioned recipes (top-level keys are command names or ``common``) yield ``common`` merged
    with the command's own section; flat recipes yield themselves.
    """
    sectioned = any(k in commands or k == COMMON_SECTION for k in data)
    if not sectioned:
        return dict(data)
    for k, v in data.items():
        if k not in commands and k != COMMON_SECTION:
            raise UsageError(f"unknown key {k!r} in recipe {path}{close_matches(str(k), commands)}",
                             f"top-level keys of a sectioned recipe are command names or "
                             f"'{COMMON_SECTION}'")
        if v is not None and not isinstance(v, dict):
            raise UsageError(f"section {k!r} of recipe {path} must be a mapping",
                             "write its options indented under it")
    merged = dict(data.get(COMMON_SECTION) or {})
    merged.update(data.get(command) or {})
    return merged


def _recipe_value(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        if a == "--":
            return None
        if a == "--recipe" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--recipe="):
            return a.split("=", 1)[1]
    return None


def _given(args: list[str], opts: list[str]) -> bool:
    return any(a in opts or any(a.startswith(o + "=") for o in opts if o.startswith("--"))
               for a in args)


def expand_recipe(root, args: list[str]) -> tuple[list[str], dict]:
    """Insert the recipe's options into ``args`` (see module docstring).

    ``root`` is the CLI's root command group (click-like: ``commands``, ``params`` with ``name``,
    ``opts``, ``secondary_opts``, ``is_flag``, ``multiple``, ``param_type_name``). Returns the new
    argument list and ``{param_name: recipe_key}`` for the options that came from the recipe.
    """
    path = _recipe_value(args)
    if path is None:
        return args, {}
    # the subcommand path: leading words that name (sub)commands
    cmd, words, i = root, [], 0
    while i < len(args) and hasattr(cmd, "commands") and args[i] in cmd.commands:
        cmd = cmd.commands[args[i]]
        words.append(args[i])
        i += 1
    if not words or hasattr(cmd, "commands"):
        return args, {}
    command = " ".join(words)
    names = _all_commands(root)
    data = recipe_section(read_recipe(path), command, names, path)
    params = {p.name: p for p in cmd.params if p.param_type_name == "option"}
    by_key = {}
    for p in params.values():
        by_key[p.name] = p
        for o in p.opts:
            by_key[o.lstrip("-").replace("-", "_")] = p
    rest = args[i:]
    inserted: list[str] = []
    origin: dict = {}
    for key, raw in data.items():
        p = by_key.get(str(key).replace("-", "_"))
        if p is None or p.name == "recipe":
            valid = sorted(o.lstrip("-") for q in params.values() for o in q.opts[:1] if q.name != "recipe")
            raise UsageError(f"unknown key {key!r} in recipe {path} for "
                             f"{command}{close_matches(str(key), valid)}",
                             f"valid keys are the options of `cnnexplain {command} --help`")
        if _given(rest, p.opts + p.secondary_opts):
            continue  # the command line wins
        flag = p.opts[0]
        if p.is_flag:
            if not isinstance(raw, bool):
                raise UsageError(f"recipe key {key!r} must be true or false, got {raw!r}",
                                 f"write {key}: true or {key}: false")
            if raw:
                inserted.append(flag)
            elif p.secondary_opts:
                inserted.append(p.secondary_opts[0])
        else:
            values = raw if (p.multiple and isinstance(raw, list)) else [raw]
            for v in values:
                if isinstance(v, dict) or (isinstance(v, list) and not p.multiple):
                    numeric = _annotation(p) in (int, float)
                    if isinstance(v, list) and not numeric and \
                            all(not isinstance(x, (dict, list)) for x in v):
                        v = ",".join(str(x) for x in v)  # a comma-separated option
                    else:
                        raise UsageError(f"recipe key {key!r} must be a single value, got "
                                         f"{type(v).__name__} {v!r}", f"write {key}: VALUE")

                if v is None:
                    continue
                if isinstance(v, bool):
                    v = str(v).lower()
                inserted.extend([flag, str(v)])
        origin[p.name] = str(key)
    return args[:i] + inserted + rest, origin


def _annotation(param):
    """The Python type a parameter is declared with (typer's descriptor; click's type name)."""
    desc = getattr(param, "type_descriptor", None)
    if desc is not None:
        return getattr(desc, "annotation", None)
    return {"integer": int, "float": float}.get(getattr(getattr(param, "type", None), "name", ""))


def _all_commands(root) -> list[str]:
    out = []
    for name, cmd in getattr(root, "commands", {}).items():
        out.append(name)
        for sub in getattr(cmd, "commands", {}) or {}:
            out.append(f"{name} {sub}")
    return out
