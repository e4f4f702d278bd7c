"""The main job over several seeds: held-out strict accuracy before and after RL, and wall time, per seed.

    python scripts/bench_main_job.py [--seeds 0 1 2] [key=value overrides ...]

Each seed runs ``diffrl train configs/tiny_shapes.yaml train.seed=S log.eval_every=15`` in its own run directory
(under --root). The extra evaluation at step 15 draws no training randomness, so the final accuracy is the main
job's. The table gives base accuracy, every evaluation's, final accuracy, the gain and the wall time, then the
mean and the spread (max - min), then one JSON line.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--root", default="runs/bench_main_job")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        out = os.path.join(args.root, f"seed{seed}")
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "diffrl", "train", "configs/tiny_shapes.yaml", f"train.seed={seed}",
                        "log.eval_every=15", *args.overrides, "--out", out, "--overwrite"], check=True)
        with open(os.path.join(out, "summary.json")) as f:
            s = json.load(f)
        rows.append({"seed": seed, "base": s["base_accuracy"], "final": s["final_accuracy"],
                     "gain": s["final_accuracy"] - s["base_accuracy"], "wall_s": round(time.time() - t0, 1),
                     "evals": {e["step"]: e["accuracy"] for e in s["evals"]}})
    print("| seed | base accuracy | accuracy at each evaluation (step: accuracy) | final accuracy | gain | wall s |\n"
          "|---|---:|---|---:|---:|---:|")
    for r in rows:
        evals = ", ".join(f"{k}: {v:.3f}" for k, v in r["evals"].items())
        print(f"| {r['seed']} | {r['base']:.3f} | {evals} | {r['final']:.3f} | {r['gain']:+.3f} | {r['wall_s']:.0f} |")
    gains = [r["gain"] for r in rows]
    print(f"\ngain: mean {statistics.mean(gains):+.3f}, spread {max(gains) - min(gains):.3f} over {len(rows)} seeds")
    print(json.dumps({"runs": rows, "gain_mean": statistics.mean(gains), "gain_spread": max(gains) - min(gains),
                      "machine": f"{platform.machine()} / {os.cpu_count()} cpus"}))


if __name__ == "__main__":
    main()
