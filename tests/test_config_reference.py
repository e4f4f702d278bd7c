"""docs/configuration.md is what scripts/config_reference.py writes from diffrl/config.py now, it has a row for every
config field, and a field without a docstring stops the script."""
import dataclasses
import subprocess
import sys
import typing

import pytest

from diffrl.config import Config
from tests_helpers import ROOT, SUBPROCESS_ENV, load_script

PAGE = ROOT / "docs" / "configuration.md"


@pytest.fixture(scope="module")
def reference():
    return load_script("config_reference")


def test_the_committed_page_is_what_the_script_writes_now(reference):
    assert PAGE.read_text(encoding="utf-8") == reference.render(), (
        "docs/configuration.md is stale (diffrl/config.py changed since it was written): run "
        "`python scripts/config_reference.py` and commit docs/configuration.md")


def _keys(cls: type, prefix: str = "") -> tuple[list[str], list[str]]:
    """(plain field keys, nested-dataclass section keys) of ``cls``, walked here, not with the script's walk."""
    fields, sections = [], []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            sections.append(prefix + f.name)
            more_fields, more_sections = _keys(hints[f.name], f"{prefix}{f.name}.")
            fields += more_fields
            sections += more_sections
        else:
            fields.append(prefix + f.name)
    return fields, sections


def test_every_config_field_is_a_row_of_the_page():
    page = PAGE.read_text(encoding="utf-8")
    rows = [line.split("|")[1].strip().strip("`") for line in page.splitlines() if line.startswith("| `")]
    fields, sections = _keys(Config)
    assert len(fields) > 80 and {"train.lr", "train.pruning.width_ratio", "rewards", "log.out"} <= set(fields)
    assert sorted(rows) == sorted(fields)  # each field exactly once
    def by_section(keys):
        return {parent: [k for k in keys if k.rpartition(".")[0] == parent] for parent in
                {k.rpartition(".")[0] for k in keys}}

    assert by_section(rows) == by_section(fields)  # in field order within each section
    headings = [line[3:] for line in page.splitlines() if line.startswith("## ")]
    assert [h for h in headings if h in sections] == sections == ["model", "sampler", "train", "train.pruning",
                                                                  "train.guard", "explore", "data", "log"]
    assert headings[1:] == ["model", "sampler", "train", "train.pruning", "train.guard", "rewards", "reward_options",
                            "explore", "data", "log"]  # after "How a config is built"


SYNTHETIC = '''
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Inner:
    """The inner section."""

    ratio: float = 0.5
    """A ratio. Range: (0, 1]."""
    name: Optional[str] = None


@dataclass
class Root:
    inner: Inner = field(default_factory=Inner)
    size: int = 3
    """A size | with a pipe,
    on two lines <b>."""
'''


def _synthetic():
    namespace = {"__name__": "synthetic_config"}
    exec(compile(SYNTHETIC, "synthetic_config.py", "exec"), namespace)
    return namespace["Root"]


def test_a_field_without_a_docstring_stops_the_script(reference):
    assert reference.field_docstrings(SYNTHETIC)[("Inner", "name")] is None
    assert reference.field_docstrings(SYNTHETIC)[("Inner", "ratio")] == "A ratio. Range: (0, 1]."
    tables = dict(choices={}, ranges={"inner.ratio": "(0, 1]"}, registries={})
    with pytest.raises(reference.MissingDocstring, match=r"without a docstring in config\.py: inner\.name;"):
        reference.render(_synthetic(), SYNTHETIC, **tables)
    field = "    name: Optional[str] = None\n"
    documented = SYNTHETIC.replace(field, field + '    """A name."""\n')
    page = reference.render(_synthetic(), documented, **tables)
    assert "| `inner.ratio` | float | `0.5` | `(0, 1]` | A ratio. Range: (0, 1]. |" in page
    assert "| `size` | int | `3` |  | A size \\| with a pipe, on two lines &lt;b>. |" in page  # one line, escaped
    with pytest.raises(ValueError, match=r"no config field: \['inner.missing'\]"):
        reference.render(_synthetic(), documented, choices={"inner.missing": ("a",)}, ranges={}, registries={})


def test_check_exits_1_with_one_sentence_when_the_page_is_stale(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text(PAGE.read_text(encoding="utf-8").replace("Peak learning rate", "Learning rate"))
    script = [sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check", "--out"]
    done = subprocess.run([*script, str(stale)], capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == f"{stale} is stale: run `python scripts/config_reference.py` to regenerate it."
