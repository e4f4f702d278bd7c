"""The model card of an exported run: ``README.md`` in ``RUN/lora`` (or ``RUN/transformer``), as the Hugging Face Hub
reads it.

The card opens with the Hub's YAML front matter (``base_model``, ``library_name: diffusers``, ``tags``), then says
what the weights are and how to load them, the rewards and their weights, the objective, the held-out scores before
and after RL (from ``summary.json``), the last sample grid (copied beside the card), the command and the resolved
config. ``card_text`` builds the text from plain data; ``write_card`` writes it (``trainer.finish`` calls it after
the export, on the first process).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import yaml

from diffrl.checkpoint import atomic_write_text

CARD = "README.md"
"""The card's file name in the exported folder (the Hub shows a repository's README.md)."""
TASKS = {"sd3": "text-to-image", "flux": "text-to-image", "sana": "text-to-image", "wan": "text-to-video",
         "ltx2": "text-to-video"}
"""Model family -> the Hub's pipeline tag (a family missing here gets none)."""
OBJECTIVES = {"ppo": "clipped-ratio policy gradient on the SDE transitions (Flow-GRPO, BranchGRPO)",
              "nft": "DiffusionNFT's forward-process objective (arXiv 2509.16117)",
              "awm": "Advantage Weighted Matching (arXiv 2509.25050)"}
"""``train.objective`` -> how the card describes it (another objective is named as it is)."""


def front_matter(config: dict, full: bool) -> dict:
    """The Hub's metadata of the card: base model, library, pipeline tag and tags."""
    family = config["model"]["family"]
    task = TASKS.get(family)
    tags = ["diffrl", "diffusers", "full-fine-tune" if full else "lora", *([task] if task else []),
            "reinforcement-learning", *([family] if ":" not in family else [])]
    meta = {"base_model": config["model"]["path"], "base_model_relation": "finetune" if full else "adapter",
            "library_name": "diffusers"}
    if task:
        meta["pipeline_tag"] = task
    return {**meta, "tags": tags}


def _what(config: dict, full: bool) -> str:
    m = config["model"]
    if full:
        return f"Fully fine-tuned denoiser weights of `{m['path']}` ({m['family']})"
    targets = ", ".join(f"`{t}`" for t in m["lora_targets"])
    return f"A LoRA (rank {m['lora_rank']}, alpha {m['lora_alpha']:g}, on {targets}) of `{m['path']}` ({m['family']})"


def _usage(config: dict, full: bool) -> list[str]:
    base, guidance = config["model"]["path"], config["sampler"]["guidance_scale"]
    video = TASKS.get(config["model"]["family"]) == "text-to-video"
    name, field = ("video", "frames") if video else ("image", "images")
    load = (["from diffusers import AutoModel, DiffusionPipeline", "",
             'transformer = AutoModel.from_pretrained("path/to/this/folder")  # or the Hub repository it was pushed to',
             f'pipe = DiffusionPipeline.from_pretrained("{base}", transformer=transformer)'] if full else
            ["from diffusers import DiffusionPipeline", "", f'pipe = DiffusionPipeline.from_pretrained("{base}")',
             'pipe.load_lora_weights("path/to/this/folder")  # or the Hub repository it was pushed to'])
    return ["## Use", "", "```python", *load, f'{name} = pipe("a prompt", guidance_scale={guidance:g}).{field}[0]',
            "```", "",
            f"It was trained and evaluated with guidance scale {guidance:g} (1: without classifier-free guidance).", ""]


def _training(config: dict, summary: dict) -> list[str]:
    t, s = config["train"], config["sampler"]
    rows = [f"| `{name}` | {weight:g} | {_options(config['reward_options'].get(name))} |"
            for name, weight in config["rewards"].items()]
    shape = (f"trees split at steps {s['split_steps']} into {s['branch_factor']}" if s["split_steps"] else
             f"{t['trees_per_prompt']} flat chains per prompt")
    return ["## Training", "", "Rewards (the weighted sum is each sample's reward):", "",
            "| reward | weight | options |", "| --- | --- | --- |", *rows, "",
            f"- objective: `{t['objective']}`, {OBJECTIVES.get(t['objective'], 'a registered objective')}; "
            f"advantages `{t['advantage']}`, KL weight {t['kl_weight']:g} to the base",
            f"- {summary['steps']} RL steps of {t['prompts_per_step']} prompts from `{config['data']['prompts']}`, "
            f"{shape}, {s['num_steps']} denoising steps (`{s['kind']}` SDE)",
            f"- learning rate {t['lr']:g} ({t['lr_schedule']}), seed {t['seed']}; the run took "
            f"{summary['wall_s']:g} s", ""]


def _options(options: Optional[dict]) -> str:
    return ", ".join(f"`{k}: {v}`" for k, v in options.items()) if options else "-"


def _results(config: dict, summary: dict, evaluator: str) -> list[str]:
    evals = summary.get("evals") or []
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    d = config["data"]
    lines = ["## Results", "",
             f"Held-out score ({evaluator}) of {d['eval_size']} prompts from `{d['eval_prompts']}` x "
             f"{d['eval_seeds']} seeds, kept out of training, sampled with the deterministic "
             f"{config['sampler']['eval_steps']}-step sampler: **{_number(summary.get('base_accuracy'))} -> "
             f"{_number(summary.get('final_accuracy'))}** (base -> after RL).", ""]
    names = [k for k in last if k != "step" and isinstance(last[k], (int, float))]
    if names:
        lines += [f"| metric | step {first.get('step', 0)} | step {last.get('step', summary['steps'])} |",
                  "| --- | --- | --- |", *[f"| {k} | {_number(first.get(k))} | {_number(last[k])} |" for k in names],
                  ""]
    return lines


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def card_text(config: dict, summary: dict, *, title: str, evaluator: str, full: bool, grid: Optional[str] = None,
              command: Optional[str] = None) -> str:
    """The card of a finished run named ``title``: ``config`` is the resolved config as plain data
    (``config.to_dict``), ``summary`` what ``summary.json`` holds, ``evaluator`` the name of what scored the held-out
    samples, ``full`` whether the denoisers were fully fine-tuned (else a LoRA), ``grid`` the file name of the last
    sample grid beside the card, ``command`` the command line of the run (None: ``diffrl train`` on the config
    below)."""
    lines = ["---", yaml.safe_dump(front_matter(config, full), sort_keys=False).strip(), "---", "",
             f"# {title}", "",
             f"{_what(config, full)}, fine-tuned by reinforcement learning with diffrl "
             f"({summary['steps']} steps, objective `{config['train']['objective']}`).", "",
             *_usage(config, full), *_results(config, summary, evaluator), *_training(config, summary)]
    if grid:
        lines += ["## Samples", "", f"The first held-out prompts with fixed seeds after step {summary['steps']}:", "",
                  f"![samples after step {summary['steps']}]({grid})", ""]
    lines += ["## Reproduce", "", "```bash", command or "diffrl train config.yaml  # config.yaml: the config below",
              "```", "", "The resolved config:", "", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(), "```",
              ""]
    return "\n".join(lines)


def write_card(folder: Path, config: dict, summary: dict, *, evaluator: str, full: bool,
               grid: Optional[Path] = None, command: Optional[str] = None) -> Path:
    """Write ``folder/README.md`` (atomically) from ``card_text``, with the sample grid ``grid`` (when it exists)
    copied beside it; the title is ``log.run_name``, else the name of the run directory (``folder``'s parent).
    Returns the card's path."""
    folder = Path(folder)
    title = config["log"]["run_name"] or folder.resolve().parent.name
    name = None
    if grid is not None and Path(grid).is_file():
        name = Path(grid).name
        shutil.copyfile(grid, folder / name)
    path = folder / CARD
    atomic_write_text(path, card_text(config, summary, title=title, evaluator=evaluator, full=full, grid=name,
                                           command=command))
    return path
