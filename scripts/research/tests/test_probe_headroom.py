"""scripts/research/probe_headroom.py: one tiny run, its pass@k ladder and its JSON line (pass@k itself is
``diffrl.inference.pass_at_k``, tested in tests/test_pass_at_k.py)."""
import json
import subprocess
import sys

import pytest
from research_helpers import probe_path

from tests_helpers import ROOT, SUBPROCESS_ENV


def test_headroom_probe_ends_with_its_json():
    done = subprocess.run([sys.executable, probe_path("probe_headroom"), "--n", "4", "--prompts", "4"],
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])["rows"]
    assert set(rows) == {"all", "count", "relation"} and rows["all"]["prompts"] == 4
    for r in rows.values():
        ladder = [r["pass@1"], r["pass@2"], r["pass@4"]]
        assert ladder == sorted(ladder) and 0 <= ladder[0] and ladder[-1] <= 1
        assert r["pass@4"] == pytest.approx(1 - r["never"], abs=1e-4)  # k = n: some sample right iff not "never"
