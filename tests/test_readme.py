"""The Quickstart is a contract: exactly two commands, and CI runs the second one verbatim."""
import re
from pathlib import Path

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


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert quickstart_commands()[1] in ci.splitlines()


def test_quickstart_comes_first():
    text = (ROOT / "README.md").read_text()
    assert text.index("## Quickstart") < min(text.index(h) for h in re.findall(r"^## .*", text, re.M)[1:])


def test_local_links_resolve():
    """Every relative link and image in README.md names a file of the repository (history moved to docs/ stays
    reachable)."""
    text = (ROOT / "README.md").read_text()
    targets = [t.split("#", 1)[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:|#", t)]
    assert targets, "README.md has no relative links"
    assert [t for t in targets if not (ROOT / t).exists()] == []
