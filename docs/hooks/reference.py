"""mkdocs hook: the reference pages, generated from the code at every build so they cannot drift.

- `reference/cli.md` walks `flows.cli.build_parser()` (argparse);
- `reference/config.md` walks the pydantic config models (type, default, description: a field's
  `description`, else the comment beside or above it in the source);
- `reference/losses.md` walks the loss registry (`loss_entries`, the one function that knows its shape);
- `results/benchmarks.md` is bench/README.md, and the figures under bench/results/ are copied in.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # document this checkout's code, whatever else is installed
    sys.path.insert(0, str(ROOT))

# the config files a user writes: (title, import path, the command that reads it)
CONFIG_ROOTS = (
    ("Cache config", "pipeline.config:CacheConfig", "`kdcache plan`, `kdcache cache`, `kdcache serve`"),
    ("Train config", "pipeline.train.train_config:TrainConfig", "`kdcache train`"),
    ("Eval config", "pipeline.evaluation.evaluate:EvalConfig", "`kdcache eval`"),
    ("Self-distill config", "pipeline.train.self_distill:SelfDistillConfig", "`kdcache self-distill`"),
)


def on_files(files: Files, config: Any) -> Files:
    pages = {
        "reference/cli.md": cli_page(),
        "reference/config.md": config_page(),
        "reference/losses.md": losses_page(),
        "results/benchmarks.md": (ROOT / "bench" / "README.md").read_text(),
    }
    for uri, content in pages.items():
        _add(files, File.generated(config, uri, content=content))
    for image in sorted((ROOT / "bench" / "results").glob("*.png")):
        _add(files, File.generated(config, f"results/img/{image.name}", content=image.read_bytes()))
    return files


def _add(files: Files, file: File) -> None:
    old = files.get_file_from_path(file.src_uri)
    if old is not None:  # a placeholder in docs/ gives way to the generated page
        files.remove(old)
    files.append(file)


# ---------------------------------------------------------------- CLI


def cli_page() -> str:
    from flows.cli import build_parser

    parser = build_parser()
    out = ["# CLI reference", "",
           "Generated from `flows/cli.py` at build time. Every user error is one line on stderr naming what",
           "and where, exit code 2 (see [Troubleshooting](../guides/troubleshooting.md)); `kdcache --debug ...`",
           "shows the traceback.", "", "```text", parser.format_usage().strip(), "```", ""]
    out += _arguments_table(parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                out += [f"## `kdcache {name}`", "", (helps.get(name) or "").capitalize() + ".", "",
                        "```text", sub.format_usage().strip(), "```", ""]
                out += _arguments_table(sub)
    return "\n".join(out) + "\n"


def _arguments_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        name = ", ".join(action.option_strings) or action.dest
        if action.option_strings and action.nargs != 0:
            name += f" {action.metavar or action.dest.upper()}"
        default = "" if action.default in (None, False, [], argparse.SUPPRESS) else f"`{action.default}`"
        if action.required and action.option_strings:
            default = "required"
        notes = action.help or ""
        if isinstance(action, argparse._AppendAction):
            notes += " (repeatable)"
        rows.append(f"| `{name}` | {_cell(notes)} | {default} |")
    if not rows:
        return []
    return ["| argument | what | default |", "|---|---|---|", *rows, ""]


# ---------------------------------------------------------------- config keys


def config_page() -> str:
    out = ["# Config keys", "",
           "Generated from the pydantic models at build time. Every model forbids unknown keys: a typo is an",
           "error naming the key and the file. `--set a.b=value` on the command line overrides any key (the",
           "value is read as YAML).", ""]
    done: set[type] = set()
    for title, target, command in CONFIG_ROOTS:
        model = _import(target)
        out += [f"## {title}: `{model.__name__}`", "", f"Read by {command}; source: `{model.__module__}`.", ""]
        out += _model_tables(model, done, level=3)
    return "\n".join(out) + "\n"


def _import(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(__import__(module, fromlist=[name]), name)


def _model_tables(model: type, done: set[type], level: int) -> list[str]:
    """The table of `model`'s keys, then one of every nested model not shown yet."""
    done.add(model)
    out = model_table(model)
    for nested in _nested_models(model):
        if nested not in done:
            doc = _first_paragraph(nested)
            out += [f"{'#' * level} `{nested.__name__}`", "", *([doc, ""] if doc else [])]
            out += _model_tables(nested, done, level)
    return out


def _load_key_notes() -> dict[str, str]:
    """docs/hooks/key_notes.py (mkdocs loads hooks by path, not as a package)."""
    spec = importlib.util.spec_from_file_location("kdcache_key_notes", Path(__file__).with_name("key_notes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.KEY_NOTES


KEY_NOTES = _load_key_notes()


def _note(model: type, name: str) -> str:
    for cls in model.__mro__:
        if f"{cls.__name__}.{name}" in KEY_NOTES:
            return KEY_NOTES[f"{cls.__name__}.{name}"]
    return KEY_NOTES.get(name, "")


def model_table(model: type, skip: tuple[str, ...] = ()) -> list[str]:
    comments = source_comments(model)
    rows = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        description = info.description or comments.get(name) or _note(model, name)
        rows.append(f"| `{name}` | {_cell(type_name(info.annotation))} | {_cell(_default(info))} | {_cell(description)} |")
    if not rows:
        return ["(no keys)", ""]
    return ["| key | type | default | description |", "|---|---|---|---|", *rows, ""]


def _nested_models(model: type) -> list[type]:
    from pydantic import BaseModel

    found: list[type] = []

    def walk(ann: Any) -> None:
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if ann not in found:
                found.append(ann)
            return
        for arg in typing.get_args(ann):
            walk(arg)

    for info in model.model_fields.values():
        walk(info.annotation)
    return found


def source_comments(model: type) -> dict[str, str]:
    """Each field's comment in the class source: on its line, else the comment lines just above
    it. Walks the base classes too (a subclass's comment wins)."""
    from pydantic import BaseModel

    out: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not issubclass(cls, BaseModel) or cls is BaseModel:
            continue
        try:
            lines = inspect.getsource(cls).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("#").strip())
                continue
            match = re.match(r"\s+(\w+)\s*:[^=]*?(=.*)?$", line)
            if match and not stripped.startswith(("def ", "return", "@")):
                comment = line.split("  # ", 1)[1].strip() if "  # " in line else " ".join(above)
                if comment:
                    out[match.group(1)] = comment
            above = []
    return out


def type_name(ann: Any) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is type(None):
        return "null"
    if ann is Any:
        return "any"
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]"
    if isinstance(ann, type):
        return ann.__name__
    return str(ann)


def _default(info: Any) -> str:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        value = value.model_dump(exclude_defaults=True) or {}
        return f"`{json.dumps(value)}`" if value else "defaults below"
    return f"`{json.dumps(value, default=str)}`"


def _first_paragraph(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    if doc.startswith(("Usage docs:", "!!! abstract")) or not vars(obj).get("__doc__"):
        return ""  # pydantic's own BaseModel docstring, inherited
    return " ".join(doc.split("\n\n")[0].split())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------- losses


@dataclass(frozen=True)
class LossDoc:
    name: str
    config: type
    summary: str
    reads: str


def loss_entries() -> list[LossDoc]:
    """The registered losses (`LOSSES`: name → LossSpec with .config, .summary, .reads), by name."""
    from pipeline.train.losses.registry import LOSSES

    return [LossDoc(name, s.config, s.summary, s.reads) for name, s in sorted(LOSSES.items())]


def losses_page() -> str:
    entries = loss_entries()
    out = ["# Losses", "",
           "Generated from the loss registry at build time. A training config lists losses under",
           "`losses:` (a list is their weighted sum, each with its `weight`); the trainer checks every field",
           "a loss reads against the store's `store.json` before the first step. \"Reads\" lists the store",
           "fields the loss reads; layer maps and options change it. See [Train students](../guides/training.md).", "",
           "| loss | what | reads |", "|---|---|---|"]
    out += [f"| [`{e.name}`](#{e.name.replace('_', '-')}) | {_cell(e.summary)} | {_cell(e.reads)} |" for e in entries]
    out.append("")
    for e in entries:
        doc = _first_paragraph(e.config)
        out += [f"## `{e.name}` {{#{e.name.replace('_', '-')}}}", "", e.summary[:1].upper() + e.summary[1:] + ".", "",
                *([doc, ""] if doc else []), f"Config model: `{e.config.__module__}.{e.config.__name__}`. Reads: {e.reads}.", ""]
        out += model_table(e.config, skip=("name",))
    return "\n".join(out) + "\n"


def undocumented_keys() -> list[str]:
    """Config and loss keys with no description anywhere (tests/docs keeps this empty)."""
    seen: set[type] = set()
    missing: list[str] = []

    def walk(model: type) -> None:
        if model in seen:
            return
        seen.add(model)
        comments = source_comments(model)
        for name, info in model.model_fields.items():
            if not (info.description or comments.get(name) or _note(model, name)):
                missing.append(f"{model.__name__}.{name}")
        for nested in _nested_models(model):
            walk(nested)

    for _, target, _ in CONFIG_ROOTS:
        walk(_import(target))
    for entry in loss_entries():
        walk(entry.config)
    return missing
