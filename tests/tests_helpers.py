"""Shared settings of the trainer tests: the shipped model at a tiny budget."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = os.environ.get("DIFFRL_TEST_MODEL", str(ROOT / "assets" / "tiny-sd3-shapes"))
TINY = [f"model.path={MODEL}", "rewards={shapes_partial: 1.0}", "sampler.num_steps=4", "sampler.split_steps=[1]",
        "sampler.eval_steps=4", "train.prompts_per_step=2", "data.eval_size=4", "log.eval_every=0",
        "log.sample_every=0", "log.tensorboard=false"]


def brightness(media, prompts):
    """A continuous test reward (mean pixel value, images or videos): every leaf differs, so advantages are never all zero."""
    return {"brightness": media.float().flatten(1).mean(1)}


BRIGHT = "rewards={'tests_helpers:brightness': 1.0}"
SUBPROCESS_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "tests")}


def darkness(media, prompts):
    """The negated ``brightness`` reward."""
    return {"darkness": -media.float().flatten(1).mean(1)}
