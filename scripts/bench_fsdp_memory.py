"""Peak resident memory per process: FSDP2 over 2 CPU processes against one unsharded process, while loading and
training a denoiser large enough for its weights to dominate (random weights, built here: no download).

    python scripts/bench_fsdp_memory.py                       # ~630M-parameter SD3 transformer, LoRA and full FT
    python scripts/bench_fsdp_memory.py --layers 2 --dim 64   # a seconds-long smoke run (what the test runs)

Each configuration runs ``diffrl.trainer.train`` for one RL step (rollouts, rewards, one update, a checkpoint, the
export) in fresh processes (1 unsharded, then 2 under ``torchrun`` with ``model.fsdp=true``); every process reports
its peak RSS (``ru_maxrss``, which covers loading) and its RSS after importing torch and diffusers (the part no
sharding can remove). Both run with glibc's mmap threshold fixed at 1 MB (``MALLOC_MMAP_THRESHOLD_``): otherwise
freed FSDP all-gather buffers stay resident and RSS measures the allocator, not the live memory. Prints a markdown
table and, last, one JSON line; ``--out`` also writes both.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["sampler.num_steps=2", "sampler.split_steps=[0]", "sampler.sde_window=null", "sampler.eval_steps=1",
         "sampler.guidance_scale=1.0", "train.steps=1", "train.prompts_per_step=2", "data.eval_size=2",
         "data.eval_seeds=1", "log.eval_every=0", "log.sample_every=0", "log.tensorboard=false",
         "log.checkpoint_every=1", "rewards={shapes_partial: 1.0}"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_model(folder: Path, layers: int, dim: int) -> int:
    """The tiny shapes pipeline with a ``layers`` x ``dim`` SD3 transformer (random weights), saved to ``folder``;
    returns the transformer's parameter count."""
    import torch
    from diffusers import SD3Transformer2DModel

    from diffrl.tiny_pipeline import CLIP_PROJ, T5_DIM, tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    torch.manual_seed(0)
    heads = dim // 64 if dim >= 64 else 1
    pipe.transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=4, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=dim // heads,
        num_attention_heads=heads, joint_attention_dim=T5_DIM, caption_projection_dim=dim,
        pooled_projection_dim=2 * CLIP_PROJ, pos_embed_max_size=8, qk_norm="rms_norm")
    pipe.register_modules(transformer=pipe.transformer)
    pipe.save_pretrained(str(folder))
    return sum(p.numel() for p in pipe.transformer.parameters())


def worker(args: argparse.Namespace) -> None:
    """One training process: import, train one step, report RSS to ``args.report/rank<r>.json``."""
    import diffusers  # noqa: F401  (what every process pays before any model exists)
    import torch  # noqa: F401

    from diffrl.config import load_config
    from diffrl.trainer import train

    imported = rss_mb()
    cfg = load_config(str(ROOT / "configs" / "tiny_shapes_tree.yaml"), [f"model.path={args.model}", *args.overrides])
    t0 = time.perf_counter()
    train(cfg, out=args.workdir, overwrite=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rank = int(os.environ.get("RANK", "0"))
    Path(args.report, f"rank{rank}.json").write_text(json.dumps({"peak_mb": peak, "imported_mb": imported,
                                                                  "seconds": time.perf_counter() - t0}))


def measure(model: Path, processes: int, overrides: list[str], work: Path) -> dict:
    report = Path(tempfile.mkdtemp(dir=work))
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    cmd = [*launcher, __file__, "--worker", "--model", str(model), "--workdir", str(report / "run"), "--report",
           str(report), *overrides, *(["model.fsdp=true"] if processes > 1 else [])]
    # glibc keeps freed heap chunks of up to 32 MB resident (its mmap threshold grows with use), so FSDP's gathered
    # blocks, freed after each forward, would stay in RSS as if alive; a fixed 1 MB threshold returns them to the OS.
    # Both configurations run with it (a GPU's caching allocator reuses that memory instead).
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes)), "HF_HUB_OFFLINE": "1",
           "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"bench_fsdp_memory: {' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(report.glob("rank*.json"))]
    return {"processes": processes, "peak_mb": max(r["peak_mb"] for r in ranks),
            "imported_mb": max(r["imported_mb"] for r in ranks), "seconds": max(r["seconds"] for r in ranks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--out", help="write the markdown table to OUT.md and the JSON to OUT.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args()
    args.overrides = overrides
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params = build_model(work / "model", args.layers, args.dim)
        rows = []
        for mode in args.modes:
            extra = [*SMALL, "model.lora_rank=0", "train.lr=1e-6"] if mode == "full" else [*SMALL]
            one = measure(work / "model", 1, extra, work)
            two = measure(work / "model", 2, extra, work)
            rows.append({"mode": mode, "unsharded": one, "fsdp2": two,
                         "ratio": round(two["peak_mb"] / one["peak_mb"], 3)})
    lines = [f"Peak RSS per process, one RL step of a {params / 1e6:.0f}M-parameter SD3 transformer ({args.layers} "
             f"blocks of width {args.dim}, fp32, random weights; {os.cpu_count()} CPUs, "
             "MALLOC_MMAP_THRESHOLD_=1 MB):", "",
             "| training | 1 process, unsharded (MB) | FSDP2, 2 processes: per process (MB) | ratio "
             "| after imports (MB) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'LoRA' if r['mode'] == 'lora' else 'full fine-tuning'} | {r['unsharded']['peak_mb']:.0f} | "
                     f"{r['fsdp2']['peak_mb']:.0f} | {r['ratio']:.2f}x | {r['unsharded']['imported_mb']:.0f} |")
    table = "\n".join(lines)
    result = {"parameters": params, "layers": args.layers, "dim": args.dim, "rows": rows}
    if args.out:
        Path(args.out + ".md").write_text(table + "\n")
        Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
