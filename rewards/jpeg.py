"""DDPO's classic rewards: JPEG (in)compressibility, the size in kB (1000 bytes) of each image saved as JPEG at
quality 95. ``jpeg_compressibility`` is minus the size (smaller files score higher), ``jpeg_incompressibility``
the size itself; DDPO's definition, without Flow-GRPO's extra division by 500 (use the reward weight for that)."""
from __future__ import annotations

import io
from typing import Sequence

import torch
from torch import Tensor

from rewards.shapes import to_pil


def jpeg_kb(media, quality: int = 95) -> Tensor:
    """``(batch,)`` JPEG sizes in kB of a list of PIL images or a ``[B, 3, H, W]`` tensor in [0, 1]."""
    sizes = []
    for img in to_pil(media):
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


def build_compressibility(quality: int = 95) -> "callable":
    def reward(media, prompts: Sequence[str]) -> dict[str, Tensor]:
        return {"jpeg_compressibility": -jpeg_kb(media, quality)}

    return reward


def build_incompressibility(quality: int = 95) -> "callable":
    def reward(media, prompts: Sequence[str]) -> dict[str, Tensor]:
        return {"jpeg_incompressibility": jpeg_kb(media, quality)}

    return reward
