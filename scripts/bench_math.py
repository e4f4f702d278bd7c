"""Benchmark: how much does diffrl's pure-torch math cost next to a (tiny) model's forward passes?

Rolls out a 16-leaf, 20-step BranchGRPO tree (``TreeSchedule(20, [0, 3, 6, 9])``, branch 2, nfe 203 per tree)
through randomly initialised diffusers ``SD3Transformer2DModel``s on the CPU, at two sizes: ``tiny-shapes`` (the size
of the embedded shapes model: 6 layers, 4 heads x 32, patch 4, a [3, 32, 32] latent) and
``fast-test`` (diffusers' fast-test scale: 1 layer, 4 heads x 8, patch 2, a [4, 32, 32] latent; the smallest SD3
that runs, so the harshest ratio). It times (median over ``--repeats``, ``time.perf_counter``):

  model forward      sum of the velocity calls made by ``tree_rollout`` (timer wrapped around the model);
  rollout overhead   ``tree_rollout`` wall time minus model forward: tree bookkeeping, cond indexing, SDE steps,
                     noise generation and edge records;
  advantages         ``tree_node_values`` (mean and prob fusion) + ``depthwise_advantages`` + the per-edge gather;
  loss               ``policy_loss`` (kl_weight > 0) forward and backward over all ``trained_edges``, on detached
                     leaf log-probs / means with requires_grad (the model is not in the graph; setup untimed).

Prints a markdown table and a final JSON line. Run: ``python scripts/bench_math.py [--trees N] [--repeats N]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch
from diffusers import SD3Transformer2DModel
from torch import Tensor

from diffrl.advantages import depthwise_advantages, tree_node_values
from diffrl.loss import policy_loss
from diffrl.rollout import trained_edges, tree_rollout
from diffrl.schedule import flow_sigmas
from diffrl.tree import TreeSchedule
from diffrl.types import TreeRollout

TEXT_LEN, TEXT_DIM, POOLED_DIM = 8, 32, 64
MODELS = {
    "tiny-shapes": dict(latent=(3, 32, 32), patch_size=4, num_layers=6, attention_head_dim=32, qk_norm="rms_norm"),
    "fast-test": dict(latent=(4, 32, 32), patch_size=2, num_layers=1, attention_head_dim=8, qk_norm=None),
}


def tiny_sd3(name: str) -> SD3Transformer2DModel:
    """A random-init SD3 transformer of one of ``MODELS``."""
    spec = MODELS[name]
    channels = spec["latent"][0]
    return SD3Transformer2DModel(
        sample_size=spec["latent"][1], patch_size=spec["patch_size"], in_channels=channels, out_channels=channels,
        num_layers=spec["num_layers"], attention_head_dim=spec["attention_head_dim"], num_attention_heads=4,
        joint_attention_dim=TEXT_DIM, caption_projection_dim=4 * spec["attention_head_dim"],
        pooled_projection_dim=POOLED_DIM, pos_embed_max_size=64, qk_norm=spec["qk_norm"],
    ).eval()


class TimedVelocity:
    """``velocity(x, sigma, cond) -> v`` around the model (timestep = sigma * 1000, as SD3); accumulates call time."""

    def __init__(self, model: SD3Transformer2DModel) -> None:
        self.model, self.seconds, self.calls = model, 0.0, 0

    def __call__(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        t0 = time.perf_counter()
        v = self.model(hidden_states=x, encoder_hidden_states=cond["text"], pooled_projections=cond["pooled"],
                       timestep=sigma * 1000, return_dict=False)[0]
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return v


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def advantages_step(ro: TreeRollout, sched: TreeSchedule, rewards: Tensor) -> Tensor:
    """Node values (both fusions) and depth-wise advantages; returns the per-edge advantage of the prob fusion."""
    tr = ro.transitions
    edge_lp = rewards.new_zeros(rewards.shape[0], sched.num_nodes)
    edge_lp[tr.tree, tr.child] = tr.log_prob
    depthwise_advantages(tree_node_values(rewards, sched, fusion="mean"), sched)
    adv = depthwise_advantages(tree_node_values(rewards, sched, fusion="prob", edge_log_probs=edge_lp), sched)
    return adv[tr.tree, tr.child]


def loss_inputs(ro: TreeRollout, edge_adv: Tensor) -> dict[str, Tensor]:
    """The trained edges' tensors as detached leaves (log_prob, mean with requires_grad): no model in the graph."""
    tr = ro.transitions
    m = trained_edges(tr)
    return dict(log_prob=(tr.log_prob[m] + 1e-3 * torch.randn(int(m.sum()))).requires_grad_(True),
                old_log_prob=tr.log_prob[m], advantages=edge_adv[m], mean=tr.mean[m].clone().requires_grad_(True),
                ref_mean=tr.mean[m] + 1e-3 * torch.randn_like(tr.mean[m]), std=tr.std[m])


def loss_step(inputs: dict[str, Tensor], num_elements: int) -> float:
    """policy_loss with KL (forward + stats) and its backward."""
    loss, stats = policy_loss(**inputs, clip_range=1e-2, num_elements=num_elements, kl_weight=0.04)
    loss.backward()
    return stats.policy_loss


def bench_model(name: str, trees: int, repeats: int) -> dict:
    """Time one model size; returns the medians in ms and the math fraction."""
    latent = MODELS[name]["latent"]
    sched, sigmas = TreeSchedule(20, [0, 3, 6, 9], 2), flow_sigmas(20, shift=3.0)
    vel = TimedVelocity(tiny_sd3(name))
    cond = {"text": torch.randn(trees, TEXT_LEN, TEXT_DIM), "pooled": torch.randn(trees, POOLED_DIM)}
    rows: dict[str, list[float]] = {"model": [], "overhead": [], "adv": [], "loss": []}
    # timed() calls each lambda at once, in the iteration that defines it: no late binding (B023).
    for rep in range(repeats + 1):  # repetition 0 is a warm-up (allocator, leaf_matrix cache), not recorded
        vel.seconds = 0.0
        seeds = [1000 * rep + t for t in range(trees)]
        with torch.no_grad():
            t_roll, ro = timed(lambda: tree_rollout(vel, sched, sigmas, seeds, latent, cond=cond))  # noqa: B023
        rewards = torch.randn(trees, sched.num_leaves)
        with torch.no_grad():
            t_adv, edge_adv = timed(lambda: advantages_step(ro, sched, rewards))  # noqa: B023
        inputs = loss_inputs(ro, edge_adv)
        t_loss, _ = timed(lambda: loss_step(inputs, ro.transitions.x[0].numel()))  # noqa: B023
        if rep:
            for k, v in zip(rows, (vel.seconds, t_roll - vel.seconds, t_adv, t_loss)):
                rows[k].append(1e3 * v)
    med = {k: statistics.median(v) for k, v in rows.items()}
    math_ms = med["overhead"] + med["adv"] + med["loss"]
    print(f"\n### {name}: latent {list(latent)}, {sched!r}, trees={trees}, nfe={ro.nfe}\n")
    print("| component | ms | % of model forward |\n|---|---:|---:|")
    table = [("model forward (sum of velocity calls)", med["model"]),
             ("rollout overhead (bookkeeping + SDE steps + noise)", med["overhead"]),
             ("advantages (node values x2 + depth-wise)", med["adv"]),
             ("loss (policy_loss + KL, fwd + bwd)", med["loss"]), ("**math total**", math_ms)]
    for label, ms in table:
        print(f"| {label} | {ms:.2f} | {100 * ms / med['model']:.2f}% |")
    return {"model_forward_ms": round(med["model"], 3), "rollout_overhead_ms": round(med["overhead"], 3),
            "advantages_ms": round(med["adv"], 3), "loss_ms": round(med["loss"], 3),
            "math_total_ms": round(math_ms, 3), "math_fraction": round(math_ms / med["model"], 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", type=int, default=1, help="trees rolled out together (one prompt each)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch intra-op threads")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    results = {name: bench_model(name, args.trees, args.repeats) for name in args.models}
    print(json.dumps({
        **results[args.models[0]], "models": results, "leaves": 16 * args.trees, "nfe": 203 * args.trees,
        "machine": f"{platform.processor() or platform.machine()} / {os.cpu_count()} cpus",
        "torch": torch.__version__, "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
