"""RL guidance and classifier-free guidance combines (layer L1: pure torch). RLG: arXiv 2508.21016.

v_RLG = v_ref + w (v_rl - v_ref): w = 0 is the reference model, 1 the fine-tuned one, w > 1 extrapolates. Sampling
with w is sampling from p_ref^(1 - w) p_rl^w, i.e. the KL-regularised optimum with KL weight beta / w.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from diffrl.sde import append_dims
from diffrl.types import Latents

Scale = Union[float, Tensor]


def _combine(a: Latents, b: Latents, scale: Scale) -> Latents:
    """(1 - scale) a + scale b = a + scale (b - a), for tensors or dicts of streams; ``scale`` a float or ``[B]``.

    Written as a convex-style combination so that scale 0 returns ``a`` and scale 1 returns ``b`` bit for bit.
    """
    if isinstance(a, dict):
        return {k: _combine(a[k], b[k], scale) for k in a}
    s = append_dims(scale.to(a.device, a.dtype), a.ndim) if isinstance(scale, Tensor) else scale
    return (1 - s) * a + s * b


def rl_guidance(v_ref: Latents, v_rl: Latents, scale: Scale) -> Latents:
    """RLG velocity ``v_ref + scale (v_rl - v_ref)``; like ``v_ref`` (``[B, ...]`` or a dict of streams)."""
    return _combine(v_ref, v_rl, scale)


def classifier_free_guidance(v_uncond: Latents, v_cond: Latents, scale: Scale) -> Latents:
    """Classifier-free guidance ``v_uncond + scale (v_cond - v_uncond)``."""
    return _combine(v_uncond, v_cond, scale)


def guidance_schedule(num_steps: int, scale: float, *, kind: str = "constant", rl_only_steps: int = 0) -> Tensor:
    """``[T]`` fp32 RL-guidance scale per step.

    constant: ``scale`` everywhere. ramp: linear from 1 at step 0 to ``scale`` at the last step.
    ``rl_only_steps``: the first steps use the RL model alone (w = 1; RLG's zero-init option), which lets a
    sampler skip the reference pass there.
    """
    if kind == "constant":
        w = torch.full((num_steps,), float(scale))
    elif kind == "ramp":
        w = torch.linspace(1.0, float(scale), num_steps)
    else:
        raise ValueError(f"guidance schedule must be 'constant' or 'ramp', got {kind!r}")
    w[: max(rl_only_steps, 0)] = 1.0
    return w
