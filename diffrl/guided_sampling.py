"""RL guidance at inference (RLG, arXiv 2508.21016): dial a fine-tuned model's alignment up or down without
retraining. ``v = v_ref + w (v_rl - v_ref)``, each model with its own classifier-free guidance; w = 0 is the
reference, 1 the fine-tuned model, w > 1 extrapolates (sampling with w is the KL-regularised optimum at KL weight
beta / w). The reference is the policy adapter with its LoRA switched off, or a second adapter (two full models
sharing the text encoders).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from diffrl.guidance import guidance_schedule, rl_guidance
from diffrl.rollout import tree_rollout
from diffrl.seeding import mix_seed
from diffrl.tree import TreeSchedule


def rl_guided_velocity(adapter: Any, w: Tensor, sigmas: Tensor, guidance: float, ref_guidance: Optional[float] = None,
                       reference: Any = None) -> Callable:
    """``velocity(x, sigma, cond)`` of RL guidance for ``tree_rollout``.

    w: ``[T]`` scale per step (``guidance.guidance_schedule``); the step is the one whose sigma ``sigmas[k]`` the
    rows sit at. Each model runs its conditional and unconditional rows as one batch (``adapter.velocity``), with
    CFG scale ``guidance`` for the policy and ``ref_guidance`` (default: the same) for the reference. A step with
    w = 1 makes no reference pass and one with w = 0 no policy pass, so those steps cost what plain sampling costs
    and give its velocity bit for bit.
    """
    g_ref = guidance if ref_guidance is None else ref_guidance
    grid = sigmas[:-1].float()

    def v_ref(x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        if reference is not None:
            return reference.velocity(x, sigma, cond, g_ref)
        with adapter.reference():
            return adapter.velocity(x, sigma, cond, g_ref)

    def velocity(x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        wk = float(w[int((grid - float(sigma[0])).abs().argmin())])
        if wk == 1.0:
            return adapter.velocity(x, sigma, cond, guidance)
        ref = v_ref(x, sigma, cond)
        if wk == 0.0:
            return ref
        return rl_guidance(ref, adapter.velocity(x, sigma, cond, guidance), wk)

    return velocity


@torch.no_grad()
def guided_sample(adapter: Any, prompts: Sequence[str], seed: int, steps: int, guidance: float, w: Tensor, *,
                  kind: str = "ode", noise_level: float = 0.7, ref_guidance: Optional[float] = None,
                  reference: Any = None, max_batch: int = 64) -> Any:
    """Media of RL-guided sampling, one sample per prompt; sample ``i`` starts from the noise of ``mix_seed(seed,
    i)`` (as ``inference.sample``) and, for an SDE ``kind`` (flow, dance, cps), draws its step noises from that seed.
    w: ``[steps]`` per-step scale."""
    if w.shape != (steps,):
        raise ValueError(f"the RL-guidance schedule must have one scale per step ({steps}), got shape {tuple(w.shape)}")
    sigmas = adapter.sigmas(steps)
    velocity = rl_guided_velocity(adapter, w, sigmas, guidance, ref_guidance, reference)
    seeds = [mix_seed(seed, i) for i in range(len(prompts))]
    ro = tree_rollout(velocity, TreeSchedule(steps), sigmas, seeds, adapter.latent_shape, kind=kind,
                      noise_level=noise_level, cond=adapter.encode(list(prompts)), max_batch=max_batch,
                      device=adapter.device)
    return adapter.decode(ro.leaves.flatten(0, 1))


def sweep(adapter: Any, prompts: Sequence[str], scales: Sequence[float], rewards: Mapping[str, Callable], out: Path, *,
          seed: int = 0, steps: int = 20, guidance: float = 4.5, schedule: str = "constant", rl_only_steps: int = 0,
          kind: str = "ode", ref_guidance: Optional[float] = None, reference: Any = None,
          max_batch: int = 64, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Sample the same prompts and seeds at every scale in ``scales``, score them with every reward and write to
    ``out``: ``sweep.png`` (rows prompts, columns w), ``sweep_rewards.png`` (each reward's mean against w) and
    ``sweep.json`` (per w: each reward's mean and the sampling time). Returns what ``sweep.json`` holds."""
    from tqdm import tqdm

    from diffrl.scoring import score_batch
    from diffrl.viz import cat_media, image_grid, line_plot, stills

    out.mkdir(parents=True, exist_ok=True)
    rows, media = [], []
    for w in tqdm(scales, desc="RL-guidance sweep", unit="w"):
        t0 = time.perf_counter()
        ws = guidance_schedule(steps, w, kind=schedule, rl_only_steps=rl_only_steps)
        m = guided_sample(adapter, prompts, seed, steps, guidance, ws, kind=kind, ref_guidance=ref_guidance,
                          reference=reference, max_batch=max_batch)
        seconds = time.perf_counter() - t0
        scores, valid = (score_batch(rewards, m, list(prompts)) if rewards
                         else ({}, torch.ones(len(prompts), dtype=torch.bool)))
        rows.append({"w": w, "sample_s": round(seconds, 3),
                     **{name: round(float(s[valid].mean()), 4) for name, s in scores.items()}})
        media.append(m)
        if progress is not None:
            progress(json.dumps(rows[-1]))
    images = stills(cat_media(media))  # [len(scales) * n, ...], scale-major
    n = len(prompts)
    order = torch.tensor([j * n + i for i in range(n) for j in range(len(scales))])
    captions = [f"w={w:g} {p}" if j == 0 else f"w={w:g}" for p in prompts for j, w in enumerate(scales)]
    image_grid(images[order], out / "sweep.png", ncol=len(scales), captions=captions)
    if rewards:
        line_plot({name: (list(scales), [r[name] for r in rows]) for name in rewards}, out / "sweep_rewards.png",
                  "reward against the RL-guidance scale w", x_label="RL-guidance scale w",
                  y_label="mean reward over the prompts")
    result = {"prompts": list(prompts), "seed": seed, "steps": steps, "guidance": guidance, "schedule": schedule,
              "rl_only_steps": rl_only_steps, "kind": kind, "results": rows}
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    return result


def load_reference(path: Optional[str], family: str, device: str, dtype: str, **shape: Any) -> Any:
    """A second full model to guide against (None: the policy's own LoRA-off reference)."""
    if path is None:
        return None
    from diffrl.adapters import load_adapter_class

    return load_adapter_class(family).from_pretrained(path, device=device, dtype=dtype, **shape)

