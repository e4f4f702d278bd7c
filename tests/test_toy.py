"""The toy main job: the whole loop (tree rollout, rewards, advantages, clipped updates) on a 2-D flow model."""
import json
import subprocess
import sys

import pytest
import torch

from diffrl.toy import ToyConfig, ToyVelocity, run


def test_toy_run_improves_the_reward_and_starts_on_policy(tmp_path):
    cfg = ToyConfig(iterations=30, pretrain_steps=400, eval_samples=512, out=str(tmp_path))
    summary = run(cfg, log=None)
    assert summary["first_ratio_mean"] == 1.0  # exact: rollout and re-scoring see the same model and latents
    assert summary["reward_after"] > summary["reward_before"] + 0.05
    assert summary["nfe_per_iteration"] == 8 * 46  # 8 trees of TreeSchedule(10, [1, 3, 5])
    for name in ("samples.png", "reward.png", "metrics.jsonl", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 30 and json.loads(lines[0])["ratio_mean"] == 1.0


def test_flat_mode_uses_group_advantages(tmp_path):
    summary = run(ToyConfig(iterations=2, pretrain_steps=50, eval_samples=64, flat=True, out=str(tmp_path)), log=None)
    assert summary["mode"] == "flat" and summary["nfe_per_iteration"] == 64 * 10


def test_velocity_model_shapes():
    assert ToyVelocity()(torch.randn(5, 2), torch.rand(5)).shape == (5, 2)


@pytest.mark.slow
def test_cli_runs_the_toy_job(tmp_path):
    out = subprocess.run([sys.executable, "-m", "diffrl", "toy", "--iterations", "3", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "mean reward" in out.stdout and "toy velocity field" in out.stdout


def test_cli_rejects_bad_iterations(capsys):
    from diffrl.cli import main

    assert main(["toy", "--iterations", "0"]) == 2
    assert "--iterations must be >= 1" in capsys.readouterr().err
