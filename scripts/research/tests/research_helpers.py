"""What the probes' tests share: where the probes are, and a probe imported as a module."""
import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[3]
RESEARCH = ROOT / "scripts" / "research"


def probe_path(name: str) -> str:
    """``scripts/research/<name>.py``, relative to the repository root (the probes' commands run from there)."""
    return str((RESEARCH / f"{name}.py").relative_to(ROOT))


def load_probe(name: str) -> ModuleType:
    """``scripts/research/<name>.py`` imported as a module (scripts/ is not a package), for tests of its functions."""
    spec = importlib.util.spec_from_file_location(name, RESEARCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
