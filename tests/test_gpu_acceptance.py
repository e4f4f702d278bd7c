"""``scripts/gpu_acceptance.sh --dry-run`` stays runnable on a CPU: every step of the GPU acceptance run (the gpu tests
on the CPU, a training run, both GPU benchmarks at their smallest settings) passes, and the script ends with its
reports and one JSON line that says ok."""
import json
import os
import subprocess
import sys

import pytest

from tests_helpers import ROOT

pytestmark = pytest.mark.slow

STEPS = ["environment", "gpu_tests", "train", "bench_explore", "bench_families"]


def test_dry_run_passes_every_step_and_ends_with_one_json_line(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    env.pop("DIFFRL_TEST_DEVICE", None)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_acceptance.sh"), "--dry-run", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    report = tmp_path / "acceptance.json"
    detail = report.read_text() if report.is_file() else done.stderr[-3000:]
    assert done.returncode == 0, detail
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["ok"] is True and last["mode"] == "dry-run", detail
    assert list(last["steps"]) == STEPS and all(s["status"] == "pass" for s in last["steps"].values())
    full = json.loads(report.read_text())
    assert full["ok"] is True and [s["name"] for s in full["steps"]] == STEPS
    numbers = {s["name"]: s["numbers"] for s in full["steps"]}
    assert numbers["gpu_tests"]["passed"] >= 3 and numbers["gpu_tests"]["failed"] == 0
    assert numbers["train"]["steps"] == 1 and numbers["bench_explore"]["regen_exact"] is True
    table = (tmp_path / "acceptance.md").read_text()
    assert table.count("| pass |") == len(STEPS)
