"""The trainer end to end on a GPU: ``python -m diffrl train`` on the shipped tiny model in bfloat16 on CUDA, as the
clipped-ratio tree recipe, as DiffusionNFT, with FP8 exploration on torchao's GEMMs, and in two processes.

Marked ``gpu`` (``pytest -m gpu``; ``scripts/gpu_acceptance.sh`` runs them). The device is ``DIFFRL_TEST_DEVICE``
(default ``cuda``): without a CUDA GPU they skip, so a plain CPU ``pytest`` spends nothing on them;
``DIFFRL_TEST_DEVICE=cpu`` runs the same runs on the CPU in float32 (``gpu_acceptance.sh --dry-run``), where the
exploring run uses the emulated low-precision path and the two-process run skips (tests/test_distributed.py runs two
CPU processes).
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests_helpers import ROOT, TINY

DEVICE = os.environ.get("DIFFRL_TEST_DEVICE", "cuda")
CUDA = DEVICE.startswith("cuda")
DTYPE = "bfloat16" if CUDA else "float32"
STEPS = 2

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(CUDA and not torch.cuda.is_available(),
                                 reason="no CUDA GPU (DIFFRL_TEST_DEVICE=cpu runs these on the CPU in float32)")]

# PYTHONPATH keeps what the environment had (the GPU machine's wheels are installed with pip --target onto it).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def train(launcher: list, config: str, overrides: list, out: Path) -> str:
    """``diffrl train configs/<config>`` at the tiny budget on DEVICE; asserts success and sound outputs, returns
    stderr (the log)."""
    args = [str(ROOT / "configs" / config), *TINY, f"model.device={DEVICE}", f"model.dtype={DTYPE}",
            f"train.steps={STEPS}", "data.eval_seeds=1", *overrides, "--out", str(out)]
    done = subprocess.run([*launcher, "-m", "diffrl", "train", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "summary.json").is_file(), done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS
    for key in ("base_accuracy", "final_accuracy"):
        assert math.isfinite(summary[key]) and 0.0 <= summary[key] <= 1.0, summary
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == STEPS
    for m in metrics:
        numbers = {k: v for k, v in m.items() if isinstance(v, (int, float))}
        assert all(math.isfinite(v) for v in numbers.values()), m
        assert "reward_mean" in numbers and "train_s" in numbers, m
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    return done.stderr


def test_clipped_ratio_tree_run(tmp_path):
    """Flow-GRPO / BranchGRPO: clipped-ratio updates on branching trees (configs/tiny_shapes_tree.yaml)."""
    train([sys.executable], "tiny_shapes_tree.yaml", [], tmp_path)


def test_diffusion_nft_run(tmp_path):
    """The main job's recipe: DiffusionNFT on flat chains, CFG-free (configs/tiny_shapes.yaml)."""
    train([sys.executable], "tiny_shapes.yaml", ["sampler.split_steps=[]", "train.trees_per_prompt=2"], tmp_path)


def test_exploring_run(tmp_path):
    """Sol-RL exploration (configs/tiny_shapes_explore.yaml): FP8 previews on torchao's GEMMs where the GPU has them
    (compute capability 8.9+), the kept chains regenerated in full precision and trained on."""
    if CUDA:
        cap = torch.cuda.get_device_capability()
        if importlib.util.find_spec("torchao") is None:
            pytest.skip("torchao is not installed: FP8 exploration would be emulated (pip install 'diffrl[quant]')")
        if cap < (8, 9):
            pytest.skip(f"FP8 GEMMs need compute capability 8.9+, this GPU has {cap[0]}.{cap[1]}")
    backend = "native" if CUDA else "emulated"
    log = train([sys.executable], "tiny_shapes_explore.yaml",
                ["sampler.split_steps=[]", "explore.candidates=4", "explore.keep=2", f"explore.backend={backend}"],
                tmp_path)
    assert f"fp8, {backend} path" in log
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(m["explore_s"] > 0 and m["regen_s"] > 0 for m in metrics)


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_processes(tmp_path, fsdp):
    """Two processes (torchrun), one GPU each: prompts sharded, rewards gathered over NCCL; with ``fsdp``, the
    LoRA on an FSDP2-sharded base loaded shard by shard, sharded checkpoints."""
    if not CUDA:
        pytest.skip("two GPU processes need a GPU each; tests/test_distributed.py runs two CPU processes")
    if torch.cuda.device_count() < 2:
        pytest.skip(f"two processes need 2 GPUs, this machine has {torch.cuda.device_count()}")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    log = train(launcher, "tiny_shapes_tree.yaml", ["train.prompts_per_step=4", "model.device=cuda",
                                                    f"model.fsdp={str(fsdp).lower()}", "log.checkpoint_every=1"],
                tmp_path)
    assert "process 0 of 2 processes (local rank 0, cuda:0)" in log
    assert "process 1 of 2 processes (local rank 1, cuda:1)" in log
    if fsdp:
        assert "sharded over 2 processes" in log and (tmp_path / f"checkpoint-{STEPS:06d}" / "sharded").is_dir()
