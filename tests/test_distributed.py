"""Two CPU processes under ``accelerate launch`` shard the prompts and compute the same advantages as one."""
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests_helpers import LAUNCH, launch_train

pytestmark = pytest.mark.slow


def run(out: Path, launcher: list[str]) -> str:
    return launch_train(launcher, out, ["train.steps=2", "log.save_advantages=true"])


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
