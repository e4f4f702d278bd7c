"""Tree rollouts vs flat GRPO on the embedded model: reward against wall-clock time, same leaves per prompt.

Runs a config (default: the clipped-ratio tree recipe ``configs/tiny_shapes_tree.yaml``) twice with the same
prompts, seeds, steps and leaves per prompt: once with a tree (``--splits``, default the config's
``sampler.split_steps``; 1 tree per prompt; depth-wise advantages for the clipped ratio, leaf GRPO for DiffusionNFT,
which trains on leaves) and once flat (no splits, as many chains per prompt as the tree has leaves, group
z-scored). Prints a table of each run's cost and the time each takes to reach a target reward (90% of the way from
the first to the best smoothed reward the flat run reaches), then one JSON line.

    python scripts/bench_tree_vs_flat.py [--steps 30] [key=value overrides ...]
    python scripts/bench_tree_vs_flat.py --config configs/tiny_shapes.yaml --splits 0,1,2   # the main job (NFT)
"""
from __future__ import annotations

import argparse
import json
import platform
import os
import tempfile
from typing import Optional

from diffrl.config import load_config
from diffrl.trainer import train
from diffrl.tree import TreeSchedule
from diffrl.viz import running_mean

SMOOTH = 5


def run(config: str, overrides: list[str], out: str) -> tuple[list[dict], dict]:
    """One training run: its per-step metrics and its summary.json."""
    train(load_config(config, overrides), out=out)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    with open(os.path.join(out, "summary.json")) as f:
        return metrics, json.load(f)


def smoothed(values: list[float]) -> list[float]:
    """The reward curve's trailing mean over ``SMOOTH`` steps (``diffrl.viz.running_mean``, as in curves.png)."""
    return running_mean(values, SMOOTH)


def time_to(target: float, metrics: list[dict]) -> Optional[float]:
    t = 0.0
    for m, r in zip(metrics, smoothed([m["reward_mean"] for m in metrics])):
        t += m["rollout_s"] + m["train_s"]
        if r >= target:
            return t
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--config", default="configs/tiny_shapes_tree.yaml")
    ap.add_argument("--splits", help="the tree's split steps, comma-separated (default: the config's)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    common = [f"train.steps={args.steps}", "log.eval_every=0", "log.sample_every=0", "log.tensorboard=false",
              *args.overrides]
    if args.splits is not None:
        common.append(f"sampler.split_steps=[{args.splits}]")
    cfg = load_config(args.config, common)
    if not cfg.sampler.split_steps:
        raise SystemExit(f"{args.config} has no sampler.split_steps: name the tree's with --splits, e.g. --splits 0,1,2")
    leaves = TreeSchedule(cfg.sampler.num_steps, cfg.sampler.split_steps, cfg.sampler.branch_factor).num_leaves
    tree_adv = "tree" if cfg.train.objective == "ppo" else "grpo"
    with tempfile.TemporaryDirectory() as tmp:
        tree = run(args.config, common + ["train.trees_per_prompt=1", f"train.advantage={tree_adv}"],
                   os.path.join(tmp, "tree"))
        flat = run(args.config, common + ["sampler.split_steps=[]", f"train.trees_per_prompt={leaves}",
                                          "train.advantage=grpo"], os.path.join(tmp, "flat"))
    flat_s = smoothed([m["reward_mean"] for m in flat[0]])
    target = flat_s[0] + 0.9 * (max(flat_s) - flat_s[0])
    rows = {}
    for name, (ms, summary) in (("tree", tree), ("flat", flat)):
        secs = sum(m["rollout_s"] + m["train_s"] for m in ms)
        rows[name] = {"time_to_target_s": time_to(target, ms), "total_s": round(secs, 1),
                      "s_per_step": round(secs / len(ms), 2), "nfe_per_step": ms[0]["nfe"],
                      "final_reward": round(smoothed([m["reward_mean"] for m in ms])[-1], 4),
                      "base_accuracy": summary["base_accuracy"], "final_accuracy": summary["final_accuracy"]}
    print(f"target reward (smoothed over {SMOOTH} steps): {target:.4f}\n")
    print("| rollouts | NFE / step | s / step | time to target (s) | final reward | held-out accuracy (base -> final) |\n"
          "|---|---:|---:|---:|---:|---|")
    for name, r in rows.items():
        ttt = f"{r['time_to_target_s']:.0f}" if r["time_to_target_s"] is not None else "not reached"
        print(f"| {name} | {r['nfe_per_step']} | {r['s_per_step']} | {ttt} | {r['final_reward']} | "
              f"{r['base_accuracy']:.3f} -> {r['final_accuracy']:.3f} |")
    print(json.dumps({"target": target, **rows, "steps": args.steps, "config": args.config, "leaves": leaves,
                      "machine": f"{platform.machine()} / {os.cpu_count()} cpus"}))


if __name__ == "__main__":
    main()
