"""HPSv2 / HPSv2.1 human preference score: an open_clip ViT-H-14 fine-tuned by Wu et al.; the score is the cosine
of the image and prompt embeddings (no logit scale), images resized on the long side and zero-padded to a square
as HPSv2 evaluates them. Checkpoints: ``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt`` (hub xswu/HPSv2),
given as a local path; their ``state_dict`` entry is read with ``torch.load(weights_only=True)``."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from rewards.clip_common import RewardModelError, as_tensor, embed_images, embed_texts, open_clip_model

HINT = "download HPS_v2.1_compressed.pt from the hub repository xswu/HPSv2 and pass checkpoint=PATH"


def build(checkpoint: Optional[str] = None, model: str = "ViT-H-14", device: str = "cpu") -> "callable":
    """Registry factory: ``checkpoint`` the HPSv2 file (required for ViT-H-14; other ``model`` names are for tests)."""
    if checkpoint is None and model == "ViT-H-14":
        raise RewardModelError(f"hpsv2: no checkpoint given; {HINT}")
    clip, tokenizer, cfg = open_clip_model(model, None, device, checkpoint, HINT)

    def reward(media, prompts: Sequence[str]) -> dict[str, Tensor]:
        img = embed_images(clip, cfg, as_tensor(media), device, pad_square=True)
        return {"hpsv2": (img * embed_texts(clip, tokenizer, prompts, device)).sum(-1).cpu()}

    return reward
