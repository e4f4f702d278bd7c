"""Reward throughput (images/s, or clips/s for av_sync) for a batch of 16, on CPU or a GPU.

CLIP-family rewards run their full-size architectures with random weights (no weights can be downloaded here):
ViT-L-14 for clip_score and aesthetic, and a ViT-H-14 CLIP score standing for HPSv2 and PickScore, whose cost is
that backbone's (their heads are a dot product). The speed is the real one, the scores are not. OCR runs
rapidocr's bundled models on rendered text.

    python scripts/bench_rewards.py [--device cpu|cuda] [--batch 16] [--repeats 3] [--only shapes ocr ...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch
from PIL import Image, ImageDraw, ImageFont

import rewards
from diffrl.shapes import prompts as shapes_prompts
from rewards.aesthetic import AestheticHead


def images(n: int, size: int) -> list[Image.Image]:
    out = []
    for i in range(n):
        img = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(img).text((size // 10, size // 3), f"DIFFRL {i}", fill="black",
                                 font=ImageFont.load_default(size=size // 8))
        out.append(img)
    return out


def builders(device: str, tmp: str) -> dict:
    head = os.path.join(tmp, "head.pth")
    torch.save(AestheticHead(768).state_dict(), head)
    return {
        "shapes": lambda: rewards.load("shapes"),
        "jpeg_compressibility": lambda: rewards.load("jpeg_compressibility"),
        "ocr": lambda: rewards.load("ocr"),
        "av_sync": lambda: rewards.load("av_sync"),
        "clip_score": lambda: rewards.load("clip_score", model="ViT-L-14", pretrained=None, device=device),
        "aesthetic": lambda: rewards.load("aesthetic", weights=head, model="ViT-L-14", pretrained=None, device=device),
        "clip ViT-H-14 (hpsv2, pickscore)": lambda: rewards.load("clip_score", model="ViT-H-14", pretrained=None,
                                                                 device=device),
    }


def media_for(name: str, batch: int):
    if name == "av_sync":
        return {"video": torch.rand(batch, 49, 3, 64, 64), "audio": torch.randn(batch, 1, 32000), "sample_rate": 16000,
                "fps": 24.0}
    return images(batch, 32 if name == "shapes" else 256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name, build in builders(args.device, tmp).items():
            if args.only and name not in args.only:
                continue
            reward = build()
            media = media_for(name, args.batch)
            prompts = (shapes_prompts(args.batch) if name == "shapes"
                       else [f'a sign that says "DIFFRL {i}"' for i in range(args.batch)])
            reward(media, prompts)  # warm-up: model loads, first-call allocations
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                reward(media, prompts)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            per_s = args.batch * args.repeats / (time.perf_counter() - t0)
            rows[name] = round(per_s, 2)
            print(f"{name:34s} {per_s:9.2f} {'clips' if name == 'av_sync' else 'images'}/s", flush=True)
    print(json.dumps({"device": args.device, "batch": args.batch, "per_s": rows,
                      "machine": f"{platform.machine()} / {os.cpu_count()} cpus / torch {torch.__version__}"}))


if __name__ == "__main__":
    main()
