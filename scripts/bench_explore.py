"""Low-precision exploration with exact regeneration (Sol-RL) on the embedded model, or on a full-size transformer.

CPU (default; the low-precision copy is emulated on the FP8/FP4 grid, so it measures selection quality and
exactness, not speed):
  1. One exploration step through the trainer: N candidates per prompt previewed by the low-precision copy, K kept
     (best+worst), regenerated in full precision. ``regen_exact``: the regenerated trajectories equal (torch.equal,
     every latent, mean and log-prob) a direct full-precision rollout of the kept seeds.
  2. Rank agreement: every candidate is also rolled out in full precision (what regeneration would give);
     ``spearman`` is the per-prompt Spearman correlation of preview and full-precision rewards, averaged.
  3. Training: ``explore N=4K, keep K`` against plain GRPO with K chains per prompt (same prompts, seeds, steps):
     the policy's reward on fixed held-out prompts (deterministic sampler, untimed) against cumulative wall-clock.
Ends with one JSON line (``spearman``, ``regen_exact``, ``explore_s``, ``regen_s``, ``path``, ...).

    python scripts/bench_explore.py [--steps 12] [--keep 4] [--precision fp8] [--preview rollout|ode]
                                    [key=value overrides ...]

GPU (``--gpu``): an SD3.5-Medium-sized SD3 transformer (random weights; nothing can be downloaded) at 512 and
1024 px: rollout throughput of BF16 against FP8 (and FP4 where the GPU has FP4 GEMMs; emulated FP4 otherwise), and
one explore (N candidates, FP8) + regenerate (K, BF16) iteration against BF16-only rollouts of the same N; then
part 1 and 2 on the embedded model on the GPU, so the last JSON line has the same keys as on the CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def finite(x: float, digits: int = 4) -> Optional[float]:
    """``x`` rounded, or None where it is NaN (every reward of every prompt tied): the JSON lines stay strict JSON."""
    return None if math.isnan(x) else round(x, digits)


def policy_reward(trainer, run, prompts: list[str]) -> float:
    """Mean first-reward of the policy's deterministic samples of ``prompts`` (the evaluation seed)."""
    from diffrl.inference import EVAL_SEED
    from diffrl.scoring import score_batch

    images = trainer.sample_images(run, prompts, seed=EVAL_SEED)
    name = next(iter(run.rewards))
    scores, valid = score_batch({name: run.rewards[name]}, images, prompts)
    return float(scores[name][valid].mean())


def exploration_step(overrides: list[str], out: Path) -> dict:
    """Parts 1 and 2: one explored step, its exactness, and the preview/full-precision rank agreement."""
    from diffrl import trainer
    from diffrl.config import load_config
    from diffrl.explore import preview
    from diffrl.rollout import tree_rollout
    from diffrl.scoring import score_batch
    from diffrl.selection import mean_spearman

    run = trainer.build(load_config("configs/tiny_shapes_tree.yaml", overrides), out)
    e, s = run.cfg.explore, run.cfg.sampler
    batch = trainer.collect(run, 0)
    kept = batch.rollout.kept.flatten().nonzero().flatten().tolist()
    seeds = [trainer.mix_seed(run.cfg.train.seed, 0, i) for i in kept]
    velocity, opts = trainer._velocity(run, s.guidance_scale), trainer._rollout_options(run, 0)
    with torch.no_grad():
        direct = tree_rollout(velocity, run.schedule, run.sigmas, seeds, run.adapter.latent_shape,
                              cond=run.adapter.encode([batch.prompts[i] for i in kept]), max_batch=run.minibatch,
                              device=run.adapter.device, **opts)
    tr, dt = batch.rollout.transitions, direct.transitions
    exact = all(torch.equal(getattr(tr, f), getattr(dt, f)) for f in ("x", "x_next", "mean", "log_prob")) and \
        torch.equal(batch.rollout.leaves[batch.rollout.kept], direct.leaves[:, 0])
    # Every candidate in full precision, for the rank agreement (measurement only).
    all_seeds = [trainer.mix_seed(run.cfg.train.seed, 0, i) for i in range(len(batch.prompts))]
    t0 = time.perf_counter()
    with torch.no_grad():
        full = tree_rollout(velocity, run.schedule, run.sigmas, all_seeds, run.adapter.latent_shape,
                            cond=run.adapter.encode(batch.prompts), max_batch=run.minibatch,
                            device=run.adapter.device, **opts)
        media = run.adapter.decode(full.leaves.flatten(0, 1))
    full_s = time.perf_counter() - t0
    scores, _ = score_batch(run.rewards, media, batch.prompts)
    full_r = sum(w * scores[k] for k, w in run.cfg.rewards.items()).reshape(-1, e.candidates)
    pre = preview(run.explorer, run.rewards, run.cfg.rewards, batch.prompts, all_seeds, e.candidates,
                  schedule=run.schedule, sigmas=run.sigmas, rollout_options=opts, guidance=s.guidance_scale,
                  ode_steps=(e.preview_steps or s.num_steps) if e.preview == "ode" else None, max_batch=run.minibatch)
    kept_full = full_r.flatten()[kept].reshape(batch.preview_rewards.shape)
    return {"regen_exact": bool(exact), "spearman": finite(mean_spearman(pre.rewards, full_r)),
            "spearman_kept": finite(mean_spearman(batch.preview_rewards, kept_full)),
            "explore_s": round(batch.explore_s, 3), "regen_s": round(batch.rollout_s, 3),
            "full_precision_all_s": round(full_s, 3), "candidates": batch.num_previewed, "kept": len(kept),
            "refresh_s": round(run.explorer.refresh(), 4), "build_s": round(run.explorer.build_s, 3),
            "path": ("emulated" if run.explorer.path == "emulated"
                     else ("fp8" if e.precision.startswith("fp8") else "fp4")),
            "path_reason": run.explorer.reason}


def training_curve(overrides: list[str], out: Path, eval_every: int, eval_prompts: int) -> list[dict]:
    """Part 3: train step by step; after every ``eval_every`` steps, the policy's held-out reward (untimed)."""
    from diffrl import trainer
    from diffrl.config import load_config

    run = trainer.build(load_config("configs/tiny_shapes_tree.yaml", overrides), out)
    prompts = run.eval_prompts[:eval_prompts]
    state, clock = trainer.TrainState(), 0.0
    curve = [{"step": 0, "wall_s": 0.0, "reward": round(policy_reward(trainer, run, prompts), 4)}]
    for step in range(run.cfg.train.steps):
        m = trainer.train_step(run, state, step)
        clock += m["rollout_s"] + m["train_s"] + m.get("explore_s", 0.0)
        if (step + 1) % eval_every == 0:
            curve.append({"step": step + 1, "wall_s": round(clock, 1),
                          "reward": round(policy_reward(trainer, run, prompts), 4),
                          "batch_reward": round(m["reward_mean"], 4)})
            print(f"  step {step + 1}: {curve[-1]}", flush=True)
    return curve


def cpu(args: argparse.Namespace) -> None:
    k, n = args.keep, 4 * args.keep
    base = ["sampler.split_steps=[]", "train.advantage=grpo", "log.tensorboard=false", "log.eval_every=0",
            "log.sample_every=0", f"train.steps={args.steps}", f"train.prompts_per_step={args.prompts}",
            *args.overrides]
    explore = base + ["explore.enabled=true", f"explore.candidates={n}", f"explore.keep={k}",
                      f"explore.precision={args.precision}", f"explore.preview={args.preview}"]
    if args.preview == "ode":
        explore.append(f"explore.preview_steps={args.preview_steps}")
    plain = base + [f"train.trees_per_prompt={k}"]
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        step = exploration_step(explore, Path(tmp) / "step")
        print(f"one exploration step ({args.prompts} prompts x {n} candidates, keep {k}): {json.dumps(step)}")
        curves = {}
        for name, ov in (("plain GRPO, K per prompt", plain), (f"explore N={n}, keep K={k}", explore)):
            print(f"{name}:", flush=True)
            curves[name] = training_curve(ov, Path(tmp) / name.split()[0], args.eval_every, args.eval_prompts)
    print(f"\n| run | policy reward at step 0 / {' / '.join(str(c['step']) for c in curves[name][1:])} "
          "| wall-clock at the end (s) |")
    print("|---|---|---:|")
    for name, c in curves.items():
        print(f"| {name} | {' / '.join(format(p['reward'], '.3f') for p in c)} | {c[-1]['wall_s']} |")
    (p_name, p), (e_name, ex) = curves.items()
    ratio = ex[-1]["wall_s"] / p[-1]["wall_s"]
    print(f"wall-clock ratio explore / plain: {ratio:.2f}x (emulated low precision costs more than fp32 on a CPU)")
    print(json.dumps({**step, "precision": args.precision, "n": n, "k": k, "steps": args.steps,
                      "final_reward_plain": p[-1]["reward"], "final_reward_explore": ex[-1]["reward"],
                      "wall_ratio_explore_over_plain": round(ratio, 3), "machine": machine()}, allow_nan=False))


def gpu(args: argparse.Namespace) -> None:
    """Rollout throughput of an SD3.5-Medium-sized transformer in BF16, FP8 and FP4, and one explore + regenerate
    iteration against BF16-only rollouts of the same N (transformer forwards only: no VAE, no reward)."""
    import copy

    from diffusers import SD3Transformer2DModel

    from diffrl.explore import _torchao_quantize
    from diffrl.quant import choose_path, emulate_low_precision

    dev = torch.device("cuda")
    cap = torch.cuda.get_device_capability()
    config = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                  dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    torch.manual_seed(0)
    bf16 = SD3Transformer2DModel(**config).to(dev, torch.bfloat16).eval().requires_grad_(False)
    skip = ("embed", "norm", "proj_out")
    results = {"machine": machine(), "params_b": round(sum(p.numel() for p in bf16.parameters()) / 1e9, 2)}
    for px in (512, 1024):
        side, batch = px // 8, args.gpu_batch
        inputs = dict(hidden_states=torch.randn(batch, 16, side, side, device=dev, dtype=torch.bfloat16),
                      timestep=torch.full((batch,), 500.0, device=dev, dtype=torch.bfloat16),
                      encoder_hidden_states=torch.randn(batch, 333, 4096, device=dev, dtype=torch.bfloat16),
                      pooled_projections=torch.randn(batch, 2048, device=dev, dtype=torch.bfloat16))

        def timed(fn, calls: int) -> float:
            with torch.no_grad():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn(**inputs)  # noqa: B023 (timed is called in the iteration that defines it)
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        models = {"bf16": torch.compile(bf16)}
        row: dict = {}
        for fmt in ("fp8", "nvfp4"):
            path, why = choose_path(fmt, "auto", "cuda", cap, True)
            q = copy.deepcopy(bf16)
            t0 = time.perf_counter()
            (_torchao_quantize if path == "native" else emulate_low_precision)(q, fmt, skip, 0)
            row[f"{fmt}_quantize_s"] = time.perf_counter() - t0
            row[f"{fmt}_path"] = fmt if path == "native" else "emulated"
            models[fmt] = torch.compile(q)
        for name, fn in models.items():
            timed(fn, 3)  # compile and warm up
            row[f"{name}_forward_s"] = timed(fn, args.gpu_iters) / args.gpu_iters
            row[f"{name}_samples_per_s"] = batch / row[f"{name}_forward_s"]
        for fmt in ("fp8", "nvfp4"):
            row[f"{fmt}_speedup"] = row["bf16_forward_s"] / row[f"{fmt}_forward_s"]
        n_calls, k_calls, steps, preview = math.ceil(args.gpu_n / batch), math.ceil(args.gpu_k / batch), 10, 6
        row["bf16_only_iteration_s"] = timed(models["bf16"], n_calls * steps)
        row["explore_regen_iteration_s"] = (timed(models["fp8"], n_calls * preview)
                                            + timed(models["bf16"], k_calls * steps))
        row["iteration_speedup"] = row["bf16_only_iteration_s"] / row["explore_regen_iteration_s"]
        results[f"{px}px"] = {key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()}
        print(px, json.dumps(results[f"{px}px"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # the embedded model explored on this GPU: exactness and agreement
        step = exploration_step(["sampler.split_steps=[]", "train.advantage=grpo", "log.tensorboard=false",
                                 "model.device=cuda", "explore.enabled=true", "explore.candidates=16", "explore.keep=4",
                                 f"explore.precision={args.precision}", f"train.prompts_per_step={args.prompts}"],
                                Path(tmp))
    print(json.dumps({**step, **results}, allow_nan=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="full-size transformer throughput (needs a CUDA GPU)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--keep", type=int, default=4, help="K: chains per prompt trained on (explore previews 4K)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--precision", default="fp8", choices=["fp8", "fp8_tensor", "nvfp4", "mxfp4"])
    ap.add_argument("--preview", default="rollout", choices=["rollout", "ode"])
    ap.add_argument("--preview-steps", type=int, default=6, help="steps of an ode preview")
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--eval-prompts", type=int, default=32)
    ap.add_argument("--gpu-batch", type=int, default=8)
    ap.add_argument("--gpu-iters", type=int, default=10)
    ap.add_argument("--gpu-n", type=int, default=96)
    ap.add_argument("--gpu-k", type=int, default=24)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    gpu(args) if args.gpu else cpu(args)


if __name__ == "__main__":
    main()
