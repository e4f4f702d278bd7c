"""Objectives side by side on the main job: held-out strict accuracy gained and wall time per seed, each objective
trained with the same config, steps and seeds (interleaved: seed 0 of every objective, then seed 1, ...).

    python scripts/bench_objectives.py [--objectives nft awm awm:train.lr=0.01] [--seeds 0 1 2] [--root DIR]
                                       [key=value ...]

Each run is ``diffrl train configs/tiny_shapes.yaml train.seed=S train.objective=O`` in its own run directory; an
objective written ``NAME:key=value,key=value`` is a variant with its own overrides (after the shared ones).
Prints a markdown table (one row per run, then the means per objective and the ratios to the first objective's
wall time) and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def run(objective: str, seed: int, root: str, overrides: list[str]) -> dict:
    """One main-job run of ``NAME[:key=value,...]``; its summary's accuracies and the wall time of the command."""
    name, _, own = objective.partition(":")
    out = os.path.join(root, f"{objective.replace(':', '_').replace('=', '-').replace(',', '_')}-seed{seed}")
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "diffrl", "train", "configs/tiny_shapes.yaml", f"train.seed={seed}",
                    f"train.objective={name}", *overrides, *(own.split(",") if own else []), "--out", out,
                    "--overwrite"], check=True)
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    return {"objective": objective, "seed": seed, "base": s["base_accuracy"], "final": s["final_accuracy"],
            "gain": s["final_accuracy"] - s["base_accuracy"], "wall_s": round(time.time() - t0, 1),
            "train_wall_s": s["wall_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objectives", nargs="+", default=["nft", "awm"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--root", default="runs/bench_objectives")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = [run(o, seed, args.root, args.overrides) for seed in args.seeds for o in args.objectives]
    print("| objective | seed | base | final | gain | run s |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['objective']} | {r['seed']} | {r['base']:.3f} | {r['final']:.3f} | {r['gain']:+.3f} | "
              f"{r['train_wall_s']:.0f} |")
    means = {}
    for o in args.objectives:
        mine = [r for r in rows if r["objective"] == o]
        means[o] = {"final": statistics.mean(r["final"] for r in mine),
                    "gain": statistics.mean(r["gain"] for r in mine),
                    "gain_spread": max(r["gain"] for r in mine) - min(r["gain"] for r in mine),
                    "train_wall_s": statistics.mean(r["train_wall_s"] for r in mine)}
    first = args.objectives[0]
    print(f"\n| objective | mean final | mean gain | gain spread | mean run s | run time / {first}'s |\n"
          "|---|---:|---:|---:|---:|---:|")
    for o, m in means.items():
        print(f"| {o} | {m['final']:.3f} | {m['gain']:+.3f} | {m['gain_spread']:.3f} | {m['train_wall_s']:.0f} | "
              f"{m['train_wall_s'] / means[first]['train_wall_s']:.2f}x |")
    print(json.dumps({"runs": rows, "means": means, "overrides": args.overrides,
                      "machine": f"{platform.machine()} / {os.cpu_count()} cpus"}))


if __name__ == "__main__":
    main()
