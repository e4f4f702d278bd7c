"""scripts/pretrain_tiny.py checkpoints its flow-matching stage: a run killed with SIGKILL and resumed saves the same
model as an uninterrupted run, and a resume that cannot continue exactly says why in one line."""
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from tests_helpers import ROOT, SUBPROCESS_ENV, load_script

TINY = ["--vae-steps", "2", "--steps", "20", "--batch", "2", "--checkpoint-every", "2", "--eval-per-kind", "2",
        "--rl-eval-n", "2"]
CMD = [sys.executable, str(ROOT / "scripts" / "pretrain_tiny.py")]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CMD + list(args), capture_output=True, text=True, timeout=600, env=SUBPROCESS_ENV)


def _weights(model_dir):
    return {sub: load_file(str(next((model_dir / sub).glob("*.safetensors"))))
            for sub in load_script("pretrain_tiny").MODULES}


@pytest.mark.slow
def test_killed_pretraining_resumes_to_the_same_model(tmp_path):
    done = _run("--out", str(tmp_path / "a"), *TINY)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "a-checkpoints").exists()  # removed once the model is saved
    proc = subprocess.Popen(CMD + ["--out", str(tmp_path / "b"), *TINY], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=SUBPROCESS_ENV)
    deadline = time.time() + 600
    while not (tmp_path / "b-checkpoints" / "checkpoint-000004").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert not (tmp_path / "b" / "training.json").exists()

    again = _run("--out", str(tmp_path / "b"), *TINY)
    assert again.returncode != 0 and "holds checkpoints of an earlier run: add --resume" in again.stderr
    other = _run("--out", str(tmp_path / "b"), *TINY[:3], "41", *TINY[4:], "--resume")
    assert other.returncode != 0
    assert "was written with other arguments" in other.stderr and "steps: 20, 41" in other.stderr

    resumed = _run("--out", str(tmp_path / "b"), *TINY, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for sub in a:
        assert a[sub].keys() == b[sub].keys()
        assert all((a[sub][k] == b[sub][k]).all() for k in a[sub]), sub


def test_resume_without_checkpoints_is_one_clear_line(tmp_path):
    done = _run("--out", str(tmp_path / "m"), *TINY, "--resume")
    assert done.returncode != 0
    assert f"--resume: no checkpoint in {tmp_path / 'm'}-checkpoints" in done.stderr
    assert "Traceback" not in done.stderr
