"""A control reward that carries no information: uniform noise in [0, 1), seeded by each image's bytes.

RL with it measures how far a run drifts from the base model when the update has no signal at all; a real reward
should end at least as well. Used by README "Status of the embedded model":

    PYTHONPATH=examples diffrl train configs/tiny_shapes.yaml "rewards={noise_reward:reward: 1.0}" --out runs/noise
"""
import hashlib

import torch


def reward(media: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """``{"noise": [B]}``: one reproducible uniform draw per image ``[B, 3, H, W]``."""
    draws = []
    for img in media:
        seed = int(hashlib.sha256(img.detach().float().cpu().numpy().tobytes()).hexdigest()[:8], 16)
        draws.append(torch.rand(1, generator=torch.Generator().manual_seed(seed)))
    return {"noise": torch.cat(draws)}
