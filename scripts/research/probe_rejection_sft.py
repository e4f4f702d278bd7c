"""Can the LoRA learn what the verifier rewards, and does it transfer? Rejection-sampling fine-tuning as a probe.

Samples the config's training prompts with the trainer's evaluation sampler (deterministic Euler, CFG), keeps the
samples the shapes verifier scores strictly correct, fine-tunes the config's LoRA on them with the pretraining loss
(rectified flow on the conditional velocity, ``scripts/pretrain_tiny.py``) at ``train.lr``, constant, and reports
held-out strict accuracy before and after. This is one round of RAFT (reward-ranked fine-tuning; RAFT, arXiv
2304.06767): the most direct use of the model's own good samples, with many optimizer steps where the main job takes
one per RL step.

- Fit: a prompt file as both ``data.prompts`` and ``data.eval_prompts`` with ``data.exclude_eval=false`` asks
  whether the LoRA can learn to draw those prompts the way its correct samples do (every file prompt is sampled).
- Transfer: the main job's split (generated training prompts, held-out prompts kept out) asks whether what it
  learns from the training prompts' correct samples carries over to prompts it has not seen.

Ends with one JSON line.

    python scripts/research/probe_rejection_sft.py [--config configs/tiny_shapes.yaml] [--prompts 256] [--per-prompt 4]
        [--sft-steps 150] [--batch 64] [--empty 0.0] [--out DIR] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: diffrl, rewards

from diffrl.config import ConfigError, load_config  # noqa: E402
from diffrl.shapes import in_grammar  # noqa: E402
from diffrl.state import Run  # noqa: E402
from diffrl.trainer import build, evaluate, sample_images  # noqa: E402
from diffrl.viz import stills  # noqa: E402
from rewards.shapes import shapes_reward  # noqa: E402

SAMPLE_SEED = 1000
"""Seed of the training prompts' samples (the evaluation sampler's own is ``diffrl.inference.EVAL_SEED``)."""


def training_prompts(run: Run, n: int) -> list[str]:
    """Every prompt of a prompt-file pool (held-out ones left out unless ``data.exclude_eval`` is false), or ``n``
    generated training prompts (the trainer's stream at step 0)."""
    pool = run.prompts.pool
    if pool is not None:
        return [p for p in dict.fromkeys(pool) if p not in run.prompts.exclude]
    return run.prompts.at(0, n)


def correct_latents(run: Run, prompts: list[str], seed: int) -> tuple[torch.Tensor, list[str]]:
    """Sample each prompt once (sample i from its own seed), keep the strictly correct ones. Returns their latents
    ``[K, C, H, W]`` encoded the way pretraining encodes renders, and their prompts."""
    images = stills(sample_images(run, prompts, seed))
    ok = shapes_reward(images, prompts)["strict"] > 0.5
    vae = run.adapter.pipe.vae
    with torch.no_grad():
        z = vae.encode(images[ok] * 2 - 1).latent_dist.mode()
        z = (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    return z, [p for p, k in zip(prompts, ok.tolist(), strict=True) if k]


def sft(run: Run, z: torch.Tensor, prompts: list[str], steps: int, batch: int, seed: int,
        empty: float = 0.0) -> list[float]:
    """``steps`` optimizer steps of the rectified-flow loss |v(x_s, s | prompt) - (eps - z)|^2 with
    x_s = (1 - s) z + s eps, s ~ U(0, 1), on ``batch`` samples drawn with replacement; each sample's prompt is the
    empty one with probability ``empty`` (pretraining's 0.1 trains the unconditional velocity CFG uses too).
    Returns the losses."""
    ad, g = run.adapter, torch.Generator().manual_seed(seed)
    cond, uncond = ad.encode(prompts), ad.unconditional()
    losses = []
    for _ in range(steps):
        i = torch.randint(len(z), (batch,), generator=g)
        s = torch.rand(batch, generator=g)
        eps = torch.randn(batch, *z.shape[1:], generator=g)
        drop = torch.rand(batch, generator=g) < empty
        c = {k: torch.where(drop.view(-1, *([1] * (v.ndim - 1))), uncond[k], v[i]) for k, v in cond.items()}
        sb = s.view(-1, *([1] * (z.ndim - 1)))
        v = ad.velocity((1 - sb) * z[i] + sb * eps, s, c, 1.0)
        loss = (v - (eps - z[i])).square().mean()
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ad.trainable_parameters(), run.cfg.train.max_grad_norm)
        run.optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny_shapes.yaml")
    ap.add_argument("--prompts", type=int, default=256, help="generated training prompts (a prompt file: all of it)")
    ap.add_argument("--per-prompt", type=int, default=4, help="samples per training prompt, each from its own seed")
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--empty", type=float, default=0.0, help="share of fine-tuning samples given the empty prompt")
    ap.add_argument("--out", help="write the fine-tuned weights here (a LoRA: the diffusers format of RUN/lora)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (model.lora_targets, train.lr, ...)")
    args = ap.parse_args()
    try:
        cfg = load_config(args.config, args.overrides + ["log.tensorboard=false"])
    except ConfigError as e:
        sys.exit(f"probe_rejection_sft: {e}")
    with tempfile.TemporaryDirectory() as tmp:
        run = build(cfg, Path(tmp))
        if not in_grammar(run.eval_prompts):
            sys.exit(f"probe_rejection_sft: {args.config}: data.eval_prompts holds prompts outside the shapes grammar, "
                     "which the verifier cannot score")
        t0 = time.time()
        base = evaluate(run)
        prompts = [p for p in training_prompts(run, args.prompts) for _ in range(args.per_prompt)]
        if not prompts or not in_grammar(prompts):
            sys.exit(f"probe_rejection_sft: {args.config}: data.prompts gives no prompts of the shapes grammar "
                     "to sample")
        z, kept = correct_latents(run, prompts, SAMPLE_SEED)
        print(f"kept {len(kept)} strictly correct of {len(prompts)} samples of {len(set(prompts))} training prompts "
              f"({time.time() - t0:.0f} s)")
        if not kept:
            sys.exit("probe_rejection_sft: no strictly correct sample to fine-tune on; raise --per-prompt")
        losses = sft(run, z, kept, args.sft_steps, args.batch, cfg.train.seed, args.empty)
        final = evaluate(run)
        if args.out:
            print(f"weights written to {run.adapter.export(args.out)}")
    head = f"held-out strict accuracy ({len(run.eval_prompts)} prompts x {cfg.data.eval_seeds} seeds)"
    print(f"{head}: base {base['accuracy']:.3f} -> after {args.sft_steps} fine-tuning steps {final['accuracy']:.3f}")
    for key in sorted(k for k in base if k != "accuracy"):
        print(f"  {key}: {base[key]:.3f} -> {final[key]:.3f}")
    print(json.dumps({"kept": len(kept), "sampled": len(prompts), "sft_steps": args.sft_steps, "empty": args.empty,
                      "base": base, "final": final,
                      "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                      "wall_s": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
