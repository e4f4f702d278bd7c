"""Text-rendering accuracy with a real OCR engine that runs offline.

The target text is the prompt's metadata entry ``target_key`` (default ``text``) when it has one (a
``diffrl.prompts.Prompt`` from a JSONL, parquet or ``datasets`` source), else the part of the prompt between the first
pair of double quotes. As Flow-GRPO defines it: the recognised text (all detections joined) and the target are
lower-cased with spaces removed; the distance is 0 when the target occurs in the recognised text, else their
Levenshtein distance, capped at the target's length; the score is ``1 - distance / len(target)``. A prompt with
neither scores NaN (the sample is left out of the update). Videos ``[B, F, 3, H, W]`` score every ``frame_stride``-th
frame and average.

Engines: ``rapidocr`` (default; its ONNX models ship in the wheel: ``pip install 'diffrl[ocr]'``) or ``tesseract``
(the ``tesseract`` binary on PATH).
"""
from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
from functools import lru_cache
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from rewards.shapes import to_pil


def target_text(prompt: str) -> Optional[str]:
    """The text between the first pair of double quotes, or None."""
    parts = prompt.split('"')
    return parts[1] if len(parts) >= 3 else None


def target_of(prompt: str, key: str = "text") -> Optional[str]:
    """The text an image of ``prompt`` should show: its metadata's ``key`` when set (not None), else the prompt's
    quoted text (``target_text``), else None. ValueError in one sentence when the metadata's value is not text."""
    value = getattr(prompt, "metadata", {}).get(key)
    if value is None:
        return target_text(prompt)
    if not isinstance(value, str):
        raise ValueError(f"ocr: the metadata {key!r} of prompt {prompt!r} is of type {type(value).__name__}, not the "
                         "text to read")
    return value


def normalise(text: str) -> str:
    return text.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_score(recognised: str, target: str) -> float:
    """Flow-GRPO's OCR reward for one image: ``1 - min(distance, len) / len`` on normalised texts."""
    rec, tgt = normalise(recognised), normalise(target)
    if not tgt:
        return math.nan
    dist = 0 if tgt in rec else min(levenshtein(rec, tgt), len(tgt))
    return 1 - dist / len(tgt)


@lru_cache(maxsize=1)
def _rapidocr() -> Callable:
    try:
        from rapidocr import RapidOCR
    except ImportError:
        raise ImportError("the ocr reward needs rapidocr and onnxruntime: pip install 'diffrl[ocr]'") from None
    return RapidOCR()


def read_rapidocr(image: np.ndarray) -> str:
    """All text rapidocr finds in an ``[H, W, 3]`` uint8 image, joined in detection order."""
    result = _rapidocr()(image)
    return "".join(result.txts or ())


def read_tesseract(image: np.ndarray) -> str:
    if shutil.which("tesseract") is None:
        raise RuntimeError("the ocr reward's tesseract engine needs the tesseract binary on PATH")
    from PIL import Image

    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        Image.fromarray(image).save(f.name)
        out = subprocess.run(["tesseract", f.name, "-", "--psm", "6"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip()


ENGINES = {"rapidocr": read_rapidocr, "tesseract": read_tesseract}


def build(engine: str = "rapidocr", frame_stride: int = 4, target_key: str = "text") -> Callable:
    """Registry factory: ``engine`` rapidocr or tesseract; ``frame_stride`` for videos; ``target_key`` the prompt
    metadata entry that holds the target text (``target_of``)."""
    if engine not in ENGINES:
        raise ValueError(f"ocr: unknown engine {engine!r}; choose one of {sorted(ENGINES)}")
    read = ENGINES[engine]

    def reward(media, prompts: Sequence[str]) -> dict[str, Tensor]:
        if isinstance(media, Tensor) and media.dim() == 5:
            frames = media[:, ::frame_stride]
            per_frame = [reward(frames[:, f], prompts)["ocr"] for f in range(frames.shape[1])]
            return {"ocr": torch.stack(per_frame, 1).mean(1)}
        scores = []
        for img, prompt in zip(to_pil(media), prompts):
            target = target_of(prompt, target_key)
            scores.append(math.nan if target is None else ocr_score(read(np.asarray(img.convert("RGB"))), target))
        return {"ocr": torch.tensor(scores, dtype=torch.float32)}

    return reward
