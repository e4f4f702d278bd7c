"""PickScore (Kirstain et al.): a CLIP ViT-H-14 fine-tuned on Pick-a-Pic preferences, published as a transformers
``CLIPModel`` (yuvalkirstain/PickScore_v1) with the laion/CLIP-ViT-H-14-laion2B-s32B-b79K processor. The score is
``logit_scale.exp() * cos(image, prompt)`` (about 18-24 on real images; Flow-GRPO divides by 26, which a reward
weight of 1/26 reproduces)."""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import torch.nn.functional as F
from torch import Tensor

from rewards.clip_common import RewardModelError, as_tensor, preprocess


@lru_cache(maxsize=4)
def _load(model: str, processor: str, device: str) -> tuple[Any, Any, dict]:
    from transformers import CLIPModel, CLIPProcessor

    try:
        clip = CLIPModel.from_pretrained(model).to(device).eval().requires_grad_(False)
        proc = CLIPProcessor.from_pretrained(processor)
    except OSError as e:
        raise RewardModelError(f"pickscore: cannot load {model!r} / processor {processor!r}: give local folders or "
                               f"hub ids reachable from here ({str(e).splitlines()[0]})") from None
    ip = proc.image_processor
    size = ip.crop_size if isinstance(ip.crop_size, int) else ip.crop_size["height"]  # a dict or SizeDict
    return clip, proc.tokenizer, {"size": size, "mean": ip.image_mean, "std": ip.image_std}


def build(model: str = "yuvalkirstain/PickScore_v1", processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
          device: str = "cpu") -> "callable":
    """Registry factory: ``model`` and ``processor`` are hub ids or local folders (transformers format)."""
    clip, tokenizer, cfg = _load(model, processor, device)

    def reward(media, prompts: Sequence[str]) -> dict[str, Tensor]:
        pixels = preprocess(as_tensor(media).to(device), cfg["size"], cfg["mean"], cfg["std"])
        img = clip.get_image_features(pixel_values=pixels)
        tok = tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        txt = clip.get_text_features(**tok)
        img, txt = (getattr(o, "pooler_output", o) for o in (img, txt))  # transformers 5 returns output objects
        cos = (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1)
        return {"pickscore": (clip.logit_scale.exp().float() * cos).cpu()}

    return reward
