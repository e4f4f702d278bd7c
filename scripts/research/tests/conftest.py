"""The probes' tests run outside the CI suite (``testpaths = ["tests"]``): ``python -m pytest scripts/research/tests``.
They import the repository's test helpers (``tests/tests_helpers.py``) and the probes' own modules
(``scripts/research/``, e.g. ``gradient_agreement``)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
for path in (ROOT / "tests", ROOT / "scripts" / "research"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
