"""Shared settings of the trainer tests: the shipped model at a tiny budget."""
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

from diffrl.adapters.sd3 import SD3Adapter

ROOT = Path(__file__).resolve().parents[1]
MODEL = os.environ.get("DIFFRL_TEST_MODEL", str(ROOT / "assets" / "tiny-sd3-shapes"))
TINY = [f"model.path={MODEL}", "rewards={shapes_partial: 1.0}", "sampler.num_steps=4", "sampler.split_steps=[1]",
        "sampler.eval_steps=4", "train.prompts_per_step=2", "data.eval_size=4", "log.eval_every=0",
        "log.sample_every=0", "log.tensorboard=false"]


def brightness(media, prompts):
    """A continuous test reward (mean pixel value, images or videos): every leaf differs, so advantages are never
    all zero."""
    return {"brightness": media.float().flatten(1).mean(1)}


BRIGHT = "rewards={'tests_helpers:brightness': 1.0}"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
          "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
"""Two processes through accelerate's multi-process launcher (torchrun underneath, gloo on CPUs; its ``--cpu`` flag
would start a single process)."""
SUBPROCESS_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "tests")}


def darkness(media, prompts):
    """The negated ``brightness`` reward."""
    return {"darkness": -media.float().flatten(1).mean(1)}



class TwoStreamSD3(SD3Adapter):
    """The tiny SD3 adapter with its latent declared as two streams (channel 0 "video", the rest "audio"): exercises
    the trainer's per-stream log-probs and reward routing without a joint audio-video model."""

    @property
    def streams(self):
        plane = self.latent_shape[1] * self.latent_shape[2]
        return {"video": slice(0, plane), "audio": slice(plane, self.latent_shape[0] * plane)}


def video_brightness(media, prompts):
    """Audio-video test reward on the video stream: mean pixel value of the frames."""
    return {"video_brightness": media["video"].float().flatten(1).mean(1)}


def loudness(media, prompts):
    """Audio-video test reward on the audio stream: mean absolute amplitude of the waveform."""
    return {"loudness": media["audio"].float().abs().flatten(1).mean(1)}


def launch_train(launcher: list, out: Path, overrides: list, flags: tuple = ()) -> str:
    """``diffrl train configs/tiny_shapes_tree.yaml`` at the tiny budget in subprocesses started by ``launcher`` (one
    process: ``[sys.executable]``; two: ``LAUNCH``), one thread each; returns stderr (asserting success)."""
    import subprocess

    args = [str(ROOT / "configs" / "tiny_shapes_tree.yaml"), *TINY, "train.prompts_per_step=4", BRIGHT, *overrides,
            "--out", str(out), *flags]
    done = subprocess.run([*launcher, "-m", "diffrl", "train", *args], capture_output=True, text=True,
                          env={**SUBPROCESS_ENV, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as a module (scripts/ is not a package), for tests of its functions."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_lora(folder: Path):
    """The tiny model with a LoRA of random weights (so it samples differently), saved in the diffusers format to
    ``folder``; returns the adapter."""
    import torch

    from diffrl.inference import load_for_inference

    ad = load_for_inference(MODEL)
    ad.add_lora(4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ad.trainable_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    ad.save_lora(str(folder))
    return ad


GUARD = {"value": 1.0}
"""What ``scripted_guard`` scores every sample; a test sets it to script a drop."""


def scripted_guard(media, prompts):
    """A guard reward whose value the test scripts (``GUARD["value"]``), to make the alarm fire at a known step."""
    return {"scripted": torch.full((len(prompts),), GUARD["value"])}


GROUPS: list = []
"""What ``recording_group_reward`` saw: (group size, prompt, the scores it returned) per call."""


def recording_group_reward(media, prompt):
    """A groupwise test reward: the brightness of each sample of one prompt's group, recorded in ``GROUPS``."""
    scores = media.float().flatten(1).mean(1)
    GROUPS.append((len(media), str(prompt), scores.clone()))
    return {"group_brightness": scores}


recording_group_reward.groupwise = True
