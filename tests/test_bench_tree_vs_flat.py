"""scripts/bench_tree_vs_flat.py: its reward smoothing and time-to-target against hand-worked curves, and its
refusal of a flat config without --splits (before any model loads)."""
import subprocess
import sys

import pytest

from tests_helpers import ROOT, SUBPROCESS_ENV, load_script


def test_smoothed_is_the_trailing_mean():
    # over SMOOTH = 5 steps: 1, 2, 2, 3, 4 (the window fills up), then (3 + 2 + 6 + 8 + 9) / 5
    assert load_script("bench_tree_vs_flat").smoothed([1.0, 3.0, 2.0, 6.0, 8.0, 9.0]) == [1.0, 2.0, 2.0, 3.0, 4.0, 5.6]


def test_time_to_target_needs_a_full_window():
    metrics = [{"reward_mean": r, "rollout_s": 1.0, "train_s": 2.0} for r in (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0)]
    bench = load_script("bench_tree_vs_flat")
    assert bench.elapsed(metrics) == pytest.approx([3.0 * k for k in range(1, 9)])
    # the lucky first step (smoothed 1.0 over a window of one) does not count; full windows from step 5:
    # 1/5, 1/5, 2/5, 3/5 at 15, 18, 21 and 24 s
    assert bench.time_to(0.2, metrics) == pytest.approx(15.0)
    assert bench.time_to(0.5, metrics) == pytest.approx(24.0)
    assert bench.time_to(0.7, metrics) is None


def test_a_forest_is_compared_with_as_many_flat_chains_as_its_leaves():
    arms = load_script("bench_tree_vs_flat").arms(leaves=2, trees_per_prompt=4, objective="nft")
    assert arms == {"tree": ["train.trees_per_prompt=4", "train.advantage=grpo"],
                    "flat": ["sampler.split_steps=[]", "train.trees_per_prompt=8", "train.advantage=grpo"]}
    assert load_script("bench_tree_vs_flat").arms(8, 1, "ppo")["tree"] == ["train.trees_per_prompt=1",
                                                                            "train.advantage=tree"]


def test_flat_config_needs_splits():
    done = subprocess.run([sys.executable, "scripts/bench_tree_vs_flat.py", "--config", "configs/tiny_shapes.yaml"],
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300, cwd=ROOT)
    assert done.returncode != 0
    assert "has no sampler.split_steps: name the tree's with --splits" in done.stderr
    assert "Traceback" not in done.stderr
