"""Write docs/configuration.md, the reference of every config key, from the dataclasses in diffrl/config.py.

Each row is one field: its dotted key, type, default (as YAML reads it), allowed values (``CHOICES``, the registries
that ``validate`` checks, ``RANGES``) and its attribute docstring, read with ``ast`` from diffrl/config.py's source
(attribute docstrings do not exist at runtime). A field without a docstring stops the script (``MissingDocstring``),
so a new key cannot reach the page undocumented. tests/test_config_reference.py
fails while the committed page differs from what this script writes.

Run: ``python scripts/config_reference.py`` (writes the page) or ``python scripts/config_reference.py --check`` (exit
1 with one sentence if the page is stale).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: diffrl and the top-level rewards package

from diffrl.config import CHOICES, RANGES, Config  # noqa: E402

CONFIG_SOURCE = ROOT / "diffrl" / "config.py"
OUT = ROOT / "docs" / "configuration.md"

REGISTRIES: dict[str, tuple[str, str, str]] = {
    "model.family": ("diffrl.adapters", "ADAPTERS", " or `pkg.module:Class`"),
    "train.objective": ("diffrl.update", "OBJECTIVES", ""),
    "train.advantage": ("diffrl.advantages", "ESTIMATORS", ""),
    "train.reward_aggregation": ("diffrl.advantages", "AGGREGATIONS", ""),
    "log.trackers": ("diffrl.tracking", "TRACKERS", ""),
    "rewards": ("rewards", "REGISTRY", ", a reward an installed package registers (entry points `diffrl.rewards`) "
                "or `pkg.module:function`; weights: finite numbers"),
}
"""Key -> (module, registry, what else is accepted): the names ``validate`` (or ``_name_errors``) checks against."""

class MissingDocstring(ValueError):
    """A config field has no attribute docstring."""


def field_docstrings(source: str) -> dict[tuple[str, str], Optional[str]]:
    """(class name, field name) -> the field's attribute docstring (the string literal right after it, cleaned of
    its indentation), or None where there is none; for every annotated field of every top-level class."""
    docs: dict[tuple[str, str], Optional[str]] = {}
    for cls in (node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)):
        for node, after in zip(cls.body, [*cls.body[1:], None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                literal = (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                           and isinstance(after.value.value, str))
                docs[(cls.name, node.target.id)] = inspect.cleandoc(after.value.value) if literal else None
    return docs


def class_docstrings(source: str) -> dict[str, str]:
    """Class name -> its docstring, for the top-level classes of ``source`` that have one."""
    classes = (node for node in ast.parse(source).body if isinstance(node, ast.ClassDef))
    return {cls.name: doc for cls in classes if (doc := ast.get_docstring(cls)) is not None}


def type_text(tp: Any) -> str:
    """A field's type as the page shows it: ``int``, ``list[str]``, ``int or null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any"
    if origin is typing.Union:
        rest = [a for a in args if a is not type(None)]
        return " or ".join(type_text(a) for a in rest) + (" or null" if len(rest) < len(args) else "")
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_text(a) for a in args)}]"
    return tp.__name__


def yaml_text(value: Any) -> str:
    """``value`` written as YAML flow text (``null``, ``false``, ``0.001``, ``[to_q, to_k]``), checked to read back
    as the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**9).strip()
    text = text.removesuffix("\n...").strip()
    if yaml.safe_load(text) != value:
        raise ValueError(f"default {value!r} does not read back from YAML {text!r}")
    return text


def cell(text: str) -> str:
    """Markdown table cell: one line, ``|`` escaped, ``<`` escaped outside code spans (no stray HTML tags)."""
    text = " ".join(text.split())
    parts = re.split(r"(``.*?``|`[^`]*`)", text)
    text = "".join(p if i % 2 else p.replace("&", "&amp;").replace("<", "&lt;") for i, p in enumerate(parts))
    return text.replace("|", "\\|")


def allowed_text(key: str, choices: dict, ranges: dict, registries: dict) -> str:
    parts = []
    if key in choices:
        parts.append(", ".join(f"`{c}`" for c in choices[key]))
    if key in registries:
        module, name, more = registries[key]
        names = ", ".join(f"`{n}`" for n in getattr(importlib.import_module(module), name))
        parts.append(f"{names} (`{module}.{name}`){more}")
    if key in ranges:
        parts.append(f"`{ranges[key]}`")
    return "; ".join(parts)


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def sections(root: type, source: str, *, choices: dict = CHOICES, ranges: dict = RANGES,
             registries: dict = REGISTRIES) -> list[tuple[str, str, list]]:
    """[(section key, its intro, its rows)] in field order: a dataclass-typed field is a section (nested ones right
    after their parent's table), and each plain field of the root is a section of one row. Each row is (key, type,
    default, allowed, docstring). Raises ``MissingDocstring`` listing every undocumented field, and ``ValueError`` if
    a key of ``choices``, ``ranges`` or ``registries`` names no field."""
    docs, class_docs, missing, out = field_docstrings(source), class_docstrings(source), [], []

    def row(key: str, f: dataclasses.Field, hint: Any, doc: Optional[str]) -> tuple:
        if doc is None:
            missing.append(key)
        return (key, type_text(hint), yaml_text(default_of(f)), allowed_text(key, choices, ranges, registries),
                doc)

    def walk(cls: type, prefix: str, intro: str) -> None:
        rows, later = [], []  # later: (section key, intro, its dataclass or None for a root field's one row)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, doc, hint = f"{prefix}{f.name}", docs.get((cls.__name__, f.name)), hints[f.name]
            if dataclasses.is_dataclass(hint):
                later.append((key, " ".join(filter(None, [doc, class_docs.get(hint.__name__)])), hint))
            elif prefix:
                rows.append(row(key, f, hint, doc))
            else:
                later.append((key, "", [row(key, f, hint, doc)]))
        if prefix:
            out.append((prefix[:-1], intro, rows))
        for key, text, sub in later:
            if isinstance(sub, list):
                out.append((key, text, sub))
            else:
                walk(sub, f"{key}.", text)

    walk(root, "", "")
    if missing:
        raise MissingDocstring(f"config fields without a docstring in {CONFIG_SOURCE.name}: {', '.join(missing)}; "
                               "document each with a string literal right after the field.")
    keys = {r[0] for _, _, rows in out for r in rows}
    unknown = sorted(k for k in [*choices, *ranges, *registries] if k not in keys)
    if unknown:
        raise ValueError(f"CHOICES, RANGES or REGISTRIES name keys that are no config field: {unknown}")
    return out


INTRO = """\
# Configuration reference

Generated by `scripts/config_reference.py` from the dataclasses in `diffrl/config.py` (their field docstrings,
`CHOICES`, `RANGES` and the registries `validate` checks): do not edit it by hand. After changing the config, run
`python scripts/config_reference.py`; `tests/test_config_reference.py` fails while this page is stale.

## How a config is built

`load_config(path, overrides)` (what `diffrl train CONFIG [key=value ...]` calls) starts from the dataclass defaults
below, applies the YAML file (a mapping of sections, holding only the keys that differ from the defaults), then the
`key=value` overrides of the command line in order. An override's value is read as YAML: `train.lr=3e-4`,
`sampler.split_steps=[0,2]`, `rewards={shapes_partial: 1.0}` (the whole mapping), `rewards.clip_score=0.5` (adds or
reweights one reward). Unknown or misspelt keys are errors (with a "did you mean"), as are wrong types, values outside
the allowed values and impossible combinations (e.g. a split step past the last step, a group of one leaf); every
problem is reported at once, each with its file and key, before any model loads. The resolved config is written to
the run directory as `config.yaml`.

Examples: [configs/tiny_shapes.yaml](../configs/tiny_shapes.yaml) (the main job: DiffusionNFT on flat chains of the
embedded tiny SD3 model) and [configs/tiny_shapes_tree.yaml](../configs/tiny_shapes_tree.yaml) (clipped-ratio RL on
branching trees).

Columns: *type* (`or null`: YAML `null` is allowed too), *default* (as YAML reads it), *allowed* (the choices, the
names of the registry the key is checked against, and for numbers the interval: `[` / `]` include the bound, `(` /
`)` exclude it, and values must be finite). Combinations of keys are checked as well (`diffrl.config.validate`); the
descriptions say which.
"""


def render(root: type = Config, source: Optional[str] = None, **tables: Any) -> str:
    """The page's markdown for ``root`` and the source that defines its dataclasses (default: diffrl/config.py)."""
    source = CONFIG_SOURCE.read_text(encoding="utf-8") if source is None else source
    lines = [INTRO]
    for key, intro, rows in sections(root, source, **tables):
        lines += [f"## {key}", ""] + ([cell(intro), ""] if intro else [])
        lines += ["| key | type | default | allowed | description |", "| --- | --- | --- | --- | --- |"]
        for name, tp, default, allowed, doc in rows:
            lines.append(f"| `{name}` | {cell(tp)} | `{cell(default)}` | {cell(allowed)} | {cell(doc)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs from what would be written")
    parser.add_argument("--out", type=Path, default=OUT, help="the page (default: docs/configuration.md)")
    args = parser.parse_args(argv)
    try:
        page = render()
    except MissingDocstring as e:
        print(f"config_reference.py: {e}", file=sys.stderr)
        return 2
    if args.check:
        if not args.out.is_file() or args.out.read_text(encoding="utf-8") != page:
            print(f"{args.out} is stale: run `python scripts/config_reference.py` to regenerate it.", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page, encoding="utf-8", newline="\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
