"""``scripts/gpu_acceptance.sh --dry-run`` stays runnable on a CPU: every step of the GPU acceptance run (the gpu tests
on the CPU, a training run, the three GPU benchmarks at their smallest settings) passes, and the script ends with its
reports and one JSON line that says ok. Its report helper reads a step's log into a status and key numbers."""
import json
import os
import subprocess
import sys

import pytest

from tests_helpers import ROOT, load_script

STEPS = ["environment", "gpu_tests", "train", "bench_throughput", "bench_explore", "bench_families"]


def _throughput_line(train_speedup=1.3) -> str:
    """bench_throughput.py's last line, hand-written: eager and compile on rollout_flat and train_nft."""
    results = {
        "rollout_flat": {"eager": {"items": 4, "median_s": 0.4, "per_s": 10.0, "warmup_s": 3.0, "speedup": 1.0},
                         "compile": {"items": 4, "median_s": 0.2, "per_s": 20.0, "warmup_s": 30.0, "speedup": 2.0}},
        "train_nft": {"eager": {"items": 8, "median_s": 0.8, "per_s": 10.0, "warmup_s": 1.0, "speedup": 1.0},
                      "compile": {"items": 8, "median_s": 0.5, "per_s": 16.0, "warmup_s": 50.0, "speedup": 1.6}},
    }
    return json.dumps({"rollout_speedup": 2.0, "train_speedup": train_speedup, "tree_vs_flat_rollout": None,
                       "machine": "test", "repeats": 1, "overrides": [], "results": results})


def test_throughput_parser_reads_the_speedups_and_each_workloads_rates(tmp_path):
    parse = load_script("_acceptance_report").parse_throughput
    log = "| workload | items per call | eager /s |\n{\"not\": \"the result\"}\n" + _throughput_line() + "\n"
    ok, numbers, why = parse(log, tmp_path, 0)
    assert ok and why == ""
    assert numbers == {"rollout_speedup": 2.0, "train_speedup": 1.3,
                       "rollout_flat": {"eager_per_s": 10.0, "compile_per_s": 20.0},
                       "train_nft": {"eager_per_s": 10.0, "compile_per_s": 16.0}}
    # train_ppo did not run (train_speedup null): train_nft's compiled speed-up stands in
    ok, numbers, _ = parse(_throughput_line(train_speedup=None), tmp_path, 0)
    assert ok and numbers["train_speedup"] == 1.6


@pytest.mark.parametrize("log, rc, says", [
    ("Traceback (most recent call last):\nRuntimeError: compile failed\n", 1, "RuntimeError: compile failed"),
    ("| workload | items per call |\n", 0, "no result line"),
    (_throughput_line() + "\nRuntimeError: late\n", 1, "RuntimeError: late"),
    (_throughput_line(train_speedup=float("nan")), 0, "train_speedup"),
    (_throughput_line().replace('"rollout_speedup": 2.0', '"rollout_speedup": 0.0'), 0, "rollout_speedup"),
])
def test_throughput_parser_fails_without_a_good_result_line(tmp_path, log, rc, says):
    ok, _, why = load_script("_acceptance_report").parse_throughput(log, tmp_path, rc)
    assert not ok and says in why


def test_throughput_step_is_a_row_of_the_report(tmp_path):
    report = load_script("_acceptance_report")
    (tmp_path / "logs").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "logs" / "bench_throughput.log").write_text(_throughput_line() + "\n")
    report.step(tmp_path, "bench_throughput", "throughput", 0, 12.34, 120)
    assert report.final(tmp_path, "gpu") == 0
    step = json.loads((tmp_path / "acceptance.json").read_text())["steps"][0]
    assert step["status"] == "pass" and step["seconds"] == 12.3 and step["numbers"]["rollout_speedup"] == 2.0
    row = (tmp_path / "acceptance.md").read_text().splitlines()[-1]
    assert row.startswith("| bench_throughput | pass | 12.3 | rollout_speedup 2, train_speedup 1.3, rollout_flat "
                          "(eager_per_s 10, compile_per_s 20), train_nft (eager_per_s 10, compile_per_s 16) |")


@pytest.mark.slow
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
    assert numbers["bench_throughput"]["rollout_speedup"] > 0 and numbers["bench_throughput"]["train_speedup"] > 0
    assert set(numbers["bench_throughput"]) == {"rollout_speedup", "train_speedup", "rollout_flat", "train_nft"}
    table = (tmp_path / "acceptance.md").read_text()
    assert table.count("| pass |") == len(STEPS)
