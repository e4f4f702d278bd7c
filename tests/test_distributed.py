"""Two CPU processes under ``accelerate launch`` shard the prompts and compute the same advantages as one."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests_helpers import BRIGHT, LAUNCH, ROOT, SUBPROCESS_ENV, TINY

pytestmark = pytest.mark.slow


def run(out: Path, launcher: list[str]) -> str:
    args = [str(ROOT / "configs" / "tiny_shapes.yaml"), *TINY, "train.steps=2", "train.prompts_per_step=4",
            "log.save_advantages=true", BRIGHT, "--out", str(out)]
    env = {**SUBPROCESS_ENV, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, "-m", "diffrl", "train", *args], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_two_processes_give_the_advantages_of_one(tmp_path):
    run(tmp_path / "one", [sys.executable])
    log = run(tmp_path / "two", LAUNCH)
    assert "process 0 of 2 processes" in log and "process 1 of 2 processes" in log
    for step in (1, 2):
        name = f"advantages_step{step:05d}.safetensors"
        one = load_file(str(tmp_path / "one" / name))["node_advantages"]
        two = load_file(str(tmp_path / "two" / name))["node_advantages"]
        assert one.shape == (4, 1 + 1 + 2 + 2 + 2) and one.abs().sum() > 0
        torch.testing.assert_close(one, two, atol=1e-5, rtol=0)
