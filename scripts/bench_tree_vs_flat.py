"""Tree rollouts vs flat GRPO on the embedded model: reward against wall-clock time, same leaves per prompt.

Runs a config (default: the clipped-ratio tree recipe ``configs/tiny_shapes_tree.yaml``) twice with the same
prompts, seeds, steps and leaves per prompt: once with trees (``--splits``, default the config's
``sampler.split_steps``; ``--trees-per-prompt`` trees per prompt, 1 by default, more make a forest; depth-wise
advantages for the clipped ratio, leaf GRPO for DiffusionNFT, which trains on leaves) and once flat (no splits, as
many chains per prompt as the trees have leaves, group z-scored). ``--parallel`` runs the two at once, each in a
process of its own with half the cores' threads, so both meet the same machine (and take half the wall time).
The target is the flat run's final reward (its trailing mean over the last ``SMOOTH`` steps: what flat
GRPO reaches on the budget); each run's time to target is the rollout and training time up to the first step whose
trailing mean over a full window of ``SMOOTH`` steps reaches it (a window of one or two steps' rewards, which swing
with the prompts, would let a lucky first step count). Prints a table and one JSON line; with ``--out`` keeps both
run directories there and writes ``tree_vs_flat.png`` (smoothed reward against wall-clock seconds).

    python scripts/bench_tree_vs_flat.py [--steps 30] [--out DIR] [key=value overrides ...]
    python scripts/bench_tree_vs_flat.py --config configs/tiny_shapes.yaml --splits 0,1,2   # the main job (NFT)
    python scripts/bench_tree_vs_flat.py --config configs/tiny_shapes.yaml --splits 3 --trees-per-prompt 4 --parallel
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from diffrl.config import load_config
from diffrl.trainer import train
from diffrl.tree import TreeSchedule
from diffrl.viz import line_plot, running_mean

SMOOTH = 5


def arms(leaves: int, trees_per_prompt: int, objective: str) -> dict[str, list[str]]:
    """The two runs' own overrides: ``trees_per_prompt`` trees of ``leaves`` leaves per prompt (depth-wise advantages
    for the clipped ratio, leaf GRPO otherwise), and flat chains, as many per prompt as the trees' leaves."""
    tree_adv = "tree" if objective == "ppo" else "grpo"
    return {"tree": [f"train.trees_per_prompt={trees_per_prompt}", f"train.advantage={tree_adv}"],
            "flat": ["sampler.split_steps=[]", f"train.trees_per_prompt={trees_per_prompt * leaves}",
                     "train.advantage=grpo"]}


def results(out: str) -> tuple[list[dict], dict]:
    """A finished run's per-step metrics and its summary.json."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    with open(os.path.join(out, "summary.json")) as f:
        return metrics, json.load(f)


def run_both(config: str, runs: dict[str, list[str]], root: str, parallel: bool) -> dict[str, tuple[list[dict], dict]]:
    """Each named run (its overrides) in ``root/<name>``: one after the other in this process, or with ``parallel``
    all at once, each ``diffrl train`` in a process of its own with ``cores / len(runs)`` threads."""
    outs = {name: os.path.join(root, name) for name in runs}
    if not parallel:
        for name, overrides in runs.items():
            train(load_config(config, overrides), out=outs[name], overwrite=True)
        return {name: results(out) for name, out in outs.items()}
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(runs)))}

    def launch(name: str) -> subprocess.CompletedProcess:  # each run's stderr drained by its own thread
        return subprocess.run([sys.executable, "-m", "diffrl", "train", config, *runs[name], "--out", outs[name],
                               "--overwrite"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    with ThreadPoolExecutor(len(runs)) as pool:
        done = dict(zip(runs, pool.map(launch, runs)))
    for name, proc in done.items():
        if proc.returncode != 0:
            raise SystemExit(f"the {name} run failed:\n{proc.stderr[-3000:]}")
    return {name: results(out) for name, out in outs.items()}


def smoothed(values: list[float]) -> list[float]:
    """The reward curve's trailing mean over ``SMOOTH`` steps (``diffrl.viz.running_mean``, as in curves.png)."""
    return running_mean(values, SMOOTH)


def elapsed(metrics: list[dict]) -> list[float]:
    """Rollout plus training seconds up to the end of each step."""
    t, out = 0.0, []
    for m in metrics:
        t += m["rollout_s"] + m["train_s"]
        out.append(t)
    return out


def time_to(target: float, metrics: list[dict]) -> Optional[float]:
    """Seconds until the first step whose trailing mean over a full ``SMOOTH``-step window reaches ``target``."""
    curve = smoothed([m["reward_mean"] for m in metrics])
    for i, (t, r) in enumerate(zip(elapsed(metrics), curve)):
        if i + 1 >= SMOOTH and r >= target:
            return t
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--config", default="configs/tiny_shapes_tree.yaml")
    ap.add_argument("--splits", help="the tree's split steps, comma-separated (default: the config's)")
    ap.add_argument("--trees-per-prompt", type=int, default=1, help="trees per prompt (more than 1: a forest)")
    ap.add_argument("--parallel", action="store_true", help="tree and flat runs at once, half the threads each")
    ap.add_argument("--out", help="keep both run directories here (tree/, flat/) and write tree_vs_flat.png")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    common = [f"train.steps={args.steps}", "log.eval_every=0", "log.sample_every=0", "log.tensorboard=false",
              *args.overrides]
    if args.steps < SMOOTH:
        raise SystemExit(f"--steps {args.steps}: the reward is smoothed over {SMOOTH} steps, so run at least {SMOOTH}")
    if args.splits is not None:
        common.append(f"sampler.split_steps=[{args.splits}]")
    cfg = load_config(args.config, common)
    if not cfg.sampler.split_steps:
        raise SystemExit(f"{args.config} has no sampler.split_steps: name the tree's with --splits, "
                         "e.g. --splits 0,1,2")
    if args.trees_per_prompt < 1:
        raise SystemExit(f"--trees-per-prompt must be at least 1, got {args.trees_per_prompt}")
    leaves = TreeSchedule(cfg.sampler.num_steps, cfg.sampler.split_steps, cfg.sampler.branch_factor).num_leaves
    own = arms(leaves, args.trees_per_prompt, cfg.train.objective)
    with tempfile.TemporaryDirectory() as tmp:
        runs = run_both(args.config, {name: common + o for name, o in own.items()}, args.out or tmp, args.parallel)
    curves = {name: smoothed([m["reward_mean"] for m in ms]) for name, (ms, _) in runs.items()}
    target = curves["flat"][-1]
    if args.out:
        line_plot({name: (elapsed(ms), curves[name]) for name, (ms, _) in runs.items()},
                  Path(args.out) / "tree_vs_flat.png",
                  f"tree vs flat rollouts, target {target:.3f} (flat's final reward)",
                  x_label="wall-clock time, rollout + training (s)",
                  y_label=f"training reward, trailing mean of {SMOOTH} steps")
    rows = {}
    for name, (ms, summary) in runs.items():
        secs = elapsed(ms)[-1]
        rows[name] = {"time_to_target_s": time_to(target, ms), "total_s": round(secs, 1),
                      "s_per_step": round(secs / len(ms), 2), "nfe_per_step": ms[0]["nfe"],
                      "final_reward": round(curves[name][-1], 4),
                      "base_accuracy": summary["base_accuracy"], "final_accuracy": summary["final_accuracy"]}
    ratio = (rows["tree"]["time_to_target_s"] / rows["flat"]["time_to_target_s"]
             if rows["tree"]["time_to_target_s"] is not None else None)
    print(f"target: flat's final reward (mean of its last {SMOOTH} steps) {target:.4f}; tree / flat time to target: "
          f"{'not reached' if ratio is None else f'{ratio:.2f}x'}\n")
    print("| rollouts | NFE / step | s / step | time to target (s) | final reward "
          "| held-out accuracy (base -> final) |\n"
          "|---|---:|---:|---:|---:|---|")
    for name, r in rows.items():
        ttt = f"{r['time_to_target_s']:.0f}" if r["time_to_target_s"] is not None else "not reached"
        print(f"| {name} | {r['nfe_per_step']} | {r['s_per_step']} | {ttt} | {r['final_reward']} | "
              f"{r['base_accuracy']:.3f} -> {r['final_accuracy']:.3f} |")
    print(json.dumps({"target": target, "time_ratio": ratio, **rows, "steps": args.steps, "config": args.config,
                      "leaves": leaves, "trees_per_prompt": args.trees_per_prompt, "parallel": args.parallel,
                      "machine": f"{platform.machine()} / {os.cpu_count()} cpus"}))


if __name__ == "__main__":
    main()
