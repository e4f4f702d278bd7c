"""Tree designs against flat chains on the main job's recipe: rollout leaves per second and the reward spread
within each prompt's group, side by side in one run.

A tree saves denoiser passes by sharing its prefix, and loses what GRPO learns from: leaves that share a prefix
share the layout, so their rewards differ less. This measures both for each design (a design is
``NAME:key=value,...``, config overrides on ``configs/tiny_shapes.yaml``; the first is the baseline, flat chains by
default): NFE per leaf (``TreeSchedule.nfe / num_leaves``), leaves per second of ``trainer.collect`` (prompt encoding,
SDE rollout, decoding; the median over ``--batches`` calls after an untimed first one; the calls go round the
designs), the mean standard deviation of the rewards within a prompt's leaves, and the share of prompts whose leaves'
rewards differ at all (a group with none gives GRPO no signal). Every design rolls out the same prompts (the same
RL steps' prompt draws). Ends with one
JSON line: ``designs`` (every number) and ``baseline``.

    python scripts/bench_tree_designs.py [--designs flat tree:sampler.split_steps=[0,1,2],... ...] [--batches 6]
                                         [key=value overrides for every design ...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIG = "configs/tiny_shapes.yaml"
ONE_TREE = "train.trees_per_prompt=1"
DESIGNS = [
    "flat",
    f"tree_0_1_2:sampler.split_steps=[0,1,2],{ONE_TREE}",
    f"tree_1_2_3:sampler.split_steps=[1,2,3],{ONE_TREE}",
    f"tree_3x8:sampler.split_steps=[3],sampler.branch_factor=8,{ONE_TREE}",
    "forest_2x4:sampler.split_steps=[2,3],train.trees_per_prompt=2",
    "forest_4x2:sampler.split_steps=[3],train.trees_per_prompt=4",
    f"late_4_5_6:sampler.sde_window=[4,4],sampler.split_steps=[4,5,6],{ONE_TREE}",
    f"late_4_5_6_noise3:sampler.sde_window=[4,4],sampler.split_steps=[4,5,6],sampler.split_noise_scale=3,{ONE_TREE}",
]
"""The default designs: flat chains (8 per prompt), one tree per prompt splitting early or late, forests (several
trees per prompt, 8 leaves in all), and trees moved with the SDE window past the main job's (late splits), with and
without BranchGRPO's larger split noise."""


def parse_design(design: str) -> tuple[str, list[str]]:
    """``NAME[:key=value,...]`` -> (name, overrides). Commas inside brackets belong to a value (``[0,1,2]``)."""
    from diffrl.config import ConfigError, named_overrides

    try:
        return named_overrides(design)
    except ConfigError as e:
        raise SystemExit(f"design {e}") from None


def group_spread(rewards: torch.Tensor, prompts: int) -> tuple[float, float]:
    """Rewards ``[trees, leaves]`` of ``prompts`` prompts (a prompt's trees are consecutive rows) -> (the mean over
    prompts of the standard deviation of a prompt's leaves' rewards, the share of prompts whose rewards differ)."""
    groups = rewards.reshape(prompts, -1)
    std = groups.std(dim=1)
    return std.mean().item(), (std > 1e-6).float().mean().item()


def build(design: str, extra: list[str], out: Path):
    """A design's name, overrides, config and built run."""
    from diffrl import trainer
    from diffrl.config import load_config

    name, overrides = parse_design(design)
    cfg = load_config(CONFIG, [*overrides, "log.tensorboard=false", *extra])
    return name, overrides, cfg, trainer.build(cfg, out)


def measure(designs: list[str], batches: int, extra: list[str], root: Path) -> list[dict]:
    """Every design's numbers over ``batches`` rollout calls (RL steps 0 .. batches - 1). All runs are built first,
    then the calls go round the designs (flat, tree, ..., flat, tree, ...), so drifts in the machine's speed fall
    on every design alike; the first round is not timed."""
    from diffrl import trainer

    built = [build(d, extra, root / str(i)) for i, d in enumerate(designs)]
    times: list[list[float]] = [[] for _ in built]
    spreads: list[list[tuple[float, float, float]]] = [[] for _ in built]
    for step in range(batches):
        for i, (_, _, cfg, run) in enumerate(built):
            t0 = time.perf_counter()
            batch = trainer.collect(run, step)
            if step > 0:
                times[i].append(time.perf_counter() - t0)
            rewards, _, _ = trainer.score(run, batch)
            spreads[i].append((*group_spread(rewards, cfg.train.prompts_per_step), rewards.mean().item()))
    rows = []
    for (name, overrides, cfg, run), secs, spread in zip(built, times, spreads):
        leaves = cfg.train.prompts_per_step * cfg.train.trees_per_prompt * run.schedule.num_leaves
        rows.append({"name": name, "overrides": overrides, "leaves": leaves,
                     "nfe_per_leaf": round(run.schedule.nfe / run.schedule.num_leaves, 3),
                     "leaves_per_s": round(leaves / statistics.median(secs), 2),
                     "group_std": round(statistics.mean(s[0] for s in spread), 4),
                     "groups_with_spread": round(statistics.mean(s[1] for s in spread), 3),
                     "reward_mean": round(statistics.mean(s[2] for s in spread), 4)})
    return rows


def main() -> None:
    from diffrl.eval_report import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--designs", nargs="+", default=DESIGNS, help="NAME:key=value,... (the first is the baseline)")
    ap.add_argument("--batches", type=int, default=6, help="rollout calls per design (the first is untimed)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.batches < 2:
        raise SystemExit("--batches must be at least 2: the first call is not timed")
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args.designs, args.batches, args.overrides, Path(tmp))
    base = rows[0]
    print(f"{machine('cpu')}; {args.batches} rollout batches per design (the first untimed); baseline {base['name']}\n")
    print("| design | leaves | NFE / leaf | leaves/s | vs baseline | reward std in a group | vs baseline "
          "| groups with spread | reward mean |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        r["speedup"] = round(r["leaves_per_s"] / base["leaves_per_s"], 3)
        r["spread_ratio"] = round(r["group_std"] / base["group_std"], 3) if base["group_std"] > 0 else None
        print(f"| {r['name']} | {r['leaves']} | {r['nfe_per_leaf']} | {r['leaves_per_s']} | {r['speedup']:.2f}x | "
              f"{r['group_std']:.3f} | {r['spread_ratio']}x | {r['groups_with_spread']:.2f} | {r['reward_mean']:.3f} |")
    print(json.dumps({"baseline": base["name"], "designs": rows, "batches": args.batches, "overrides": args.overrides,
                      "machine": machine("cpu")}))


if __name__ == "__main__":
    main()
