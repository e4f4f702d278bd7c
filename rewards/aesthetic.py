"""The LAION improved aesthetic predictor: a linear MLP head (768-1024-128-64-16-1, dropout between, no
activations, as published) on the L2-normalised CLIP ViT-L/14 image embedding. Scores are on the predictor's
1-10 scale, unscaled (as DDPO and Flow-GRPO use them).

The head's weights (``sac+logos+ava1-l14-linearMSE.pth`` from christophschuhmann/improved-aesthetic-predictor) come
from a local path or a URL the user gives; they are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from rewards.clip_common import RewardModelError, as_tensor, embed_images, open_clip_model

WEIGHTS_HINT = ("download sac+logos+ava1-l14-linearMSE.pth from "
                "https://github.com/christophschuhmann/improved-aesthetic-predictor and pass weights=PATH")


class AestheticHead(nn.Module):
    """``[B, 768]`` normalised embeddings -> ``[B]`` scores; state-dict keys ``layers.{0,2,4,6,7}.*``."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_head(weights: str, dim: int = 768) -> AestheticHead:
    """The head with weights from a local file or a URL (cached by torch.hub)."""
    if weights.startswith(("http://", "https://")):
        path = os.path.join(torch.hub.get_dir(), "diffrl", os.path.basename(weights))
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(weights, path)
        weights = path
    if not os.path.exists(weights):
        raise RewardModelError(f"aesthetic head: weight file {weights!r} not found (looked in "
                               f"{os.path.abspath(weights)}); {WEIGHTS_HINT}")
    head = AestheticHead(dim)
    try:
        head.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except RuntimeError as e:
        raise RewardModelError(f"aesthetic head: {weights!r} is not the LAION predictor's state dict "
                               f"({str(e).splitlines()[0]})") from None
    return head.eval().requires_grad_(False)


def build(weights: Optional[str] = None, model: str = "ViT-L-14", pretrained: Optional[str] = "openai",
          device: str = "cpu") -> "callable":
    """Registry factory: ``weights`` the head's file or URL (required), ``model``/``pretrained`` the CLIP backbone."""
    if not weights:
        raise RewardModelError(f"aesthetic: no head weights given; {WEIGHTS_HINT}")
    clip, _, cfg = open_clip_model(model, pretrained, device)
    head = load_head(weights, clip.visual.output_dim).to(device)

    def reward(media, prompts: Sequence[str]) -> dict[str, Tensor]:
        return {"aesthetic": head(embed_images(clip, cfg, as_tensor(media), device)).cpu()}

    return reward
