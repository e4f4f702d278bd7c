"""The main job over several seeds: held-out strict accuracy before and after RL, and wall time, per seed; with
several variants (speed levers), side by side, each variant's wall time as a ratio to the first's.

    python scripts/bench_main_job.py [--seeds 0 1 2] [--variants main compile:model.compile=true ...]
                                     [--root DIR] [key=value overrides ...]

Each seed runs ``diffrl train configs/tiny_shapes.yaml train.seed=S log.eval_every=15`` in its own run directory
(under --root). The extra evaluation at step 15 draws no training randomness, so the final accuracy is the main
job's. A variant is ``NAME`` or ``NAME:key=value,...``: config overrides, and ``processes=N``, which launches the
run as N local processes (``torch.distributed.run``, gloo; each with cores / N torch threads; the same math as one
process, split over the processes). Runs go one after the other, seed by seed, the variants of a seed in a row;
each starts from an empty torch.compile (inductor) cache, as on a fresh machine, so a compiled variant's time
includes its compiling.
The table gives base accuracy, every evaluation's, final accuracy, the gain, the run's own time (``summary.json``:
build, evaluations, training, export) and the process's wall time; then per variant the mean gain, its spread
(max - min), the mean times and their ratio to the first variant; then one JSON line (``runs``, ``gain_mean`` and
``gain_spread`` of the first variant, ``variants``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def parse_variant(variant: str) -> tuple[str, list[str], int]:
    """``NAME[:key=value,...]`` -> (name, config overrides, processes)."""
    from diffrl.config import ConfigError, named_overrides

    try:
        name, items = named_overrides(variant)
    except ConfigError as e:
        raise SystemExit(f"variant {e}") from None
    overrides, processes = [], 1
    for item in items:
        key, _, value = item.partition("=")
        if key == "processes":
            if not value.isdigit() or int(value) < 1:
                raise SystemExit(f"variant {variant!r}: processes must be a whole number >= 1, got {value!r}")
            processes = int(value)
        else:
            overrides.append(item)
    return name, overrides, processes


def command(processes: int) -> list[str]:
    """How one run starts: ``python -m diffrl``, or N local processes under ``torch.distributed.run``."""
    if processes == 1:
        return [sys.executable, "-m", "diffrl"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "diffrl"]


def run(variant: str, seed: int, root: str, extra: list[str]) -> dict:
    """One main-job run of ``variant`` at ``seed``; its accuracies and times."""
    name, overrides, processes = parse_variant(variant)
    out = os.path.join(root, f"{name}-seed{seed}")
    cache = tempfile.mkdtemp(prefix="inductor-cache-")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    if processes > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    t0 = time.time()
    try:
        subprocess.run([*command(processes), "train", "configs/tiny_shapes.yaml", f"train.seed={seed}",
                        "log.eval_every=15", *extra, *overrides, "--out", out, "--overwrite"], check=True, env=env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    wall = round(time.time() - t0, 1)
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    return {"variant": name, "seed": seed, "processes": processes, "base": s["base_accuracy"],
            "final": s["final_accuracy"], "gain": s["final_accuracy"] - s["base_accuracy"], "run_s": s["wall_s"],
            "wall_s": wall, "evals": {e["step"]: e["accuracy"] for e in s["evals"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["main"])
    ap.add_argument("--root", default="runs/bench_main_job")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    names = [parse_variant(v)[0] for v in args.variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"variant names must differ, got {names}")
    rows = [run(v, seed, args.root, args.overrides) for seed in args.seeds for v in args.variants]
    print("| variant | seed | base accuracy | accuracy at each evaluation (step: accuracy) | final accuracy | gain | "
          "run s | wall s |\n|---|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        evals = ", ".join(f"{k}: {v:.3f}" for k, v in r["evals"].items())
        print(f"| {r['variant']} | {r['seed']} | {r['base']:.3f} | {evals} | {r['final']:.3f} | {r['gain']:+.3f} | "
              f"{r['run_s']:.0f} | {r['wall_s']:.0f} |")
    summary = {}
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        gains = [r["gain"] for r in mine]
        summary[name] = {"gain_mean": statistics.mean(gains), "gain_spread": max(gains) - min(gains),
                         "run_s_mean": statistics.mean(r["run_s"] for r in mine),
                         "wall_s_mean": statistics.mean(r["wall_s"] for r in mine), "seeds": len(mine)}
    first = summary[names[0]]
    print("\n| variant | mean gain | spread | mean run s | x first | mean wall s | x first |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for name, m in summary.items():
        m["run_ratio"] = round(m["run_s_mean"] / first["run_s_mean"], 3)
        m["wall_ratio"] = round(m["wall_s_mean"] / first["wall_s_mean"], 3)
        print(f"| {name} | {m['gain_mean']:+.3f} | {m['gain_spread']:.3f} | {m['run_s_mean']:.0f} | "
              f"{m['run_ratio']:.2f} | {m['wall_s_mean']:.0f} | {m['wall_ratio']:.2f} |")
    print(json.dumps({"runs": [r for r in rows if r["variant"] == names[0]], "gain_mean": first["gain_mean"],
                      "gain_spread": first["gain_spread"], "variants": summary, "all_runs": rows,
                      "overrides": args.overrides, "machine": f"{platform.machine()} / {os.cpu_count()} cpus"}))


if __name__ == "__main__":
    main()
