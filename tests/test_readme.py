"""The Quickstart is a contract: exactly two commands, and CI runs the second one (with the linter before its tests);
the README stays a page people read, and every relative link of it and of docs/ resolves."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    assert text.splitlines()[0].startswith("# diffrl")
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quickstart_has_exactly_two_commands():
    install_and_run, install_and_test = quickstart_commands()
    assert "pip install" in install_and_run and install_and_run.endswith("diffrl train configs/tiny_shapes.yaml")
    assert "pip install" in install_and_test and "pytest" in install_and_test


def test_ci_runs_the_readme_test_command_with_the_linter_before_the_tests():
    """.ci/run's commands are the README's test command, step by step and in order, with ``ruff check .`` inserted
    before pytest: nothing weaker."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    steps = [step for line in ci for step in line.split(" && ")]
    readme = quickstart_commands()[1].split(" && ")
    lint = ".venv/bin/ruff check ."
    assert lint in steps and steps.index(lint) < steps.index(readme[-1])
    assert [step for step in steps if step in readme] == readme


def test_readme_is_at_most_300_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_quickstart_comes_first():
    text = (ROOT / "README.md").read_text()
    assert text.index("## Quickstart") < min(text.index(h) for h in re.findall(r"^## .*", text, re.M)[1:])


PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("page", PAGES)
def test_local_links_resolve(page):
    """Every relative link and image in README.md and the guides names a file of the repository."""
    path = ROOT / page
    text = path.read_text()
    targets = [t.split("#", 1)[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:|#", t)]
    assert [t for t in targets if t and not (path.parent / t).exists()] == []
