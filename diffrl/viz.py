"""Small pictures people would rather look at than read: scatter plots and reward curves (PIL only)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import torch
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


def image_grid(images, path: Path, ncol: int, scale: int = 4, captions: Sequence[str] = ()) -> None:
    """Save ``[n, 3, H, W]`` images in [0, 1] as a grid, upscaled ``scale``x (nearest), with optional captions."""
    import numpy as np

    arr = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    n, h, w, _ = arr.shape
    nrow = (n + ncol - 1) // ncol
    cap_h = 12 if captions else 0
    cell_w, cell_h = max(w * scale, 8), h * scale + cap_h
    canvas = Image.new("RGB", (ncol * cell_w, nrow * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, ncol)
        tile = Image.fromarray(np.ascontiguousarray(arr[i])).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (c * cell_w, r * cell_h + cap_h))
        if i < len(captions):
            draw.text((c * cell_w + 2, r * cell_h), captions[i][: cell_w // 6], fill="black")
    canvas.save(path)


def running_mean(ys: Sequence[float], window: int) -> list[float]:
    """Trailing mean of the last ``window`` values at each index (fewer at the start), for noisy per-step curves."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return [sum(ys[max(0, i + 1 - window) : i + 1]) / min(i + 1, window) for i in range(len(ys))]


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: Path, title: str,
              x_label: str = "step") -> None:
    """Several ``name -> (xs, ys)`` lines on one axis (each scaled to the shared y range)."""
    w, h, m = 560, 300, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs_all = [x for xs, _ in series.values() for x in xs] or [0, 1]
    ys_all = [y for _, ys in series.values() for y in ys] or [0, 1]
    x0, x1 = min(xs_all), max(xs_all) if max(xs_all) > min(xs_all) else min(xs_all) + 1
    y0, y1 = min(ys_all + [0.0]), max(ys_all + [1.0])
    d.rectangle([m, m, w - m, h - m], outline="gray")
    colors = [(30, 60, 200), (220, 60, 40), (40, 160, 60), (150, 60, 180)]
    for i, (name, (xs, ys)) in enumerate(series.items()):
        pts = [(m + (x - x0) / (x1 - x0) * (w - 2 * m), h - m - (y - y0) / (y1 - y0) * (h - 2 * m))
               for x, y in zip(xs, ys)]
        color = colors[i % len(colors)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for p in pts:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
        d.text((m + 8 + 150 * i, h - m + 14), name, fill=color)
    d.text((m, 10), title, fill="black")
    d.text((4, m - 6), f"{y1:.2f}", fill="black")
    d.text((4, h - m - 6), f"{y0:.2f}", fill="black")
    d.text((4, h - m + 2), f"{x_label} {x0:g}", fill="black")
    d.text((w - m - 40, h - m + 2), f"{x_label} {x1:g}", fill="black")
    img.save(path)


def training_curves(history: Sequence[dict], evals: Sequence[dict], path: Path, window: int = 5) -> None:
    """The run's ``curves.png``: training reward per step (``history``: metrics with ``step``, ``reward_mean``), its
    trailing mean over ``window`` steps (one step's reward mostly shows which prompts it drew) and held-out accuracy
    (``evals``: ``step``, ``accuracy``)."""
    steps, rewards = [m["step"] for m in history], [m["reward_mean"] for m in history]
    line_plot({"reward": (steps, rewards), f"reward, mean of {window}": (steps, running_mean(rewards, window)),
               "held-out accuracy": ([e["step"] for e in evals], [e["accuracy"] for e in evals])},
              path, "reward and held-out strict accuracy")


def stills(media: Union[Tensor, dict]) -> Tensor:
    """Images ``[n, 3, H, W]`` for grids and the shapes verifier: videos ``[n, F, 3, H, W]`` give their middle
    frame; audio-video media (``{"video": ..., "audio": ...}``) their video's."""
    if isinstance(media, dict):
        media = media["video"]
    return media[:, media.shape[1] // 2] if media.dim() == 5 else media


def cat_media(parts: list) -> Union[Tensor, dict]:
    """Concatenate decoded media along the batch: tensors, or audio-video dicts (tensor fields concatenated, the
    rest, such as ``fps`` and ``sample_rate``, taken from the first part)."""
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) if isinstance(v, Tensor) else v for k, v in parts[0].items()}
    return torch.cat(parts)
