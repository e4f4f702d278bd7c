"""How much of one RL step's gradient is signal? Gradient agreement of independent rollout batches.

For a training config, rolls out ``--batches`` independent batches (steps 0, 1, ... of the run: each its own prompts
and seeds, ``train.prompts_per_step`` prompts each), scores them and computes the clipped-ratio policy gradient of
each at the starting weights, exactly as the trainer's first update would (no KL term, no gradient clipping, no
optimizer step). ``gradient_agreement`` (``gradient_agreement.py``, beside this script) turns them into rho, the
signal share of one batch's gradient, and the number of batches a gradient needs before its direction is mostly
signal. ``--vs "key=value ..."`` (repeatable) adds a row for the same config with those overrides on top, measured
in the same run, and every row states its rho as a ratio to the first row's. ``--by-module`` also measures rho over
each group of the trained parameters alone, by transformer block and by adapted projection (where in the model the
signal lives, to choose ``model.lora_targets``). ``--toy`` measures the same for ``diffrl toy`` (the 2-D flow model
where RL visibly works) in the same run. Ends with one JSON line.

    python scripts/research/probe_gradient_snr.py [--config configs/tiny_shapes.yaml] [--batches 12] [--toy]
        [--vs "train.objective=nft train.advantage=grpo" ...] [--by-module] [key=value ...]
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: diffrl, rewards
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gradient_agreement.py

from gradient_agreement import gradient_agreement  # noqa: E402

from diffrl import toy  # noqa: E402
from diffrl.config import load_config  # noqa: E402
from diffrl.loss import policy_loss  # noqa: E402
from diffrl.schedule import flow_sigmas  # noqa: E402
from diffrl.tree import TreeSchedule  # noqa: E402


def trainer_gradients(config: str, overrides: list[str],
                      batches: int) -> tuple[torch.Tensor, int, list[tuple[str, int]]]:
    """``[batches, P]`` policy gradients of the config's first update, one per independent batch; samples per batch;
    the (name, size) of each trained parameter tensor in the gradients' order."""
    from diffrl import trainer

    cfg = load_config(config, overrides + ["train.kl_weight=0", "train.max_grad_norm=1e30", "log.tensorboard=false"])
    with TemporaryDirectory() as tmp:
        run = trainer.build(cfg, Path(tmp))
        named = run.adapter.named_trainable_parameters()
        params = [p for _, p in named]
        run.optimizer = torch.optim.SGD(params, lr=0.0)  # gradients only: the weights stay where they start
        grads, samples = [], 0
        for step in range(batches):
            batch = trainer.collect(run, step)
            leaf_r, valid, scores = trainer.score(run, batch)
            trainer.optimize(run, batch, *trainer.advantage(run, batch, leaf_r, valid, step, scores))
            grads.append(torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                                    for p in params]).clone())
            samples = len(batch.images)
    return torch.stack(grads), samples, [(n, p.numel()) for n, p in named]


def module_groups(sizes: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """Gradient coordinates ``{group: indices}`` of each transformer block (``block N``) and each adapted projection
    (``proj NAME``, the module a LoRA pair sits on, over all blocks), from (parameter name, size) in order."""
    groups: dict[str, list[torch.Tensor]] = {}
    start = 0
    for name, size in sizes:
        idx = torch.arange(start, start + size)
        start += size
        parts = name.split(".")
        cut = next((i for i, p in enumerate(parts) if p.startswith("lora_")), len(parts) - 1)
        b = next((i for i, p in enumerate(parts[:cut]) if p.endswith("blocks")), None)
        module = parts[b + 2:cut] if b is not None else parts[1:cut]
        keys = [f"proj {'.'.join(module)}"] + ([f"block {parts[b + 1]}"] if b is not None else [])
        for key in keys:
            groups.setdefault(key, []).append(idx)
    return {k: torch.cat(v) for k, v in sorted(groups.items())}


def toy_gradients(batches: int) -> tuple[torch.Tensor, int]:
    """The same for ``diffrl toy``'s tree GRPO at its defaults (8 trees of 8 leaves per batch)."""
    cfg = toy.ToyConfig()
    policy = copy.deepcopy(toy.pretrain(cfg))
    schedule, sigmas = TreeSchedule(cfg.num_steps, cfg.split_steps), flow_sigmas(cfg.num_steps)
    grads = []
    for b in range(batches):
        seeds = [10**7 + b * cfg.trees + t for t in range(cfg.trees)]
        tr, adv, _, _ = toy.collect(cfg, policy, schedule, sigmas, seeds)
        out = toy.rescore(cfg, policy, tr)
        loss, _ = policy_loss(out.log_prob, tr.log_prob, adv, clip_range=cfg.clip_range, num_elements=2)
        policy.zero_grad()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]).clone())
    return torch.stack(grads), cfg.trees * schedule.num_leaves


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny_shapes.yaml")
    ap.add_argument("--batches", type=int, default=12, help="independent rollout batches (at least 2)")
    ap.add_argument("--toy", action="store_true", help="also measure diffrl toy's tree GRPO")
    ap.add_argument("--vs", action="append", default=[], metavar="OVERRIDES",
                    help="a quoted list of key=value overrides for another row of the same config (repeatable)")
    ap.add_argument("--by-module", action="store_true",
                    help="also rho of each transformer block's and each adapted projection's parameters alone")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args()
    if args.batches < 2:
        sys.exit(f"probe_gradient_snr: --batches must be at least 2 (two batches to compare), got {args.batches}")
    rows = {}
    jobs = []
    for extra in [[]] + [shlex.split(v) for v in args.vs]:
        overrides = args.overrides + extra
        jobs.append((f"{args.config} {' '.join(overrides)}".strip(),
                     lambda o=overrides: trainer_gradients(args.config, o, args.batches)))
    if args.toy:
        jobs.append(("diffrl toy (tree GRPO)", lambda: (*toy_gradients(args.batches), None)))
    print("| run | samples / batch | parameters | rho (jackknife s.e.) | rho / first row's | pairwise cos | "
          "batches for a 45-degree gradient | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    first = None
    for name, job in jobs:
        t0 = time.time()
        grads, samples, sizes = job()
        a = gradient_agreement(grads)
        first = a["rho"] if first is None else first
        ratio = a["rho"] / first if first > 0 else None
        rows[name] = {**a, "batches_for_45deg": a["batches_for_45deg"] if a["rho"] > 0 else None,
                      "rho_vs_first": ratio, "samples_per_batch": samples, "parameters": grads.shape[1],
                      "batches": args.batches, "seconds": round(time.time() - t0, 1)}
        shown = "-" if ratio is None else f"{ratio:.2f}"
        print(f"| {name} | {samples} | {grads.shape[1]} | {a['rho']:+.4f} ({a['rho_se']:.4f}) | {shown} | "
              f"{a['pairwise_cos']:+.4f} | {a['batches_for_45deg']:.0f} | {time.time() - t0:.0f} |", flush=True)
        if args.by_module and sizes is not None:
            rows[name]["by_module"] = by_module(grads, sizes, name)
    print(json.dumps({"rows": rows}))


def by_module(grads: torch.Tensor, sizes: list[tuple[str, int]], name: str) -> dict[str, dict]:
    """rho of each module group's coordinates alone (``module_groups``), printed as a table and returned."""
    out = {}
    print(f"by module, {name}:\n| parameters of | parameters | share of |g|^2 | rho (jackknife s.e.) |\n"
          "|---|---:|---:|---:|")
    total = float(grads.double().square().sum())
    for key, idx in module_groups(sizes).items():
        g = grads[:, idx]
        a = gradient_agreement(g)
        share = float(g.double().square().sum()) / total if total > 0 else 0.0
        out[key] = {"rho": a["rho"], "rho_se": a["rho_se"], "parameters": len(idx), "grad_share": share}
        print(f"| {key} | {len(idx)} | {share:.3f} | {a['rho']:+.4f} ({a['rho_se']:.4f}) |", flush=True)
    return out


if __name__ == "__main__":
    main()
