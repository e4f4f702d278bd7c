"""What the CLIP-family rewards share: loading an open_clip model once per process (with errors that say which file
is missing and how to get it), batched tensor preprocessing, and L2-normalised embeddings."""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class RewardModelError(RuntimeError):
    """A reward model's weights or configuration cannot be loaded."""


def as_tensor(media: Any) -> Tensor:
    """``[B, 3, H, W]`` float in [0, 1] from a list of PIL images or such a tensor (frames of a video: flatten
    first)."""
    if isinstance(media, Tensor):
        if media.dim() != 4 or media.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got shape {tuple(media.shape)}")
        return media.float()
    import numpy as np

    arrays = [np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in media]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def preprocess(images: Tensor, size: int, mean: Sequence[float], std: Sequence[float],
               pad_square: bool = False) -> Tensor:
    """Resize the shorter side to ``size`` (bicubic, antialiased), centre-crop, normalise: ``[B, 3, size, size]``.

    ``pad_square`` instead resizes the longer side and zero-pads to a square (HPSv2's evaluation transform).
    """
    h, w = images.shape[-2:]
    scale = size / (max(h, w) if pad_square else min(h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    x = F.interpolate(images, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    if pad_square:
        top, left = (size - nh) // 2, (size - nw) // 2
        x = F.pad(x, (left, size - nw - left, top, size - nh - top))
    else:
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def check_file(path: Optional[str], what: str, how: str) -> None:
    """One sentence when a local weight file the user named is missing."""
    if path and not os.path.exists(path) and ("/" in path or path.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        raise RewardModelError(f"{what}: weight file {path!r} not found (looked in {os.path.abspath(path)}); {how}")


@lru_cache(maxsize=8)
def open_clip_model(name: str, pretrained: Optional[str], device: str, state_dict_file: Optional[str] = None,
                    hint: str = "give a local checkpoint path or an open_clip pretrained tag") -> tuple[Any, Any, dict]:
    """``(model, tokenizer, preprocess_cfg)`` for an open_clip architecture, loaded once per process.

    ``pretrained`` is an open_clip tag (downloaded by open_clip), a local checkpoint path, or None for random
    weights (tests). ``state_dict_file`` is a fine-tuned checkpoint loaded over it (its ``state_dict`` entry, or the
    file itself, read with ``torch.load(weights_only=True)``); ``hint`` says how to get a missing file.
    """
    import open_clip

    check_file(pretrained, f"open_clip {name}", hint)
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device=device)
    except RuntimeError as e:
        raise RewardModelError(f"open_clip {name} with pretrained={pretrained!r}: {str(e).splitlines()[0]}") from None
    if state_dict_file is not None:
        if not os.path.exists(state_dict_file):
            raise RewardModelError(f"open_clip {name}: checkpoint {state_dict_file!r} not found (looked in "
                                   f"{os.path.abspath(state_dict_file)}); {hint}")
        state = torch.load(state_dict_file, map_location=device, weights_only=True)
        try:
            model.load_state_dict(state.get("state_dict", state))
        except RuntimeError as e:
            raise RewardModelError(f"open_clip {name}: {state_dict_file!r} does not match the architecture "
                                   f"({str(e).splitlines()[0]})") from None
    model.eval().requires_grad_(False)
    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    size = cfg.get("size", 224)
    cfg["size"] = size[0] if isinstance(size, (tuple, list)) else size
    cfg.setdefault("mean", OPENAI_MEAN)
    cfg.setdefault("std", OPENAI_STD)
    return model, open_clip.get_tokenizer(name), cfg


def embed_images(model: Any, cfg: dict, images: Tensor, device: str, pad_square: bool = False) -> Tensor:
    """L2-normalised image embeddings ``[B, D]``."""
    x = preprocess(images.to(device), cfg["size"], cfg["mean"], cfg["std"], pad_square)
    return F.normalize(model.encode_image(x).float(), dim=-1)


def embed_texts(model: Any, tokenizer: Any, prompts: Sequence[str], device: str) -> Tensor:
    """L2-normalised text embeddings ``[B, D]``."""
    return F.normalize(model.encode_text(tokenizer(list(prompts)).to(device)).float(), dim=-1)
