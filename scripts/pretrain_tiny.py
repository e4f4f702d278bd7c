"""Pretrain the embedded tiny text-to-image model on the shapes world and save it under assets/ (CPU, seeded).

Stage 1 trains the x1 AutoencoderKL to reconstruct shapes images from pixel-aligned latents: the posterior mean is
pulled towards (r, g, b, 0), and the decoder sees it with a little noise so it forgives the generator's errors. A
free-form latent code reconstructs as well but the transformer then denoises well from half noise yet draws
fragments from pure noise (measured); in pixel-like latents objects are flat regions, which it learns in minutes.
Stage 2 trains the SD3 transformer and the three text encoders jointly with the rectified-flow loss
(x_s = (1 - s) z + s eps, target eps - z, s ~ U(0, 1), or shifted towards noise by ``--shift``) on the posterior
means, with 10% of prompts dropped to "" so classifier-free guidance works, and keeps an EMA of the transformer; the
EMA or the raw weights are kept, whichever scores higher. Every step draws fresh scenes from the seeded shapes
grammar. Finally it scores 20-step samples per prompt kind with the shapes verifier and writes the model card.

    python scripts/pretrain_tiny.py --out assets/tiny-sd3-shapes            # the shipped model's first run (about
                                                                            # 39 min on 2 cores; its card lists the
                                                                            # --init runs after it)
    python scripts/pretrain_tiny.py --out /tmp/t --vae-steps 20 --steps 20  # smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from diffrl import checkpoint
from diffrl.inference import EVAL_GUIDANCE
from diffrl.shapes import KINDS, prompt_of, random_scene, render
from diffrl.tiny_pipeline import T5_LEN, tiny_sd3_pipeline
from rewards.shapes import shapes_reward

RL_EVAL_N = 512


def batch(rng: random.Random, n: int,
          kind_weights: Optional[dict[str, float]] = None) -> tuple[list[str], torch.Tensor]:
    """``n`` fresh (prompt, image) pairs; images ``[n, 3, 32, 32]`` in [-1, 1]. Prompt kinds are uniform, or drawn
    with ``kind_weights`` (relative, per kind of ``KINDS``)."""
    prompts, images = [], []
    for _ in range(n):
        kind = rng.choices(list(kind_weights), list(kind_weights.values()))[0] if kind_weights else None
        scene = random_scene(rng, kind)
        prompts.append(prompt_of(scene))
        images.append(np.asarray(render(scene, rng)))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return prompts, x


def shifted_levels(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Noise levels ``shift * u / (1 + (shift - 1) * u)`` for ``u ~ U(0, 1)``, any shape (SD3's timestep shift):
    ``shift`` 1 keeps them uniform; ``shift`` > 1 spends more of training at high noise, where the layout (where each
    object goes, how many there are) is decided. The median level is ``shift / (1 + shift)``."""
    return shift * u / (1 + (shift - 1) * u)


def parse_kind_weights(spec: Optional[str]) -> Optional[dict[str, float]]:
    """``"single=1,relation=3"`` -> ``{"single": 1.0, "count": 0.0, "pair": 0.0, "relation": 3.0}``; None stays None."""
    if not spec:
        return None
    weights = dict.fromkeys(KINDS, 0.0)
    for item in spec.split(","):
        kind, _, value = item.partition("=")
        try:
            if kind not in weights:
                raise ValueError(kind)
            weights[kind] = float(value)
        except ValueError:
            raise SystemExit(f"--kind-weights: {item!r} is not KIND=WEIGHT with KIND one of {list(KINDS)}") from None
    if sum(weights.values()) <= 0 or min(weights.values()) < 0:
        raise SystemExit(f"--kind-weights {spec!r}: weights must be >= 0 with a positive sum")
    return weights


def train_vae(pipe, steps: int, rng: random.Random, bs: int) -> None:
    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for _ in tqdm(range(steps), desc="vae"):
        _, x = batch(rng, bs)
        z = vae.encode(x).latent_dist.mode()
        recon = vae.decode(z + 0.1 * torch.randn_like(z)).sample
        pixel_aligned = torch.cat([x, torch.zeros_like(x[:, :1])], 1)
        loss = torch.nn.functional.mse_loss(recon, x) + torch.nn.functional.mse_loss(z, pixel_aligned)
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


MODULES = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
RESUME_KEYS = ("seed", "vae_steps", "steps", "batch", "lr", "init", "cosine", "kind_weights", "shift")
"""Arguments a resumed run must share with the run that wrote its checkpoints."""


class Checkpoints:
    """Atomic checkpoints of the flow-matching stage (``diffrl.checkpoint``): the pipeline's trained modules and the
    VAE, the transformer's EMA, optimizer and schedule, the scene and torch RNG states, the step and the training
    seconds so far. A resumed run continues bit for bit where the checkpoint left off."""

    def __init__(self, directory: Path, every: int, args: dict):
        self.dir, self.every, self.args = Path(directory), every, {k: args.get(k) for k in RESUME_KEYS}

    def latest(self) -> Optional[Path]:
        return checkpoint.latest(self.dir) if self.dir.is_dir() else None

    def due(self, step: int, steps: int) -> bool:
        return step % self.every == 0 or step == steps

    def save(self, step: int, pipe, ema, opt, sched, rng: random.Random, train_s: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        modules = {**{name: getattr(pipe, name) for name in MODULES}, "ema": ema}
        # copies: T5 ties its input embedding to ``shared``, and safetensors refuses tensors that share memory
        tensors = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in modules.items()}
        version, internal, gauss = rng.getstate()
        state = {"args": self.args, "scene_rng": [version, list(internal), gauss], "train_s": train_s,
                 "vae_config": {k: pipe.vae.config[k] for k in ("shift_factor", "scaling_factor")}}
        checkpoint.save(self.dir, step, tensors, {"optimizer": opt.state_dict(), "schedule": sched.state_dict()}, state)

    def restore_modules(self, path: Path, pipe) -> tuple[dict, dict, dict]:
        """Load the pipeline's modules (and the RNG states) from ``path``; returns the EMA's weights, the optimizer
        state and the state dict. Refuses a checkpoint written with other training arguments."""
        tensors, optim, state = checkpoint.load(path)
        differ = {k: (state["args"].get(k), v) for k, v in self.args.items() if state["args"].get(k) != v}
        if differ:
            raise SystemExit(f"--resume: {path} was written with other arguments (name: checkpoint's, this run's): "
                             + ", ".join(f"{k}: {a!r}, {b!r}" for k, (a, b) in differ.items()))
        for name in MODULES:
            getattr(pipe, name).load_state_dict(tensors[name])
        pipe.vae.register_to_config(**state["vae_config"])
        return tensors["ema"], optim, state


def train_flow(pipe, steps: int, rng: random.Random, bs: int, lr: float, cosine: bool = False,
               kind_weights: Optional[dict[str, float]] = None, ckpts: Optional[Checkpoints] = None,
               resume: Optional[tuple[dict, dict, dict]] = None, elapsed: float = 0.0,
               shift: float = 1.0) -> tuple[torch.nn.Module, float]:
    """Joint transformer + text-encoder flow matching; trains ``pipe.transformer`` and returns its EMA copy and the
    training seconds (``elapsed`` before this call included). ``ckpts`` writes checkpoints, the first before step 1
    (the VAE stage is then never redone); ``resume`` (``Checkpoints.restore_modules``' output, the modules already
    loaded) continues from one. ``shift`` draws noise levels by ``shifted_levels``."""
    vae, tr = pipe.vae, pipe.transformer.train()
    encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    params = list(tr.parameters()) + [p for e in encoders for p in e.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    def factor(s: int) -> float:  # linear warm-up over 200 steps, then constant or cosine down to 10%
        return min(1.0, (s + 1) / 200) * ((0.55 + 0.45 * math.cos(math.pi * s / steps)) if cosine else 1.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    ema = copy.deepcopy(tr).requires_grad_(False)
    start, spent = 0, elapsed
    if resume is not None:
        ema_weights, optim, state = resume
        ema.load_state_dict(ema_weights)
        opt.load_state_dict(optim["optimizer"])
        sched.load_state_dict(optim["schedule"])
        version, internal, gauss = state["scene_rng"]
        rng.setstate((version, tuple(internal), gauss))
        start, spent = state["step"], state["train_s"]
    t0 = time.time() - spent
    if ckpts is not None and resume is None:
        ckpts.save(0, pipe, ema, opt, sched, rng, spent)
    bar = tqdm(range(start, steps), desc="flow matching", initial=start, total=steps)
    for step in bar:
        prompts, x = batch(rng, bs, kind_weights)
        prompts = ["" if rng.random() < 0.1 else p for p in prompts]
        with torch.no_grad():
            z = (vae.encode(x).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        embeds, pooled = encode(pipe, prompts)
        s = shifted_levels(torch.rand(bs), shift)
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
            decay = min(0.998, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), tr.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if ckpts is not None and ckpts.due(step + 1, steps):
            ckpts.save(step + 1, pipe, ema, opt, sched, rng, time.time() - t0)
    return ema.eval(), time.time() - t0


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


def rl_eval_scores(model_dir: Path, n: int = RL_EVAL_N, guidance: float = EVAL_GUIDANCE) -> dict[str, float]:
    """Strict accuracy of the saved model on the ``n`` held-out count/relation prompts RL is evaluated on, scored as
    ``diffrl eval --model DIR --n n --guidance g`` scores them (same prompts, sampler and seed)."""
    from diffrl.inference import eval_accuracy, load_for_inference
    from diffrl.prompts import eval_prompts

    return eval_accuracy(load_for_inference(str(model_dir)), eval_prompts("shapes:count,relation", n),
                         guidance=guidance)


def rl_eval_card(model_dir: Path, n: int) -> dict:
    """The card's RL-evaluation entries: scores with the default guidance and without guidance (the main job's)."""
    return {"rl_eval": rl_eval_scores(model_dir, n), "rl_eval_n": n,
            "rl_eval_cfg_free": rl_eval_scores(model_dir, n, guidance=1.0)}


def _run_line(i: int, run: dict) -> str:
    a = run["args"]
    what = (f"the VAE for {a['vae_steps']} steps, then " if not a.get("init") else "continued: ")
    lr = f"lr {a['lr']:g}" + (" with cosine decay" if a.get("cosine") else "")
    mix = f", prompt kinds weighted {a['kind_weights']}" if a.get("kind_weights") else ""
    mix += f", noise levels shifted by {a['shift']:g}" if a.get("shift", 1.0) != 1.0 else ""
    return (f"  {i}. {what}{a['steps']} flow-matching steps of batch {a['batch']} ({lr}{mix}), "
            f"{run['train_s'] / 60:.0f} min; kept the {'EMA' if run['weights'] == 'ema' else 'last'} weights")


def _command(run: dict, out: str) -> str:
    a = run["args"]
    flags = [f"--init {out}" if a.get("init") else "", f"--steps {a['steps']}", f"--lr {a['lr']:g}",
             "--cosine" if a.get("cosine") else "",
             f"--kind-weights {a['kind_weights']}" if a.get("kind_weights") else "",
             f"--shift {a['shift']:g}" if a.get("shift", 1.0) != 1.0 else ""]
    return "python scripts/pretrain_tiny.py --out " + out + " " + " ".join(f for f in flags if f)


def _cfg_free_line(card: dict) -> str:
    """The card's sentence on the CFG-free score (the main job's sampler)."""
    r, n = card["rl_eval_cfg_free"], card["rl_eval_n"]
    return (f"Without classifier-free guidance, the main job's sampler (`... --n {n} --guidance 1`): strict "
            f"{r['accuracy']:.3f} (count {r['accuracy_count']:.3f}, relation {r['accuracy_relation']:.3f}).\n")


def write_card(out: Path, card: dict) -> None:
    """The model card: how the model was trained (every run that built it) and its measured base scores."""
    a, sc, history, rl = card["args"], card["base_scores"], card["history"], card["rl_eval"]
    rl_n = card["rl_eval_n"]
    rows = "\n".join(f"| {k} | {sc[f'{k}_strict']:.2f} | {sc[f'{k}_partial']:.2f} |" for k in KINDS)
    steps = sum(r["args"]["steps"] for r in history)
    minutes = sum(r["train_s"] for r in history) / 60
    runs = "\n".join(_run_line(i + 1, r) for i, r in enumerate(history))
    commands = "\n".join(_command(r, "assets/tiny-sd3-shapes") for r in history)
    (out / "README.md").write_text(f"""# tiny-sd3-shapes

A tiny `StableDiffusion3Pipeline` (diffusers) for the shapes world of diffrl: 32 x 32 images of coloured
circles, squares and triangles on black, prompted by counts, colours, sizes and spatial relations. It exists
so that RL fine-tuning runs end to end on a CPU with no model hub; it is not a general image model.

- Components (built in code by `diffrl/tiny_pipeline.py`): SD3Transformer2DModel (6 layers, 4 heads x 32,
  patch 4, 4 x 32 x 32 latents, {card["transformer_params"]} parameters), an x1 AutoencoderKL with pixel-aligned
  latents, two CLIP text encoders (hidden 32) and a T5 encoder (d_model 64) with word-level tokenizers built from
  the grammar.
- Training (`scripts/pretrain_tiny.py`, seed {a["seed"]}, CPU, torch {card["torch"]}): VAE reconstructions pass the
  verifier {card["vae_reconstruction_strict"]:.1%} of the time; the transformer and the text encoders train jointly
  with the rectified-flow loss (fresh scenes every step, 10% empty prompts for classifier-free guidance), EMA or last
  weights kept by score on other held-out seeds. {steps} flow-matching steps in all, {minutes:.0f} minutes on 2 cores:
{runs}
- Rebuild:

  ```
{chr(10).join("  " + c for c in commands.splitlines())}
  ```

Base scores: shapes verifier on {a["eval_per_kind"]} held-out prompts per kind, 20-step Euler sampling,
guidance 4.5, seed {a["seed"]}:

| prompt kind | strict | partial |
|---|---|---|
{rows}

On the count/relation prompts RL is evaluated on (`diffrl eval --model assets/tiny-sd3-shapes --n {rl_n}`): strict
{rl["accuracy"]:.3f} on {rl_n} prompts (count {rl["accuracy_count"]:.3f}, relation {rl["accuracy_relation"]:.3f}).
{_cfg_free_line(card)}`python scripts/research/probe_headroom.py` measures pass@k of the base on the main job's
held-out prompts.

**Status.** An RL starting point: the strict scores above say what it already gets right and what is left for RL.
What RL fine-tuning does to this model on a 2-core CPU is measured in the diffrl docs
(docs/research/embedded-model.md).
""")


def rewrite_card(out: Path) -> None:
    """Re-score a saved model on the RL evaluation prompts and rewrite ``training.json`` and the card from it."""
    path = out / "training.json"
    if not path.is_file():
        raise SystemExit(f"pretrain_tiny: {path} does not exist: --rewrite-card needs a model this script saved")
    card = json.loads(path.read_text())
    card.update(rl_eval_card(out, RL_EVAL_N))
    path.write_text(json.dumps(card, indent=2))
    write_card(out, card)
    print(json.dumps({f"guidance {EVAL_GUIDANCE:g}": card["rl_eval"], "guidance 1": card["rl_eval_cfg_free"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="assets/tiny-sd3-shapes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=500)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--eval-per-kind", type=int, default=100)
    ap.add_argument("--vae-only", action="store_true", help="train and check the VAE, then stop")
    ap.add_argument("--init", help="continue training this saved model (its VAE is kept)")
    ap.add_argument("--cosine", action="store_true", help="cosine learning-rate decay to 10%% over the run")
    ap.add_argument("--kind-weights", help="relative frequency of each prompt kind in the flow-matching batches, "
                    "e.g. single=1,count=1,pair=1,relation=3 (default: uniform)")
    ap.add_argument("--shift", type=float, default=1.0,
                    help="noise-level shift of the flow-matching loss (1: uniform levels; 3: median level 0.75)")
    ap.add_argument("--checkpoint-every", type=int, default=250,
                    help="flow-matching steps between checkpoints (0: none); they go to --checkpoint-dir")
    ap.add_argument("--checkpoint-dir", help="default: OUT-checkpoints beside --out; removed once the model is saved")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    ap.add_argument("--rl-eval-n", type=int, default=RL_EVAL_N,
                    help="count/relation prompts of the card's RL-evaluation score")
    ap.add_argument("--rewrite-card", action="store_true",
                    help="re-score the model at --out on the RL evaluation prompts and rewrite its card; no training")
    args = ap.parse_args()
    if args.shift <= 0:
        raise SystemExit(f"--shift {args.shift:g}: the noise-level shift must be positive (1 keeps levels uniform)")
    if args.rewrite_card:
        rewrite_card(Path(args.out))
        return
    ckpts = Checkpoints(Path(args.checkpoint_dir or f"{args.out.rstrip('/')}-checkpoints"), args.checkpoint_every,
                        vars(args))
    found = ckpts.latest()
    if args.resume and found is None:
        raise SystemExit(f"--resume: no checkpoint in {ckpts.dir} (the run writes them every --checkpoint-every steps)")
    if found is not None and not args.resume:
        raise SystemExit(f"{ckpts.dir} holds checkpoints of an earlier run: add --resume to continue it, or delete "
                         "the folder to start over")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.time()
    history = []
    if args.init:  # continue a saved model: its VAE is kept, its transformer and text encoders train on
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(args.init)
        prev = json.loads((Path(args.init) / "training.json").read_text())
        history = prev.get("history") or [{k: prev[k] for k in ("args", "train_s", "weights", "selection")}]
        rng = random.Random(args.seed + 7919 * len(history))  # fresh scenes, not a replay of the earlier runs
        torch.manual_seed(args.seed + 7919 * len(history))
        for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.transformer):
            m.requires_grad_(True)
    else:
        pipe = tiny_sd3_pipeline()
        if found is None:
            train_vae(pipe, args.vae_steps, rng, args.batch)
    resume = ckpts.restore_modules(found, pipe) if found is not None else None
    pipe.vae.eval().requires_grad_(False)
    vae_acc = vae_accuracy(pipe, random.Random(args.seed + 1))
    print(f"VAE reconstruction verifier accuracy: {vae_acc:.3f}")
    if args.vae_only:
        return
    ema, train_s = train_flow(pipe, args.steps, rng, args.batch, args.lr, args.cosine,
                              parse_kind_weights(args.kind_weights), ckpts if args.checkpoint_every else None, resume,
                              time.time() - t0, args.shift)
    for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.transformer):
        m.eval().requires_grad_(False)
    candidates, selection = {"raw": pipe.transformer, "ema": ema}, {}
    for name, candidate in candidates.items():  # chosen on other held-out seeds than the card's scores
        pipe.transformer = candidate
        selection[name] = evaluate(pipe, args.eval_per_kind // 2, args.seed + 1)
        print(name, selection[name])
    chosen = max(selection, key=lambda k: sum(selection[k].values()))
    pipe.transformer = candidates[chosen]
    scores = evaluate(pipe, args.eval_per_kind, args.seed)
    out = Path(args.out)
    pipe.save_pretrained(out)
    run = {"args": vars(args), "train_s": round(train_s, 1), "weights": chosen, "selection": selection}
    card = {**run, "history": history + [run], "torch": torch.__version__, "vae_reconstruction_strict": vae_acc,
            "base_scores": scores, "transformer_params": sum(p.numel() for p in pipe.transformer.parameters()),
            **rl_eval_card(out, args.rl_eval_n)}
    (out / "training.json").write_text(json.dumps(card, indent=2))
    write_card(out, card)
    shutil.rmtree(ckpts.dir, ignore_errors=True)  # the model is saved whole: its checkpoints are spent
    print(json.dumps(card))


if __name__ == "__main__":
    main()
