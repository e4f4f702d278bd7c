"""Rollout and training throughput on the shipped model, eager against each speed lever, side by side in one run.

Workloads (each one RL step's worth of work on the main job's recipe, ``configs/tiny_shapes.yaml``, unless said):

- ``rollout_flat``: ``trainer.collect`` of the main job's flat chains (16 prompts x 8 chains; SDE with log-probs,
  prompt encoding and decoding included): images/s.
- ``rollout_tree``: the same prompts and leaves as a tree per prompt (``sampler.split_steps=[0,1,2]``, 8 leaves):
  leaves/s.
- ``train_ppo``: the clipped-ratio update with its reference (KL) pass on the tree recipe
  (``configs/tiny_shapes_tree.yaml``: CFG 4.5, 8 prompts x 8 leaves): trained transitions/s.
- ``train_nft``, ``train_awm``: the forward-process updates of the main job (DiffusionNFT, AWM; KL 0.1):
  training points (leaf x noise level) per second.

Levers are config overrides (``LEVERS``; ``NAME:key=value,...`` adds a variant). Each lever runs in a process of
its own, one after the other (``--in-process``: all in this one, calls interleaved, eager, lever, eager, ...); a
lever's runs are built, each workload is called once untimed (a compiled lever compiles there: reported as
``warmup_s``), then ``--repeats`` timed calls, and each lever's median throughput is divided by eager's. Ends with
one JSON line: ``rollout_speedup`` and ``train_speedup`` (the best lever's ratio on ``rollout_flat`` and
``train_ppo``), ``tree_vs_flat_rollout`` (eager leaves/s of the tree over the flat chains), and every number.

    python scripts/bench_throughput.py [--levers eager compile] [--workloads ...] [--repeats 3] [--threads N]
                                       [--in-process] [key=value ...]   # overrides for every workload
    python scripts/bench_throughput.py --profile [--workloads ...]   # where an eager call's time goes

``--profile`` times no lever: it profiles one eager call of each workload and prints its operators' own CPU time by
class (matmul, attention, gelu, copies, other) and the bound ``total / matmul``: what any lever that leaves the
matmuls as they are (identical math) can gain at most.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAIN, TREE = "configs/tiny_shapes.yaml", "configs/tiny_shapes_tree.yaml"
WORKLOADS: dict[str, tuple[str, list[str]]] = {
    "rollout_flat": (MAIN, []),
    "rollout_tree": (MAIN, ["sampler.split_steps=[0,1,2]", "train.trees_per_prompt=1"]),
    "train_ppo": (TREE, []),
    "train_nft": (MAIN, []),
    "train_awm": (MAIN, ["train.objective=awm"]),
}
"""Workload name -> (config, overrides): what one timed call does is ``rollout`` or ``train`` by its prefix."""
LEVERS: dict[str, list[str]] = {
    "eager": [],
    "compile": ["model.compile=true"],
}
"""Lever name -> the overrides that switch it on (``eager``: the path every lever is compared with)."""


def lever_overrides(lever: str) -> list[str]:
    """``NAME[:key=value,...]`` -> the lever's own overrides, then the added ones."""
    from diffrl.config import ConfigError, named_overrides

    try:
        name, own = named_overrides(lever)
    except ConfigError as e:
        raise SystemExit(f"lever {e}") from None
    if name not in LEVERS:
        raise SystemExit(f"unknown lever {name!r}; choose from {sorted(LEVERS)} (NAME:key=value,... adds overrides)")
    return [*LEVERS[name], *own]


def workload(name: str, lever: str, out: Path, extra: list[str]) -> tuple[Callable[[], float], int]:
    """A built run's timed call for ``name`` under ``lever`` and the items (images, leaves, transitions or points)
    one call processes; the call returns its own seconds."""
    from diffrl import trainer
    from diffrl.config import load_config
    from diffrl.update import levels_per_leaf, optimize

    config, overrides = WORKLOADS[name]
    cfg = load_config(config, [*overrides, *lever_overrides(lever), "log.tensorboard=false", *extra])
    run = trainer.build(cfg, out)
    if name.startswith("rollout"):
        def call() -> float:
            t0 = time.perf_counter()
            trainer.collect(run, 0)
            return time.perf_counter() - t0

        return call, cfg.train.prompts_per_step * cfg.train.trees_per_prompt * run.schedule.num_leaves
    batch = trainer.collect(run, 0)
    leaf_r, valid, scores = trainer.score(run, batch)
    adv, mask = trainer.advantage(run, batch, leaf_r, valid, 0, scores)
    state = run.adapter.trained_state_dict()

    def call() -> float:
        run.adapter.load_trained_state_dict(state)  # every call updates the same policy
        t0 = time.perf_counter()
        optimize(run, batch, adv, mask)
        return time.perf_counter() - t0

    return call, int(mask.sum()) * (1 if cfg.train.objective == "ppo" else levels_per_leaf(cfg.sampler))


def measure(levers: list[str], workloads: list[str], repeats: int, overrides: list[str]) -> dict[str, dict[str, dict]]:
    """``{workload: {lever: {items, median_s, per_s, warmup_s}}}``: every lever's runs built, each workload called
    once untimed, then ``repeats`` calls interleaved over the levers (eager, lever, eager, lever, ...)."""
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in workloads:
            calls = {}
            for lever in levers:
                call, items = workload(name, lever, Path(tmp) / f"{name}-{lever.replace(':', '_')}", overrides)
                warmup = call()
                calls[lever] = (call, items, warmup)
            times: dict[str, list[float]] = {lever: [] for lever in levers}
            for _ in range(repeats):
                for lever in levers:
                    times[lever].append(calls[lever][0]())
            results[name] = {}
            for lever in levers:
                med, items = statistics.median(times[lever]), calls[lever][1]
                results[name][lever] = {"items": items, "median_s": round(med, 3), "per_s": round(items / med, 2),
                                        "warmup_s": round(calls[lever][2], 2)}
    return results


def isolated(levers: list[str], workloads: list[str], repeats: int, overrides: list[str]) -> dict[str, dict[str, dict]]:
    """``measure`` with each lever in a process of its own (``--only``), one after the other: no lever's threads
    or compiled kernels share a process with another's calls."""
    results: dict[str, dict[str, dict]] = {name: {} for name in workloads}
    for lever in levers:
        threads = ["--threads", str(torch.get_num_threads())]
        done = subprocess.run([sys.executable, __file__, "--only", lever, *threads, "--workloads", *workloads,
                               "--repeats", str(repeats), *overrides], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"lever {lever!r} failed:\n{done.stderr[-3000:]}")
        for name, row in json.loads(done.stdout.strip().splitlines()[-1]).items():
            results[name][lever] = row[lever]
    return results


OP_CLASSES: dict[str, tuple[str, ...]] = {
    "matmul": ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product", "aten::_flash_attention"),
    "gelu": ("aten::gelu",),
    "copies": ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous"),
}
"""Operator class -> the name prefixes of its aten operators (``--profile``); every other operator is ``other``."""


def op_class(name: str) -> str:
    """The class of an operator (``OP_CLASSES``), ``other`` if none."""
    return next((c for c, prefixes in OP_CLASSES.items() if name.startswith(prefixes)), "other")


def profile_shares(call: Callable[[], float]) -> dict[str, float]:
    """One profiled call's CPU time by operator class: ``{class: seconds}`` of the operators' own (self) time, plus
    ``total``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    seconds = {c: 0.0 for c in [*OP_CLASSES, "other"]}
    for event in prof.key_averages():
        seconds[op_class(event.key)] += event.self_cpu_time_total / 1e6
    return {**seconds, "total": sum(seconds.values())}


def profile_workloads(workloads: list[str], overrides: list[str]) -> dict[str, dict[str, float]]:
    """``--profile``: each workload's eager call, once untimed, then once under the profiler."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in workloads:
            call, _ = workload(name, "eager", Path(tmp) / name, overrides)
            call()
            out[name] = profile_shares(call)
    return out


def main() -> None:
    from diffrl.eval_report import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levers", nargs="+", default=list(LEVERS))
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per lever and workload (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--in-process", action="store_true",
                    help="all levers in this process, calls interleaved (default: each lever in a process of its own)")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing levers: where one eager call's CPU time goes, by operator class")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # the child process of one lever: JSON out
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only:
        print(json.dumps(measure([args.only], args.workloads, args.repeats, args.overrides)))
        return
    if args.profile:
        shares = profile_workloads(args.workloads, args.overrides)
        classes = [*OP_CLASSES, "other"]
        print(f"\n{machine('cpu')}, {torch.get_num_threads()} torch threads; one eager call per workload, operators' "
              "own CPU time; bound = total / matmul (the speed-up if everything but the matmuls took no time)\n")
        print("| workload | total s | " + " | ".join(classes) + " | bound |\n|---|---:|" + "---:|" * (len(classes) + 1))
        for name, sec in shares.items():
            cells = [f"{sec[c]:.2f} ({sec[c] / sec['total']:.0%})" for c in classes]
            bound = f"{sec['total'] / sec['matmul']:.2f}x" if sec["matmul"] > 0 else "-"
            print(f"| {name} | {sec['total']:.2f} | " + " | ".join(cells) + f" | {bound} |")
        rounded = {name: {c: round(v, 4) for c, v in sec.items()} for name, sec in shares.items()}
        print(json.dumps({"profile": rounded, "machine": machine("cpu"), "overrides": args.overrides}))
        return
    levers = list(dict.fromkeys(["eager", *args.levers]))
    for lever in levers:
        lever_overrides(lever)
    run_levers = measure if args.in_process else isolated
    results = run_levers(levers, args.workloads, args.repeats, args.overrides)
    for name in results:
        base = results[name]["eager"]["per_s"]
        for lever in levers:
            results[name][lever]["speedup"] = round(results[name][lever]["per_s"] / base, 3)
    where = f"{machine('cpu')}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    how = "interleaved calls in one process" if args.in_process else "each lever in its own process"
    print(f"\n{where}; medians of {args.repeats} calls, {how}; speed-up = lever / eager\n")
    print("| workload | items per call | " + " | ".join(f"{lv} /s (x eager; first call s)" for lv in levers) + " |")
    print("|---|---:|" + "---:|" * len(levers))
    for name, row in results.items():
        cells = [f"{row[lv]['per_s']:.1f} ({row[lv]['speedup']:.2f}x; {row[lv]['warmup_s']:.1f})" for lv in levers]
        print(f"| {name} | {row['eager']['items']} | " + " | ".join(cells) + " |")

    def best(name: str) -> float | None:
        if name not in results:
            return None
        return max(r["speedup"] for lv, r in results[name].items() if lv != "eager") if len(levers) > 1 else 1.0

    tree_vs_flat = None
    if {"rollout_flat", "rollout_tree"} <= results.keys():
        tree_vs_flat = round(results["rollout_tree"]["eager"]["per_s"] / results["rollout_flat"]["eager"]["per_s"], 3)
    print(json.dumps({"rollout_speedup": best("rollout_flat"), "train_speedup": best("train_ppo"),
                      "tree_vs_flat_rollout": tree_vs_flat, "machine": where, "repeats": args.repeats,
                      "in_process": args.in_process,
                      "overrides": args.overrides, "results": results}))


if __name__ == "__main__":
    main()
