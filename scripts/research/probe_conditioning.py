"""Does a model's output depend on the count and relation words of its prompt? (the shapes world)

For count prompts, the number of objects the verifier finds is tabulated against the number asked for: a model
that reads the number word has a diagonal-heavy table, one that ignores it has the same row for every number.
For relation prompts with both objects found, the share placed as asked is set against the share placed as the
*opposite* relation (left <-> right, above <-> below) would ask: equal shares mean the relation word is ignored
(uniform placement gives 0.25 for either). Same sampler as the trainer's held-out evaluation (deterministic Euler,
CFG). Then, without sampling: how far one word of the prompt moves the guided velocity the sampler integrates,
|v(x, s | edited prompt) - v(x, s | prompt)| / |v(x, s | prompt)| at a few noise levels s, for edits of the
relation word, the word order, the count word and a colour word; a word the model ignores moves it by little.
Ends with one JSON line.

    python scripts/research/probe_conditioning.py [--model assets/tiny-sd3-shapes] [--lora RUN/lora] [--n 96]
    python scripts/research/probe_conditioning.py --checkpoint OUT-checkpoints/checkpoint-003500  # pretraining, mid-way
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: diffrl, rewards

from diffrl import checkpoint  # noqa: E402
from diffrl.inference import EVAL_GUIDANCE, EVAL_SEED, EVAL_STEPS, load_for_inference, sample  # noqa: E402
from diffrl.shapes import COLORS, Obj, Scene, prompt_of, random_scene  # noqa: E402
from rewards.shapes import _relation_holds, detect, to_pil  # noqa: E402

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NEXT_COUNT = {2: 3, 3: 4, 4: 2}
SCENE_SEEDS = {"count": 1, "relation": 2}
"""Seed of each kind's prompts: the sampled tables and the sensitivity table use the same prompts."""
SENSITIVITY_SIGMAS = (0.98, 0.9, 0.7, 0.5)
"""Noise levels of the sensitivity table: the layout is decided at the high ones."""


def _other_color(scene: Scene) -> str:
    used = {o.color for o in scene.objects}
    return next(c for c in COLORS if c not in used)


def edits(scene: Scene) -> dict[str, str]:
    """One-word edits of a relation or count scene's prompt: {edit name: edited prompt}."""
    if scene.kind == "relation":
        a, b = scene.objects
        return {"relation word flipped": prompt_of(Scene("relation", (a, b), OPPOSITE[scene.relation])),
                "objects swapped": prompt_of(Scene("relation", (b, a), scene.relation)),
                "relation: first colour changed": prompt_of(Scene("relation", (Obj(_other_color(scene), a.shape), b),
                                                                  scene.relation))}
    if scene.kind == "count":
        (o,) = scene.objects
        return {"count word changed": prompt_of(Scene("count", (Obj(o.color, o.shape, NEXT_COUNT[o.count]),))),
                "count: colour changed": prompt_of(Scene("count", (Obj(_other_color(scene), o.shape, o.count),)))}
    raise ValueError(f"edits are defined for relation and count scenes, not {scene.kind!r}")


@torch.no_grad()
def sensitivity(adapter, prompts: list[str], edited: list[dict[str, str]], sigmas, guidance: float,
                seed: int) -> dict[str, dict[float, float]]:
    """Mean over prompts of |v(x, s | edited) - v(x, s | prompt)| / |v(x, s | prompt)|, per edit and noise level s,
    with ``x`` one fixed standard-normal latent per prompt (``[n, *latent_shape]`` from ``seed``) and ``v`` the
    adapter's velocity at the given CFG scale."""
    x = torch.randn(len(prompts), *adapter.latent_shape, generator=torch.Generator().manual_seed(seed))
    base = adapter.encode(prompts)
    out: dict[str, dict[float, float]] = {name: {} for name in edited[0]}
    for sigma in sigmas:
        s = torch.full((len(prompts),), float(sigma))
        v0 = adapter.velocity(x, s, base, guidance).flatten(1)
        for name in out:
            v = adapter.velocity(x, s, adapter.encode([e[name] for e in edited]), guidance).flatten(1)
            out[name][sigma] = float(((v - v0).norm(dim=1) / v0.norm(dim=1)).mean())
    return out


PRETRAINED_MODULES = ("text_encoder", "text_encoder_2", "text_encoder_3")


def load_pretraining_checkpoint(adapter, path: str, weights: str = "ema") -> None:
    """Put the text encoders and the transformer (``weights``: its EMA, or the raw ``transformer``) of a
    ``scripts/pretrain_tiny.py`` checkpoint into ``adapter``'s pipeline, so a pretraining run can be probed while it
    runs. The VAE stays the adapter's: the flow-matching stage does not train it."""
    if not Path(path, "state.json").is_file():
        raise SystemExit(f"--checkpoint {path}: not a checkpoint folder (pretrain_tiny.py writes them to "
                         "OUT-checkpoints/checkpoint-NNNNNN)")
    tensors, _, _ = checkpoint.load(Path(path))
    missing = [m for m in (*PRETRAINED_MODULES, weights) if m not in tensors]
    if missing:
        raise SystemExit(f"--checkpoint {path}: holds no {', '.join(missing)} weights; pretrain_tiny.py's checkpoints "
                         "hold the transformer, its EMA and the text encoders")
    for name in PRETRAINED_MODULES:
        getattr(adapter.pipe, name).load_state_dict(tensors[name])
    adapter.pipe.transformer.load_state_dict(tensors[weights])


def scenes(kind: str, n: int) -> list:
    """``n`` random scenes of a kind, from the kind's ``SCENE_SEEDS`` seed."""
    rng = random.Random(SCENE_SEEDS[kind])
    return [random_scene(rng, kind) for _ in range(n)]


def count_table(adapter, n: int, args) -> dict[int, dict[int, int]]:
    """{asked: {found: times}} over ``n`` count prompts."""
    sc = scenes("count", n)
    images = to_pil(sample(adapter, [prompt_of(s) for s in sc], args.seed, args.steps, args.guidance))
    table: dict[int, dict[int, int]] = {}
    for s, img in zip(sc, images, strict=True):
        found = len(detect(img))
        row = table.setdefault(s.num_objects, {})
        row[found] = row.get(found, 0) + 1
    return table


def relation_shares(adapter, n: int, args) -> dict[str, float]:
    """Among relation samples whose two objects are both found once: share placed as asked, and as the opposite."""
    sc = scenes("relation", n)
    images = to_pil(sample(adapter, [prompt_of(s) for s in sc], args.seed, args.steps, args.guidance))
    asked = opposite = both = 0
    for s, img in zip(sc, images, strict=True):
        objs = detect(img)
        a = [o for o in objs if o["color"] == s.objects[0].color]
        b = [o for o in objs if o["color"] == s.objects[1].color]
        if len(a) == 1 and len(b) == 1:
            both += 1
            asked += _relation_holds(a[0], b[0], s.relation)
            opposite += _relation_holds(a[0], b[0], OPPOSITE[s.relation])
    return {"both_found": both, "as_asked": asked / max(both, 1), "as_opposite": opposite / max(both, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="assets/tiny-sd3-shapes")
    ap.add_argument("--lora")
    ap.add_argument("--checkpoint", help="a scripts/pretrain_tiny.py checkpoint folder: probe its weights in --model")
    ap.add_argument("--checkpoint-weights", choices=("ema", "transformer"), default="ema",
                    help="the checkpoint's transformer EMA or its raw weights")
    ap.add_argument("--n", type=int, default=96, help="prompts of each kind")
    ap.add_argument("--steps", type=int, default=EVAL_STEPS)
    ap.add_argument("--guidance", type=float, default=EVAL_GUIDANCE)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    args = ap.parse_args()
    adapter = load_for_inference(args.model, args.lora)
    if args.checkpoint:
        load_pretraining_checkpoint(adapter, args.checkpoint, args.checkpoint_weights)
    table = count_table(adapter, args.n, args)
    print("count prompts: objects found (columns) per number asked (rows), share of the row")
    cols = sorted({f for row in table.values() for f in row})
    print("| asked | " + " | ".join(str(c) for c in cols) + " | right |")
    print("|---|" + "---:|" * (len(cols) + 1))
    for k in sorted(table):
        total = sum(table[k].values())
        shares = [table[k].get(c, 0) / total for c in cols]
        print(f"| {k} ({total}) | " + " | ".join(f"{v:.2f}" for v in shares) + f" | {table[k].get(k, 0) / total:.2f} |")
    rel = relation_shares(adapter, args.n, args)
    print(f"relation prompts, both objects found in {rel['both_found']} of {args.n}: placed as asked "
          f"{rel['as_asked']:.2f}, as the opposite relation {rel['as_opposite']:.2f} (uniform placement: 0.25 each)")
    sens = {}
    for kind in ("relation", "count"):
        sc = scenes(kind, args.n)
        sens.update(sensitivity(adapter, [prompt_of(x) for x in sc], [edits(x) for x in sc], SENSITIVITY_SIGMAS,
                                args.guidance, args.seed))
    print(f"how far one word moves the guided velocity, |v(edited) - v| / |v| (mean of {args.n} prompts), "
          "per noise level")
    print("| edit | " + " | ".join(f"s = {s}" for s in SENSITIVITY_SIGMAS) + " |")
    print("|---|" + "---:|" * len(SENSITIVITY_SIGMAS))
    for name, row in sens.items():
        print(f"| {name} | " + " | ".join(f"{row[s]:.3f}" for s in SENSITIVITY_SIGMAS) + " |")
    right = sum(table[k].get(k, 0) for k in table) / sum(sum(r.values()) for r in table.values())
    print(json.dumps({"count_table": {str(k): {str(f): c for f, c in v.items()} for k, v in table.items()},
                      "count_right": round(right, 4), **{f"relation_{k}": (round(v, 4) if isinstance(v, float) else v)
                                                         for k, v in rel.items()},
                      "sensitivity": {name: {str(s): round(v, 4) for s, v in row.items()}
                                      for name, row in sens.items()}}))


if __name__ == "__main__":
    main()
