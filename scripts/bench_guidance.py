"""The cost of RL guidance against plain sampling, on the embedded model (or any model + LoRA).

Times, on the same prompts and seeds (median of ``--repeats``): plain deterministic sampling with the LoRA
(``inference.sample``), RL guidance at w = 1 (no reference pass: should cost the same), w = 1.5 (a reference and a
policy pass per step, each with its conditional and unconditional rows batched), and w = 1.5 with the first half of
the steps RL-only (the reference pass skipped there). Prints a table of seconds and ratios to plain sampling, then
one JSON line.

    python scripts/bench_guidance.py [--model assets/tiny-sd3-shapes] [--lora RUN/lora] [--prompts 16] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from diffrl.guidance import guidance_schedule
    from diffrl.guided_sampling import guided_sample
    from diffrl.inference import load_for_inference, sample
    from diffrl.prompts import eval_prompts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="assets/tiny-sd3-shapes")
    ap.add_argument("--lora", help="a diffusers-format LoRA folder; default: a random rank-8 LoRA")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    adapter = load_for_inference(args.model, args.lora)
    if not args.lora:
        adapter.add_lora(8, 8.0, ["to_q", "to_k", "to_v", "to_out.0"])
    prompts = eval_prompts("shapes:count,relation", args.prompts)
    T = args.steps
    runs = {
        "plain sampling (LoRA on)": lambda: sample(adapter, prompts, 0, T, args.guidance),
        "RLG w = 1 (reference skipped)": lambda: guided_sample(adapter, prompts, 0, T, args.guidance, torch.ones(T)),
        "RLG w = 1.5": lambda: guided_sample(adapter, prompts, 0, T, args.guidance, guidance_schedule(T, 1.5)),
        f"RLG w = 1.5, first {T // 2} steps RL-only": lambda: guided_sample(
            adapter, prompts, 0, T, args.guidance, guidance_schedule(T, 1.5, rl_only_steps=T // 2)),
    }
    times = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so drifts of the machine hit every variant alike
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med["plain sampling (LoRA on)"]
    cpu = (f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
           f"torch {torch.__version__}")
    print(f"{len(prompts)} prompts, {T} steps, CFG {args.guidance}; {cpu}; median of {args.repeats}\n")
    print("| sampler | s | x plain |")
    print("|---|---:|---:|")
    for name, s in med.items():
        print(f"| {name} | {s:.2f} | {s / base:.2f} |")
    print(json.dumps({"machine": cpu, "prompts": len(prompts), "steps": T,
                      **{name: {"s": round(s, 3), "ratio": round(s / base, 3)} for name, s in med.items()}}))


if __name__ == "__main__":
    main()
