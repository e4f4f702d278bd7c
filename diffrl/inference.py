"""Sampling and evaluation with a base model and an optional LoRA (``diffrl sample`` / ``diffrl eval``)."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from diffrl.adapters.base import ModelLoadError
from diffrl.rollout import tree_rollout
from diffrl.tree import TreeSchedule, mix_seed


@torch.no_grad()
def sample(adapter, prompts: Sequence[str], seed: int, steps: int, guidance: float, max_batch: int = 64,
           reference: bool = False, first: int = 0) -> Tensor:
    """Deterministic (ODE) samples ``[n, 3, H, W]`` in [0, 1], one per prompt; sample ``i`` starts from the noise
    of ``mix_seed(seed, first + i)`` (``first``: where these prompts start in a longer list split between
    processes). ``reference=True`` samples with the LoRA adapters switched off."""
    seeds = [mix_seed(seed, first + i) for i in range(len(prompts))]
    velocity = lambda x, sigma, cond: adapter.velocity(x, sigma, cond, guidance)  # noqa: E731
    with adapter.reference() if reference else contextlib.nullcontext():
        ro = tree_rollout(velocity, TreeSchedule(steps), adapter.sigmas(steps), seeds, adapter.latent_shape,
                          kind="ode", cond=adapter.encode(list(prompts)), max_batch=max_batch, device=adapter.device)
    return adapter.decode(ro.leaves.flatten(0, 1))


EVAL_SEED, EVAL_STEPS, EVAL_GUIDANCE = 999, 20, 4.5
"""``diffrl eval``'s defaults: the seed, Euler steps and guidance scale of its deterministic sampler."""


def eval_accuracy(adapter, prompts: Sequence[str], seed: int = EVAL_SEED, steps: int = EVAL_STEPS,
                  guidance: float = EVAL_GUIDANCE) -> dict[str, float]:
    """What ``diffrl eval`` prints: verifier strict accuracy, overall and per kind, of one deterministic sample per
    prompt."""
    from diffrl.viz import stills

    return shapes_accuracy(stills(sample(adapter, prompts, seed, steps, guidance)), prompts)


def shapes_accuracy(images: Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Verifier strict accuracy overall and per prompt kind."""
    from diffrl.shapes import parse_prompt
    from rewards.shapes import shapes_reward

    strict = shapes_reward(images, list(prompts))["strict"]
    kinds = [parse_prompt(p).kind for p in prompts]
    out = {"accuracy": float(strict.mean())}
    for k in sorted(set(kinds)):
        out[f"accuracy_{k}"] = float(strict[[i for i, kk in enumerate(kinds) if kk == k]].mean())
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of ``k`` samples drawn without replacement from ``n`` samples, ``c`` of them
    correct, is correct: ``1 - C(n - c, k) / C(n, k)`` (the unbiased pass@k estimator of Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def check_lora_path(lora: str) -> None:
    """A LoRA argument must be an existing folder (a run's ``RUN_DIR/lora``), not a hub id."""
    if not Path(lora).is_dir():
        raise ModelLoadError(f"--lora {lora!r} does not exist or is not a folder (a diffrl run writes it to RUN_DIR/lora)")


def load_for_inference(model: str, lora: Optional[str] = None, device: str = "cpu", dtype: str = "float32",
                       family: str = "sd3", resolution: Optional[int] = None, num_frames: Optional[int] = None):
    """An adapter of ``family`` for ``model`` with a diffusers-format LoRA folder loaded (and fused off: adapters
    stay toggleable)."""
    from diffrl.adapters import load_adapter_class, shape_options

    adapter = load_adapter_class(family).from_pretrained(model, device=device, dtype=dtype,
                                                         **shape_options(resolution, num_frames))
    if lora:
        from diffusers.utils import logging as diffusers_logging

        check_lora_path(lora)
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # diffrl's LoRAs hold no text-encoder keys: one notice per encoder
        try:
            adapter.pipe.load_lora_weights(lora)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load the LoRA in {lora!r}: {str(e).splitlines()[0]}") from None
        finally:
            diffusers_logging.set_verbosity(level)
    return adapter
