"""How much can sharpening the model's own samples gain? pass@k on the trainer's held-out prompts (shapes world).

A GRPO-style method raises the probability of samples the model already draws; a policy that always drew the
best of its k samples would score pass@k (the share of prompts with at least one strictly correct sample among k,
unbiased estimator from ``n`` samples per prompt). pass@1 is the held-out strict accuracy the trainer reports;
pass@k for growing k is the ceiling of pure sharpening, and the share of prompts with no correct sample in ``n``
is what only learning something new can fix. Same prompts (``data.eval_prompts``, ``data.eval_size`` of the
config) and sampler as the trainer's evaluation: deterministic Euler, the config's guidance. Ends with one JSON line.

    python scripts/research/probe_headroom.py [--config configs/tiny_shapes.yaml] [--lora RUN/lora] [--n 16]
        [--prompts N] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: diffrl, rewards

from diffrl.config import load_config  # noqa: E402
from diffrl.inference import EVAL_SEED, load_for_inference, pass_at_k, sample  # noqa: E402
from diffrl.prompts import eval_prompts  # noqa: E402
from diffrl.shapes import in_grammar, parse_prompt  # noqa: E402
from rewards.shapes import shapes_reward  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny_shapes.yaml")
    ap.add_argument("--lora")
    ap.add_argument("--n", type=int, default=16, help="samples per prompt, each from its own seed")
    ap.add_argument("--prompts", type=int, help="held-out prompts (default: the config's data.eval_size)")
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (sampler.guidance_scale=4.5, ...)")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    prompts = eval_prompts(cfg.data.eval_prompts, args.prompts or cfg.data.eval_size)
    if not in_grammar(prompts):
        sys.exit(f"probe_headroom: {args.config}: data.eval_prompts {cfg.data.eval_prompts!r} holds prompts outside "
                 "the shapes grammar, which the verifier cannot score")
    adapter = load_for_inference(cfg.model.path, args.lora)
    t0 = time.time()
    repeated = prompts * args.n  # sample j * len(prompts) + i is prompt i's j-th seed, as in the trainer
    images = sample(adapter, repeated, args.seed, cfg.sampler.eval_steps, cfg.sampler.guidance_scale)
    strict = shapes_reward(images, repeated)["strict"].view(args.n, len(prompts))
    correct = strict.sum(0).round().int().tolist()
    kinds = [parse_prompt(p).kind for p in prompts]
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= args.n]
    rows = {}
    for kind in ["all"] + sorted(set(kinds)):
        cs = [c for c, kk in zip(correct, kinds, strict=True) if kind in ("all", kk)]
        rows[kind] = {"prompts": len(cs),
                      **{f"pass@{k}": sum(pass_at_k(args.n, c, k) for c in cs) / len(cs) for k in ks},
                      "never": sum(c == 0 for c in cs) / len(cs)}
    print(f"{len(prompts)} held-out prompts x {args.n} seeds, {cfg.sampler.eval_steps}-step Euler, guidance "
          f"{cfg.sampler.guidance_scale} ({time.time() - t0:.0f} s)")
    print("| prompts | " + " | ".join(f"pass@{k}" for k in ks) + f" | none right in {args.n} |")
    print("|---|" + "---:|" * (len(ks) + 1))
    for kind, r in rows.items():
        cells = " | ".join(f"{r[f'pass@{k}']:.3f}" for k in ks)
        print(f"| {kind} ({r['prompts']}) | {cells} | {r['never']:.2f} |")
    print(json.dumps({"n": args.n, "lora": args.lora, "rows": {k: {m: round(v, 4) for m, v in r.items()}
                                                               for k, r in rows.items()}}))


if __name__ == "__main__":
    main()
