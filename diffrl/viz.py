"""Pictures people would rather look at than read: sample grids with captions (PIL), and plots (matplotlib, drawn
off-screen by Agg) of training curves, reward sweeps and 2-D samples. Each plot function saves a PNG and returns
its ``Figure``, so a test can read back the drawn data, the labels and the legend."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import torch
from PIL import Image, ImageDraw
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100  # PNG pixels per figure inch: a (8, 6)-inch figure is an 800 x 600 PNG


def _figure(width: float, height: float) -> Figure:
    """An empty ``width`` x ``height``-inch figure on an Agg canvas: it renders to files only, so plotting never
    needs a display, and matplotlib's global pyplot state (and its figure registry) stays untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Figure:
    """Write ``fig`` to ``path`` at ``DPI`` (the size set in ``_figure``, never trimmed) and return it."""
    fig.savefig(path, dpi=DPI)
    return fig


def scatter_pair(before: Tensor, after: Tensor, centers: Tensor, path: Path, titles: Sequence[str],
                 extent: float = 3.2) -> Figure:
    """Two scatter plots side by side (1000 x 600 px) of ``[n, 2]`` samples, ``before`` and ``after``, over the
    ``[m, 2]`` mode ``centers`` (row 0, the target mode, in red), both on the square ``[-extent, extent]``."""
    fig = _figure(10, 6)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    for ax, points, title in zip(axes, (before, after), titles):
        ax.scatter(points[:, 0].tolist(), points[:, 1].tolist(), s=2, alpha=0.4, color="tab:blue", linewidths=0,
                   label="sample")
        ax.scatter(centers[1:, 0].tolist(), centers[1:, 1].tolist(), s=250, facecolors="none", edgecolors="gray",
                   label="mode centre")
        ax.scatter(centers[:1, 0].tolist(), centers[:1, 1].tolist(), s=250, facecolors="none", edgecolors="red",
                   linewidths=1.5, label="target mode (rewarded)")
        ax.set(title=f"{title} ({len(points)} samples)", xlim=(-extent, extent), ylim=(-extent, extent),
               aspect="equal", xlabel="first coordinate")
    axes[0].set_ylabel("second coordinate")
    legend = fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3)
    legend.legend_handles[0].set_sizes([30])  # the samples' 2-point dots would not show in the legend
    legend.legend_handles[0].set_alpha(1.0)
    return _save(fig, path)


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: Path, title: str,
              x_label: str = "step", y_label: str = "value") -> Figure:
    """Several ``name -> (xs, ys)`` lines on one pair of axes (700 x 420 px), every data point marked, one legend
    entry per line."""
    fig = _figure(7, 4.2)
    ax = fig.subplots()
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", markersize=4, linewidth=1.5, label=name)
    ax.set(title=title, xlabel=x_label, ylabel=y_label)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def image_grid(images: Tensor, path: Path, ncol: int, scale: int = 4, captions: Sequence[str] = ()) -> None:
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


def training_curves(history: Sequence[dict], evals: Sequence[dict], path: Path, window: int = 5,
                    events: Sequence[dict] = ()) -> Figure:
    """The run's ``curves.png`` over the RL step. Top: the training reward per step (``history``: metrics with
    ``step``, ``reward_mean``) and its trailing mean over ``window`` steps (one step's reward mostly shows which
    prompts it drew). Middle, when the run has guard rewards (``guard_<name>`` in ``history``): each guard's
    per-step value and trailing mean, never trained on, with the held-out samples' guard values at each evaluation.
    Bottom: held-out accuracy at each evaluation (``evals``: ``step``, ``accuracy`` and any ``accuracy_<kind>``),
    its value written at each point; on a 0-1 scale when it is a fraction. ``events``: the guards' alarms
    (``guard_events.jsonl``), a vertical line each, labelled with the action."""
    from matplotlib.ticker import MaxNLocator

    steps, rewards = [m["step"] for m in history], [m["reward_mean"] for m in history]
    guards = sorted({k for m in history for k in m if k.startswith("guard_") and not k.endswith("_se")})
    fig = _figure(8, 8.5 if guards else 6)
    axes = fig.subplots(3 if guards else 2, 1, sharex=True, height_ratios=(3, 2, 2) if guards else (3, 2))
    top, bottom = axes[0], axes[-1]
    top.plot(steps, rewards, marker="o", markersize=3, linewidth=1, alpha=0.6, label="each step (mean over its batch)")
    top.plot(steps, running_mean(rewards, window), linewidth=2.5, label=f"trailing mean of {window} steps")
    top.set(title="training reward per RL step", ylabel="training reward")
    if guards:
        middle = axes[1]
        for i, key in enumerate(guards):
            values = [m.get(key, float("nan")) for m in history]
            middle.plot(steps, values, linewidth=1, alpha=0.5, color=f"C{i + 4}")
            middle.plot(steps, running_mean(values, window), linewidth=2.5, color=f"C{i + 4}",
                        label=f"{key.removeprefix('guard_')}: trailing mean of {window} steps")
            at = [e for e in evals if key in e]
            if at:
                middle.plot([e["step"] for e in at], [e[key] for e in at], marker="D", linestyle="none",
                            color=f"C{i + 4}", label=f"{key.removeprefix('guard_')} on the held-out samples")
        middle.set(title="guard rewards (scored, never trained on)", ylabel="guard value")
    eval_steps = [e["step"] for e in evals]
    kinds = sorted({k for e in evals for k in e if k.startswith("accuracy_")})
    for i, kind in enumerate(kinds):  # colours C0 and C1 are the reward's, above
        bottom.plot(eval_steps, [e.get(kind, float("nan")) for e in evals], marker="s", markersize=4, color=f"C{i + 2}",
                    linestyle="--", linewidth=1, label=f"{kind.removeprefix('accuracy_')} prompts")
    accuracy = [e["accuracy"] for e in evals]
    bottom.plot(eval_steps, accuracy, marker="o", markersize=6, linewidth=2, color="black", label="all prompts")
    for x, y in zip(eval_steps, accuracy):
        bottom.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    if all(0.0 <= a <= 1.0 for a in accuracy):
        bottom.set_ylim(0.0, 1.0)
    bottom.set(title="held-out accuracy at each evaluation", xlabel="RL step", ylabel="held-out accuracy")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        for e in events:
            ax.axvline(e["step"], color="red", linestyle=":", linewidth=1.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for e in events:
        top.annotate(f"{e['guard']}: {e['action']}", (e["step"], 1), xycoords=("data", "axes fraction"),
                     xytext=(3, -12), textcoords="offset points", color="red", fontsize=8)
    return _save(fig, path)


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
