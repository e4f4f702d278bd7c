"""CLIP score: cosine similarity of open_clip image and prompt embeddings (ViT-L-14 / openai by default, as the
anchors use). In [-1, 1]; multiply by a reward weight for the 0-100 scale some papers print."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from rewards.clip_common import as_tensor, embed_images, embed_texts, open_clip_model


def build(model: str = "ViT-L-14", pretrained: Optional[str] = "openai", device: str = "cpu") -> "callable":
    """Registry factory: ``model`` an open_clip architecture, ``pretrained`` its tag or a local checkpoint."""
    clip, tokenizer, cfg = open_clip_model(model, pretrained, device)

    def reward(media, prompts: Sequence[str]) -> dict[str, Tensor]:
        img = embed_images(clip, cfg, as_tensor(media), device)
        txt = embed_texts(clip, tokenizer, prompts, device)
        return {"clip_score": (img * txt).sum(-1).cpu()}

    return reward
