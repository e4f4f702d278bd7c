"""Pretrain the embedded tiny text-to-image model on the shapes world and save it under assets/ (CPU, seeded).

Stage 1 trains the x1 AutoencoderKL to reconstruct shapes images; stage 2 trains the SD3 transformer and the three
text encoders jointly with the rectified-flow loss (x_s = (1 - s) z + s eps, target eps - z, s ~ U(0, 1)), with
10% of prompts dropped to "" so classifier-free guidance works, and keeps an EMA of the transformer. Every step
draws fresh scenes from the seeded shapes grammar. Finally it scores 20-step samples per prompt kind with the
shapes verifier and writes the model card.

    python scripts/pretrain_tiny.py --out assets/tiny-sd3-shapes            # the shipped model (about 37 min on 2 cores)
    python scripts/pretrain_tiny.py --out /tmp/t --vae-steps 20 --steps 20  # smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffrl.adapters.tiny import T5_LEN, tiny_sd3_pipeline
from diffrl.shapes import KINDS, prompt_of, random_scene, render
from rewards.shapes import shapes_reward


def batch(rng: random.Random, n: int) -> tuple[list[str], torch.Tensor]:
    """``n`` fresh (prompt, image) pairs; images ``[n, 3, 32, 32]`` in [-1, 1]."""
    prompts, images = [], []
    for _ in range(n):
        scene = random_scene(rng)
        prompts.append(prompt_of(scene))
        images.append(np.asarray(render(scene, rng)))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return prompts, x


def train_vae(pipe, steps: int, rng: random.Random, bs: int) -> None:
    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for _ in tqdm(range(steps), desc="vae"):
        _, x = batch(rng, bs)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(batch(rng, bs)[1]).latent_dist.mode() for _ in range(4)])
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))


@torch.no_grad()
def vae_accuracy(pipe, rng: random.Random, n: int = 256) -> float:
    """Verifier strict accuracy on VAE reconstructions of fresh renders (the ceiling the generator can reach)."""
    prompts, x = batch(rng, n)
    recon = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
    return float(shapes_reward((recon + 1) / 2, prompts)["strict"].mean())


def encode(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=T5_LEN, device=torch.device("cpu"))
    return embeds, pooled


def train_flow(pipe, steps: int, rng: random.Random, bs: int, lr: float) -> torch.nn.Module:
    """Joint transformer + text-encoder flow matching; returns the EMA transformer."""
    vae, tr = pipe.vae, pipe.transformer.train()
    encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    params = list(tr.parameters()) + [p for e in encoders for p in e.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    ema = copy.deepcopy(tr).requires_grad_(False)
    bar = tqdm(range(steps), desc="flow matching")
    for step in bar:
        prompts, x = batch(rng, bs)
        prompts = ["" if rng.random() < 0.1 else p for p in prompts]
        with torch.no_grad():
            z = (vae.encode(x).latent_dist.sample() - vae.config.shift_factor) * vae.config.scaling_factor
        embeds, pooled = encode(pipe, prompts)
        s = torch.rand(bs)
        eps = torch.randn_like(z)
        xs = (1 - s[:, None, None, None]) * z + s[:, None, None, None] * eps
        v = tr(hidden_states=xs, timestep=s * 1000, encoder_hidden_states=embeds, pooled_projections=pooled,
               return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v, eps - z)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), tr.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return ema.eval()


@torch.no_grad()
def evaluate(pipe, n_per_kind: int, seed: int, guidance: float = 4.5, steps: int = 20) -> dict[str, float]:
    """Strict and partial verifier accuracy of ``steps``-step samples, per prompt kind (held-out seeds)."""
    out = {}
    for kind in KINDS:
        rng = random.Random(10_000 + seed)
        prompts = [prompt_of(random_scene(rng, kind)) for _ in range(n_per_kind)]
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                      output_type="pt", max_sequence_length=T5_LEN,
                      generator=torch.Generator().manual_seed(seed)).images
        r = shapes_reward(images, prompts)
        out[f"{kind}_strict"], out[f"{kind}_partial"] = float(r["strict"].mean()), float(r["partial"].mean())
    return out


def write_card(out: Path, card: dict) -> None:
    """The model card: how the model was trained and its measured base scores."""
    a, sc = card["args"], card["base_scores"]
    rows = "\n".join(f"| {k} | {sc[f'{k}_strict']:.2f} | {sc[f'{k}_partial']:.2f} |" for k in KINDS)
    (out / "README.md").write_text(f"""# tiny-sd3-shapes

A tiny `StableDiffusion3Pipeline` (diffusers) for the shapes world of diffrl: 32 x 32 images of coloured
circles, squares and triangles on black, prompted by counts, colours, sizes and spatial relations. It exists
so that RL fine-tuning runs end to end on a CPU with no model hub; it is not a general image model.

- Components (built in code by `diffrl/adapters/tiny.py`): SD3Transformer2DModel (6 layers, 4 heads x 32,
  patch 4, 4 x 32 x 32 latents, {card.get("transformer_params", "3.5M")} parameters), an x1 AutoencoderKL, two
  CLIP text encoders (hidden 32) and a T5 encoder (d_model 64) with word-level tokenizers built from the grammar.
- Training (`scripts/pretrain_tiny.py`, seed {a["seed"]}, CPU, torch {card["torch"]}): the VAE for {a["vae_steps"]}
  steps (reconstructions pass the verifier {card["vae_reconstruction_strict"]:.1%} of the time), then the
  transformer and the text encoders jointly with the rectified-flow loss for {a["steps"]} steps of batch
  {a["batch"]} (fresh scenes every step, 10% empty prompts for classifier-free guidance, EMA of the
  transformer), {card["train_s"] / 60:.0f} minutes on 2 cores.
- Rebuild: `python scripts/pretrain_tiny.py --out assets/tiny-sd3-shapes`.

Base scores: shapes verifier on {a["eval_per_kind"]} held-out prompts per kind, 20-step Euler sampling,
guidance 4.5, seed {a["seed"]}:

| prompt kind | strict | partial |
|---|---|---|
{rows}
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="assets/tiny-sd3-shapes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=500)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-per-kind", type=int, default=100)
    ap.add_argument("--vae-only", action="store_true", help="train and check the VAE, then stop")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.time()
    pipe = tiny_sd3_pipeline()
    train_vae(pipe, args.vae_steps, rng, args.batch)
    vae_acc = vae_accuracy(pipe, random.Random(args.seed + 1))
    print(f"VAE reconstruction verifier accuracy: {vae_acc:.3f}")
    if args.vae_only:
        return
    pipe.transformer = train_flow(pipe, args.steps, rng, args.batch, args.lr)
    for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        m.eval().requires_grad_(False)
    train_s = time.time() - t0
    scores = evaluate(pipe, args.eval_per_kind, args.seed)
    out = Path(args.out)
    pipe.save_pretrained(out)
    card = {"args": vars(args), "train_s": round(train_s, 1), "torch": torch.__version__,
            "vae_reconstruction_strict": vae_acc, "base_scores": scores,
            "transformer_params": sum(p.numel() for p in pipe.transformer.parameters())}
    (out / "training.json").write_text(json.dumps(card, indent=2))
    write_card(out, card)
    print(json.dumps(card))


if __name__ == "__main__":
    main()
