"""Time per RL iteration and peak memory of full-size denoisers with a LoRA (random weights), on a GPU.

Models, from their published configs with random weights in bf16 (no weights can be downloaded on the benchmark
machines): an SD3.5-Medium-sized SD3 transformer and a FLUX.1-sized one at 512 and 1024 px, and a Wan 2.1
1.3B-sized video transformer at 480 x 832 x 33 frames. Each gets a rank-32 LoRA (peft) on the attention projections
and runs one RL iteration the way the trainer does: rollouts of ``--batch`` samples over ``--steps`` steps (no grad;
classifier-free guidance doubles the batch, except FLUX's guidance embedding), then ``--trained`` trained steps
(forward with grad and backward into the LoRA) for the same samples. Reported: seconds per iteration (median of
``--repeats`` after a warm-up), its rollout and training parts, and peak memory (``torch.cuda.max_memory_allocated``).
Text conditioning is random tensors of the real shapes: the trainer caches prompt embeddings, so the encoders are not
in the loop. ``--checkpointing`` turns on gradient checkpointing.

``--compile`` then compiles the same model in place the way ``model.compile: true`` does (regional: each repeated
block, ``diffrl.adapters.base.compile_blocks``) and times it again on the same inputs, side by side: the compiled
iteration, its rollout and training parts, the first (compiling) iteration apart as ``compile_warmup_s``, the
speedup (eager / compiled seconds per iteration) and the largest difference of one rollout forward's output from
the eager one's relative to its largest value (``compiled_rel_diff``). ``--compile-backend`` picks torch.compile's
backend (default inductor; ``aot_eager`` traces without generating kernels, which the CPU smoke test uses).

    python scripts/bench_families_gpu.py [--batch 4] [--steps 10] [--trained 4] [--checkpointing] [--compile]
    python scripts/bench_families_gpu.py --tiny     # the same code on tiny configs on the CPU (a smoke test)

Prints a markdown table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch


def sd3(tiny: bool) -> Callable:
    from diffusers import SD3Transformer2DModel

    if tiny:
        cfg = dict(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
                   out_channels=4, pos_embed_max_size=32)
        text, ch, pooled = (8, 32), 4, 16
    else:  # SD3.5 Medium
        cfg = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
        text, ch, pooled = (333, 4096), 16, 2048

    def make(px: int, dev, dtype):
        model = SD3Transformer2DModel(**cfg)
        side = px // (8 if not tiny else 4)

        def inputs(n: int) -> dict:
            return dict(hidden_states=torch.randn(n, ch, side, side, device=dev, dtype=dtype),
                        timestep=torch.full((n,), 500.0, device=dev, dtype=dtype),
                        encoder_hidden_states=torch.randn(n, *text, device=dev, dtype=dtype),
                        pooled_projections=torch.randn(n, pooled, device=dev, dtype=dtype))
        return model, inputs, True
    return make


def flux(tiny: bool) -> Callable:
    from diffusers import FluxTransformer2DModel

    if tiny:
        cfg = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                   axes_dims_rope=(2, 2, 4))
        text_len, text_dim, pooled = 8, 32, 16
    else:  # FLUX.1-dev
        cfg = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=(16, 56, 56))
        text_len, text_dim, pooled = 512, 4096, 768

    def make(px: int, dev, dtype):
        model = FluxTransformer2DModel(**cfg)
        tokens = (px // 16) ** 2

        def inputs(n: int) -> dict:
            return dict(hidden_states=torch.randn(n, tokens, cfg["in_channels"], device=dev, dtype=dtype),
                        timestep=torch.full((n,), 0.5, device=dev, dtype=dtype),
                        guidance=torch.full((n,), 3.5, device=dev, dtype=dtype),
                        encoder_hidden_states=torch.randn(n, text_len, text_dim, device=dev, dtype=dtype),
                        pooled_projections=torch.randn(n, pooled, device=dev, dtype=dtype),
                        img_ids=torch.zeros(tokens, 3, device=dev, dtype=dtype),
                        txt_ids=torch.zeros(text_len, 3, device=dev, dtype=dtype))
        return model, inputs, False  # guidance-distilled: no CFG batch
    return make


def wan(tiny: bool) -> Callable:
    from diffusers import WanTransformer3DModel

    if tiny:
        cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                   text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        text, shape = (8, 32), (4, 3, 8, 8)
    else:  # Wan 2.1 T2V 1.3B at 480 x 832, 33 frames
        cfg = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                   out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
        text, shape = (512, 4096), (16, (33 - 1) // 4 + 1, 480 // 8, 832 // 8)

    def make(px: int, dev, dtype):
        model = WanTransformer3DModel(**cfg)

        def inputs(n: int) -> dict:
            return dict(hidden_states=torch.randn(n, *shape, device=dev, dtype=dtype),
                        timestep=torch.full((n,), 500.0, device=dev, dtype=dtype),
                        encoder_hidden_states=torch.randn(n, *text, device=dev, dtype=dtype))
        return model, inputs, True
    return make


def iteration(model, inputs: Callable, batch: int, steps: int, trained: int, cfg: bool, sync: Callable) -> tuple:
    """(rollout seconds, training seconds) of one RL iteration."""
    rows = batch * (2 if cfg else 1)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            model(**inputs(rows), return_dict=False)
    sync()
    t1 = time.perf_counter()
    for _ in range(trained):
        out = model(**inputs(rows), return_dict=False)[0]
        out.float().square().mean().backward()
    sync()
    return t1 - t0, time.perf_counter() - t1


def timed(model, inputs: Callable, args: argparse.Namespace, cfg: bool, sync: Callable, cuda: bool) -> dict:
    """One warm-up iteration (its seconds: ``warmup_s``), then the medians of ``--repeats`` iterations and the peak
    memory from after the warm-up."""
    t0 = time.perf_counter()
    iteration(model, inputs, args.batch, 1, 1, cfg, sync)
    warmup = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [iteration(model, inputs, args.batch, args.steps, args.trained, cfg, sync) for _ in range(args.repeats)]
    roll, train = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
    return {"iteration_s": round(roll + train, 3), "rollout_s": round(roll, 3), "train_s": round(train, 3),
            "warmup_s": round(warmup, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None}


def rollout_output(model, inputs: Callable, batch: int) -> torch.Tensor:
    """One no-grad forward's output on inputs drawn from a fixed seed (the same for the eager and compiled model)."""
    torch.manual_seed(0)
    with torch.no_grad():
        return model(**inputs(batch), return_dict=False)[0].float()


def compiled_comparison(model, inputs: Callable, args: argparse.Namespace, cfg: bool, sync: Callable, cuda: bool,
                        eager: dict) -> dict:
    """``model`` compiled in place (``compile_blocks``) and timed like the eager one: the ``compiled_*`` fields."""
    from diffrl.adapters.base import compile_blocks

    before = rollout_output(model, inputs, args.batch)
    compile_blocks(model, args.compile_backend)
    after = rollout_output(model, inputs, args.batch)
    t = timed(model, inputs, args, cfg, sync, cuda)
    return {"compiled_iteration_s": t["iteration_s"], "compiled_rollout_s": t["rollout_s"],
            "compiled_train_s": t["train_s"], "compile_warmup_s": t["warmup_s"], "compiled_peak_gib": t["peak_gib"],
            "compiled_speedup": round(eager["iteration_s"] / t["iteration_s"], 3),
            "compiled_rel_diff": float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))}


def main() -> None:
    from peft import LoraConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--trained", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time each model compiled (regional), side by side")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU: a smoke test of this script")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise SystemExit("bench_families_gpu.py needs a CUDA GPU (or --tiny for a CPU smoke test)")
    dev, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cases = [("SD3.5-Medium", sd3, 512), ("SD3.5-Medium", sd3, 1024), ("FLUX.1", flux, 512), ("FLUX.1", flux, 1024),
             ("Wan 2.1 1.3B, 33 frames", wan, 480)]
    rows = []
    for name, family, px in cases:
        model, inputs, cfg = family(args.tiny)(px if not args.tiny else 32, dev, dtype)
        model.to(dev, dtype).requires_grad_(False)
        model.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        for n, p in model.named_parameters():  # fp32 LoRA on bf16 weights, as the trainer keeps it
            if "lora_" in n:
                p.data = p.data.float()
                p.requires_grad_(True)
        if args.checkpointing:
            model.enable_gradient_checkpointing()
        eager = timed(model, inputs, args, cfg, sync, cuda)
        row = {"model": name, "px": px, "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
               **{k: v for k, v in eager.items() if k != "warmup_s"}}
        if args.compile:
            row.update(compiled_comparison(model, inputs, args, cfg, sync, cuda, eager))
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if cuda else "CPU (--tiny smoke test: not a measurement)"
    print(f"\n{device}; batch {args.batch}, {args.steps} rollout steps, {args.trained} trained steps, LoRA rank "
          f"{args.lora_rank}, gradient checkpointing {'on' if args.checkpointing else 'off'}\n")
    print("| model | px | params (B) | s / RL iteration | rollout s | train s | peak GiB |"
          + (" compiled s / iteration | speedup | compile warm-up s | compiled rel. diff |" if args.compile else ""))
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|---:|" if args.compile else ""))
    for r in rows:
        print(f"| {r['model']} | {r['px']} | {r['params_b']} | {r['iteration_s']} | {r['rollout_s']} | {r['train_s']} "
              f"| {r['peak_gib']} |" + (f" {r['compiled_iteration_s']} | {r['compiled_speedup']}x | "
                                        f"{r['compile_warmup_s']} | {r['compiled_rel_diff']:.1e} |" if args.compile
                                        else ""))
    print(json.dumps({"device": device, "batch": args.batch, "steps": args.steps, "trained": args.trained,
                      "compile": args.compile_backend if args.compile else None, "results": rows}))


if __name__ == "__main__":
    main()
