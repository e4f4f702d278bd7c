"""Suite reports (``diffrl eval --suite NAME --out DIR``): a suite's prompts sampled from the base model and from
fine-tuned ones with the same seeds, scored, summarised per category and written as a folder:

- ``report.json``: the settings and command, and per column (model) its ``overall`` and per-category scores and
  every sample's result (prompt, category, seed, scores and what the suite adds, e.g. GenEval's objects), so every
  number can be recomputed from the samples;
- ``report.md``: one table per metric, categories as rows and the models side by side, with each model's
  difference to the first;
- ``grids/CATEGORY.png``: each category's first samples, one row per prompt and one column per model.

Sample ``i`` of every column starts from the noise of ``mix_seed(seed, i)`` (``diffrl.inference.sample``), so the
columns differ only in the model.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from diffrl.distributed import first_process_runs
from diffrl.inference import sample_shared
from diffrl.seeding import mix_seed
from diffrl.suites import Item, Suite, summarize
from diffrl.viz import image_grid, stills

GRID_ROWS = 8
"""Prompts per category in the sample grids."""


@dataclass(frozen=True)
class Column:
    """One model of the report: its label, the LoRA folder to load (None: the base model alone) and whether to
    sample with that LoRA switched off (the base model, without loading it twice)."""

    label: str
    lora: Optional[str]
    reference: bool = False


def plan_columns(lora: Optional[str], compare: Sequence[str], base: bool = True) -> list[Column]:
    """The report's columns: the base model (unless ``base`` is False), then ``lora`` and each ``compare`` LoRA.
    The base model is sampled from ``lora``'s adapter with the LoRA switched off. ValueError when nothing is left."""
    loras = [lora, *compare] if lora else list(compare)
    columns = [Column("base", loras[0] if loras else None, reference=bool(loras))] if base else []
    columns += [Column(path, path) for path in loras]
    if not columns:
        raise ValueError("there is nothing to evaluate: --no-base needs --lora or --compare")
    return columns


def evaluate(suite: Suite, items: Sequence[Item], columns: Sequence[Column], load: Callable[[Optional[str]], Any],
             seed: int, steps: int, guidance: float, progress: Callable[[str], None] = print, rank: int = 0,
             world: int = 1) -> tuple[dict, dict]:
    """Sample and score ``items`` with every column's model (``load(lora) -> adapter``, called once per LoRA).
    Returns ``({label: {"lora", "overall", "categories", "wall_s", "samples"}}, {label: grid images [k, 3, H,
    W]})``; the grid images are each category's first ``GRID_ROWS`` samples, in ``grid_indices`` order. With
    ``world`` processes, each samples its share of the items (``sample_shared``) and the first one (``rank`` 0)
    scores them all (``first_process_runs``: a failure there stops every process); the others return ``({},
    {})``."""
    prompts, picked = [it.prompt for it in items], grid_indices(items)
    results, grids, adapter, adapter_lora = {}, {}, None, None
    for col in columns:
        if adapter is None or adapter_lora != col.lora:
            adapter = None  # the previous model is freed before the next one loads
            adapter, adapter_lora = load(col.lora), col.lora
        start = time.perf_counter()
        images = stills(sample_shared(adapter, prompts, seed, steps, guidance, reference=col.reference, rank=rank,
                                      world=world))
        scores = first_process_runs(functools.partial(suite.score, images, items))
        if rank != 0:
            continue
        samples = [{"index": i, "prompt": it.prompt, "category": it.category, "seed": mix_seed(seed, i), **result}
                   for i, (it, result) in enumerate(zip(items, scores))]
        wall_s = round(time.perf_counter() - start, 1)
        results[col.label] = {"lora": col.lora, **summarize(samples, suite.overall), "wall_s": wall_s,
                              "samples": samples}
        grids[col.label] = images[picked].cpu()
        progress(f"{col.label}: {suite.metric} {_fmt(results[col.label]['overall'][suite.metric])} "
                 f"({len(items)} samples, {wall_s:.0f} s)")
    return results, grids


def grid_indices(items: Sequence[Item]) -> list[int]:
    """The first ``GRID_ROWS`` sample indices of each category, categories in order of first appearance."""
    by_category: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_category.setdefault(it.category, []).append(i)
    return [i for rows in by_category.values() for i in rows[:GRID_ROWS]]


def report_of(suite: Suite, command: str, settings: dict, results: dict) -> dict:
    """``report.json``'s content: the suite, its headline metric and overall rule, the command, the settings (with
    the number of samples, the machine and the versions added) and the per-column results."""
    from diffrl import __version__

    first = next(iter(results.values()))
    settings = {**settings, "samples": len(first["samples"]), "machine": machine(settings.get("device", "cpu")),
                "diffrl": __version__, "torch": torch.__version__}
    return {"suite": suite.name, "metric": suite.metric, "overall_rule": suite.overall, "command": command,
            "settings": settings, "results": results}


def machine(device: str) -> str:
    """The accelerator's name on CUDA, else ``N-CPU <processor name>``."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        name = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.startswith("model name")), name)
    return f"{os.cpu_count()}-CPU {name}"


def _fmt(value: Optional[float], sign: bool = False) -> str:
    return "-" if value is None else f"{value:+.3f}" if sign else f"{value:.3f}"


def _slug(category: str) -> str:
    """A file name for a category."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", category) or "_"


def markdown(report: dict) -> str:
    """``report.md``: the settings, one table per metric (rows: categories, then the overall value; a column per
    model and each model's difference to the first) and the grids."""
    s, results = report["settings"], report["results"]
    labels = list(results)
    first = results[labels[0]]
    metrics = list(first["overall"])
    rule = "mean of the category means" if report["overall_rule"] == "categories" else "mean over samples"
    lines = [f"# `{report['suite']}` suite", "", f"`{report['command']}`", "",
             f"Model `{s['model']}`, {s['samples']} samples, {s['steps']} steps, guidance {s['guidance']}, seed "
             f"{s['seed']}; {s['machine']}, diffrl {s['diffrl']}, torch {s['torch']}. The headline metric is "
             f"`{report['metric']}`; overall: {rule}.", ""]
    diffs = [f"{label} - {labels[0]}" for label in labels[1:]]
    for metric in metrics:
        lines += [f"## {metric}", "", "| category | n | " + " | ".join(labels + diffs) + " |",
                  "|---|---:|" + "---:|" * (len(labels) + len(diffs))]
        rows = [(c, v["n"], [results[k]["categories"][c][metric] for k in labels])
                for c, v in first["categories"].items()]
        rows.append((f"**overall** ({rule})", s["samples"], [results[k]["overall"][metric] for k in labels]))
        for name, n, values in rows:
            deltas = [None if v is None or values[0] is None else v - values[0] for v in values[1:]]
            lines.append(f"| {name} | {n} | " + " | ".join([_fmt(v) for v in values] + [_fmt(d, True) for d in deltas])
                         + " |")
        lines.append("")
    lines += ["## Samples", "", f"Each category's first {GRID_ROWS} prompts, one row each; columns left to right: "
              f"{', '.join(labels)}. A caption is the sample's `{report['metric']}` and its prompt.", ""]
    lines += [f"![{c}](grids/{_slug(c)}.png)" for c in first["categories"]]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict, grids: dict[str, Tensor]) -> list[Path]:
    """Write ``report.json``, ``report.md`` and one grid per category under ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "grids").mkdir(exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    labels, metric = list(report["results"]), report["metric"]
    samples = {k: report["results"][k]["samples"] for k in labels}
    picked = [samples[labels[0]][i] for i in grid_indices([Item(s["prompt"], s["category"])
                                                           for s in samples[labels[0]]])]
    written = [out / "report.json", out / "report.md"]
    for category in report["results"][labels[0]]["categories"]:
        rows = [r for r, s in enumerate(picked) if s["category"] == category]
        tiles = torch.stack([grids[k][r] for r in rows for k in labels])
        captions = [f"{_fmt(samples[k][picked[r]['index']]['scores'][metric])} {picked[r]['prompt']}"
                    for r in rows for k in labels]
        path = out / "grids" / f"{_slug(category)}.png"
        image_grid(tiles, path, ncol=len(labels), scale=max(1, 128 // tiles.shape[-1]), captions=captions)
        written.append(path)
    return written
