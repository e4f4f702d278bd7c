"""Tree rollouts vs flat GRPO on the embedded model: reward against wall-clock time, same leaves per prompt.

Runs the clipped-ratio tree recipe (``configs/tiny_shapes_tree.yaml``, the main job until DiffusionNFT replaced it)
twice with the same prompts, seeds, steps and 8 leaves per prompt: once with a tree
(``sampler.split_steps`` of the config, 1 tree per prompt) and once flat (no splits, 8 chains per prompt, group
z-scored). Prints each run's reward curve against cumulative time (rollout + training) and the time each takes
to reach a target reward (the default target: 90% of the way from the first to the best smoothed reward the flat
run reaches), then one JSON line.

    python scripts/bench_tree_vs_flat.py [--steps 30] [key=value overrides ...]
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


def run(overrides: list[str], out: str) -> list[dict]:
    cfg = load_config("configs/tiny_shapes_tree.yaml", overrides)
    train(cfg, out=out)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def smoothed(values: list[float], k: int = 5) -> list[float]:
    return [sum(values[max(0, i - k + 1) : i + 1]) / len(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]


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
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    common = [f"train.steps={args.steps}", "log.eval_every=0", "log.sample_every=0", "log.tensorboard=false",
              *args.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        tree = run(common + ["train.advantage=tree"], os.path.join(tmp, "tree"))
        flat = run(common + ["sampler.split_steps=[]", "train.trees_per_prompt=8", "train.advantage=grpo"],
                   os.path.join(tmp, "flat"))
    flat_s = smoothed([m["reward_mean"] for m in flat])
    target = flat_s[0] + 0.9 * (max(flat_s) - flat_s[0])
    rows = {}
    for name, ms in (("tree", tree), ("flat", flat)):
        secs = sum(m["rollout_s"] + m["train_s"] for m in ms)
        rows[name] = {"time_to_target_s": time_to(target, ms), "total_s": round(secs, 1),
                      "s_per_step": round(secs / len(ms), 2), "nfe_per_step": ms[0]["nfe"],
                      "final_reward": round(smoothed([m["reward_mean"] for m in ms])[-1], 4)}
    print(f"target reward (smoothed over 5 steps): {target:.4f}\n")
    print("| rollouts | NFE / step | s / step | time to target (s) | final reward |\n|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        ttt = f"{r['time_to_target_s']:.0f}" if r["time_to_target_s"] is not None else "not reached"
        print(f"| {name} | {r['nfe_per_step']} | {r['s_per_step']} | {ttt} | {r['final_reward']} |")
    print(json.dumps({"target": target, **rows, "steps": args.steps,
                      "machine": f"{platform.machine()} / {os.cpu_count()} cpus"}))


if __name__ == "__main__":
    main()
