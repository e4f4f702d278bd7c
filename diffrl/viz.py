"""Small pictures people would rather look at than read: scatter plots and reward curves (PIL only)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw
from torch import Tensor

_SIZE = 320
_PAD = 24


def _scatter(points: Tensor, centers: Tensor, title: str, extent: float = 3.2) -> Image.Image:
    img = Image.new("RGB", (_SIZE, _SIZE + _PAD), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 6), title, fill="black")
    to_px = lambda p: (_SIZE / 2 + p[0] / extent * _SIZE / 2, _PAD + _SIZE / 2 - p[1] / extent * _SIZE / 2)  # noqa: E731
    for i, c in enumerate(centers.tolist()):
        x, y = to_px(c)
        d.ellipse([x - 9, y - 9, x + 9, y + 9], outline="red" if i == 0 else "gray")
    for p in points.tolist():
        x, y = to_px(p)
        d.point((x, y), fill=(30, 60, 200))
    return img


def scatter_pair(before: Tensor, after: Tensor, centers: Tensor, path: Path, titles: Sequence[str]) -> None:
    """Side-by-side scatter plots of ``[n, 2]`` samples with mode centres (the target mode circled in red)."""
    left, right = _scatter(before, centers, titles[0]), _scatter(after, centers, titles[1])
    canvas = Image.new("RGB", (2 * _SIZE, _SIZE + _PAD), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (_SIZE, 0))
    canvas.save(path)


def reward_curve(values: Sequence[float], path: Path, title: str) -> None:
    """A line plot of ``values`` against their index."""
    w, h, m = 480, 260, 36
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    pts = [(m + i / max(len(values) - 1, 1) * (w - 2 * m), h - m - (v - lo) / span * (h - 2 * m))
           for i, v in enumerate(values)]
    d.rectangle([m, m, w - m, h - m], outline="gray")
    if len(pts) > 1:
        d.line(pts, fill=(30, 60, 200), width=2)
    d.text((m, 8), title, fill="black")
    d.text((4, m - 4), f"{hi:.2f}", fill="black")
    d.text((4, h - m - 6), f"{lo:.2f}", fill="black")
    d.text((w - m - 30, h - m + 6), f"{len(values)} it", fill="black")
    img.save(path)
