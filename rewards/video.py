"""Image rewards on videos: score sampled frames with any image reward and reduce them (mean or min), and a
media-only temporal-consistency score.

``rewards.load("video:clip_score", stride=4, reduction="min", pretrained=None, ...)``: the options other than
``stride`` and ``reduction`` go to the image reward.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

REDUCTIONS = {"mean": lambda x: x.mean(1), "min": lambda x: x.min(1).values}


def temporal_consistency(video: Tensor) -> Tensor:
    """``1 - mean |x_t - x_{t-1}|`` over consecutive frames: ``[B, F, C, H, W]`` in [0, 1] -> ``[B]`` in [0, 1]."""
    if video.shape[1] < 2:
        return torch.ones(video.shape[0])
    return 1 - (video[:, 1:].float() - video[:, :-1].float()).abs().mean(dim=(1, 2, 3, 4))


def on_frames(image_reward: Callable, stride: int = 4, reduction: str = "mean") -> Callable:
    """A video reward from an image reward: every ``stride``-th frame scored, each score reduced over frames, plus
    ``temporal_consistency``. Media: ``[B, F, 3, H, W]`` in [0, 1], or audio-video media whose ``"video"`` is."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"video reward: unknown reduction {reduction!r}; choose one of {sorted(REDUCTIONS)}")
    if stride < 1:
        raise ValueError(f"video reward: stride must be >= 1, got {stride}")

    def reward(media, prompts: Sequence[str]) -> dict[str, Tensor]:
        if isinstance(media, dict):  # audio-video media: the frames
            media = media.get("video")
        if not isinstance(media, Tensor) or media.dim() != 5:
            raise ValueError("video rewards take a [B, F, C, H, W] tensor in [0, 1] (or audio-video media with one)")
        frames = media[:, ::stride]
        b, f = frames.shape[:2]
        per = image_reward(frames.flatten(0, 1), [p for p in prompts for _ in range(f)])
        out = {k: REDUCTIONS[reduction](torch.as_tensor(v, dtype=torch.float32).view(b, f)) for k, v in per.items()}
        out["temporal_consistency"] = temporal_consistency(media)
        return out

    return reward
