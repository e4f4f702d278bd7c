"""The optimize phase of the RL loop: clipped-ratio updates of the SDE transitions (Flow-GRPO, BranchGRPO; with
modality routing, OmniNFT) or DiffusionNFT's forward-process updates of the leaves, and the EMA of the trained
weights. Every loss comes from ``diffrl.loss``; this module only batches the model calls and steps the optimizer."""
from __future__ import annotations

import math
from typing import Callable, Optional, Protocol, Union

import torch
from torch import Tensor

from diffrl.config import SamplerConfig
from diffrl.distributed import average_gradients, max_over_processes
from diffrl.finite import NonFiniteError, check_finite
from diffrl.fsdp import local_part
from diffrl.loss import awm_loss, kl_convention_scale, nft_loss, policy_loss
from diffrl.sde import append_dims, gaussian_log_prob, sde_step
from diffrl.seeding import mix_seed
from diffrl.state import Batch, Run, Swap, TrainState

STATS = ("kl", "clip_frac", "approx_kl", "ratio_mean", "ratio_dev", "policy_loss", "old_dev")
"""Every statistic ``optimize`` may return (the clipped-ratio path's and DiffusionNFT's)."""


def _step_groups(tr, mask: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Trained edges of step ``k``, the distinct parents they come from (rollout order), and edge -> parent."""
    e = (mask & (tr.step == k)).nonzero().flatten()
    keys = tr.tree[e] * (int(tr.parent.max()) + 1) + tr.parent[e]
    uniq, inverse = torch.unique(keys, return_inverse=True)
    first = torch.zeros(len(uniq), dtype=torch.long, device=e.device).scatter_reduce_(
        0, inverse, torch.arange(len(e), device=e.device), "amin", include_self=False)
    return e, e[first], inverse


def lr_at(step: int, lr: float, schedule: str, steps: int, warmup_steps: int = 0) -> float:
    """The learning rate of RL step ``step`` (0-based) of ``steps``; every optimizer step inside it (inner epochs,
    updates per epoch) uses this rate.

    Warm-up: lr (step + 1) / (warmup_steps + 1) for step < warmup_steps. After it, with u = (step - warmup_steps) /
    (steps - warmup_steps) in [0, 1): constant lr; cosine lr (1 + cos(pi u)) / 2; linear lr (1 - u).
    """
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    u = (step - warmup_steps) / max(steps - warmup_steps, 1)
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * u))
    if schedule == "linear":
        return lr * (1 - u)
    if schedule == "constant":
        return lr
    raise ValueError(f"unknown lr schedule {schedule!r}: use constant, cosine or linear")


def set_lr(run: Run, step: int) -> float:
    """Set every parameter group's learning rate for step ``step`` from ``train``'s schedule; returns it."""
    t = run.cfg.train
    lr = lr_at(step, t.lr, t.lr_schedule, t.steps, t.warmup_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    return lr


class Objective(Protocol):
    """A training objective, the seam new objectives enter through (register one in ``OBJECTIVES``).

    ``per_leaf``: its advantages are per leaf (``[trees, leaves]`` of this process's trees, with the valid leaves as
    the mask: forward-process objectives, which need no log-probs) rather than per edge (``[E]``, or one ``[E]`` per
    latent stream, with the trained edges as the mask). ``update`` takes the step's optimizer steps and returns
    statistics named in ``STATS``."""

    per_leaf: bool

    def update(self, run: Run, batch: Batch, adv: Union[Tensor, dict[str, Tensor]], mask: Tensor,
               step: int) -> dict[str, float]: ...


class ClippedRatio:
    """PPO's clipped ratio on the SDE transitions (Flow-GRPO, BranchGRPO; per stream with modality routing)."""

    per_leaf = False

    def update(self, run: Run, batch: Batch, adv: Union[Tensor, dict[str, Tensor]], mask: Tensor,
               step: int) -> dict[str, float]:
        return optimize_ppo(run, batch, adv, mask)


class ForwardProcess:
    """An objective on the leaves' clean latents noised by the forward process (``forward_updates``), with its
    per-chunk loss: DiffusionNFT (``nft_chunk_loss``) or AWM (``awm_chunk_loss``)."""

    per_leaf = True

    def __init__(self, chunk_loss: Callable):
        self.chunk_loss = chunk_loss

    def update(self, run: Run, batch: Batch, adv: Tensor, mask: Tensor, step: int) -> dict[str, float]:
        return forward_updates(run, batch, adv, mask, step, self.chunk_loss)


def objective(name: str) -> Objective:
    """The objective registered as ``name`` (``train.objective``)."""
    return OBJECTIVES[name]


def optimize(run: Run, batch: Batch, adv: Union[Tensor, dict[str, Tensor]], mask: Tensor,
             step: int = 0) -> dict[str, float]:
    """The update of ``train.objective`` (see ``OBJECTIVES``)."""
    return objective(run.cfg.train.objective).update(run, batch, adv, mask, step)


def optimize_ppo(run: Run, batch: Batch, adv: Union[Tensor, dict[str, Tensor]], mask: Tensor) -> dict[str, float]:
    """Clipped-ratio updates on the trained edges. Each inner epoch splits the step's trees into
    ``train.updates_per_epoch`` groups and takes one optimizer step per group (gradients accumulate over the group's
    edges, step by step, in minibatches). Each parent's velocity is computed once and in the rollout's batches, so
    before the first update the ratio is exactly 1 (with several groups, the first group's batches are smaller than
    the rollout's: 1 up to float rounding); the statistics are those of the first epoch. A process with no edges
    to train still takes part in every update (its gradients count as zeros), so processes never wait on each
    other."""
    cfg, tr, ad = run.cfg, batch.rollout.transitions, run.adapter
    cond_all = ad.encode(batch.prompts)
    n_elem, dev = math.prod(ad.latent_shape), tr.tree.device
    groups = torch.arange(len(batch.prompts), device=dev).tensor_split(
        min(cfg.train.updates_per_epoch, len(batch.prompts)))
    stats_sum: dict[str, float] = {}
    for epoch in range(cfg.train.inner_epochs):
        for u, trees in enumerate(groups):
            part = mask & torch.isin(tr.tree, trees)
            total = int(part.sum())
            run.optimizer.zero_grad(set_to_none=True)
            calls = []
            for k in sorted(set(tr.step[part].tolist())):
                e, parents, inverse = _step_groups(tr, part, k)
                for chunk in torch.arange(len(parents), device=dev).split(run.minibatch):
                    sel = torch.isin(inverse, chunk)
                    calls.append((e[sel], parents[chunk], inverse[sel] - chunk[0]))
            for edges, parents, parent_of in calls:
                stats = _edge_loss(run, tr, adv, edges, parents, parent_of, cond_all, n_elem, len(edges) / total)
                ratio_dev = stats.pop("ratio_dev")
                if epoch == 0:
                    if u == 0:
                        stats_sum["ratio_dev"] = max(stats_sum.get("ratio_dev", 0.0), ratio_dev)
                    for name, v in stats.items():
                        stats_sum[name] = stats_sum.get(name, 0.0) + v * len(edges) / int(mask.sum())
            one = torch.zeros(1, dtype=torch.long, device=dev)
            for _ in range(len(calls), _most_calls(run, len(calls))):  # FSDP: join the others' collectives
                _edge_loss(run, tr, adv, one, one, one, cond_all, n_elem, 0.0)
            _apply_update(run)
    return stats_sum


def _most_calls(run: Run, n: int) -> int:
    """Sharded (FSDP), every forward and backward is a collective, so every process makes as many as the busiest
    one: the largest ``n`` over the processes (``n`` itself unsharded)."""
    return max_over_processes(n) if run.adapter.sharded else n


def _apply_update(run: Run) -> None:
    """One optimizer step on the accumulated gradients: averaged over processes, then clipped. A non-finite gradient
    norm stops the run before the step; non-finite weights after it stop the run too (``diffrl.finite``; every
    process sees the same norm, and sharded weights are judged over all processes)."""
    params = run.adapter.trainable_parameters()
    if not run.adapter.sharded:  # FSDP averaged the gradients in each backward already
        average_gradients(params)
    check_finite("the gradient norm", torch.nn.utils.clip_grad_norm_(params, run.cfg.train.max_grad_norm))
    run.optimizer.step()
    bad = next((i for i, p in enumerate(params) if not bool(torch.isfinite(local_part(p.detach())).all())), -1)
    if run.adapter.sharded:
        bad = max_over_processes(bad)
    if bad >= 0:
        raise NonFiniteError("the trained weights", f"hold non-finite values after the update (tensor {bad})")


def _edge_loss(run: Run, tr, adv: Union[Tensor, dict[str, Tensor]], edges: Tensor, parents: Tensor, parent_of: Tensor,
               cond_all: dict, n_elem: int, weight: float) -> dict[str, float]:
    """Loss of some edges of one step and its backward, weighted (by their share of all trained edges; 0 for a
    process that only joins the others' collectives)."""
    cfg, ad, s = run.cfg, run.adapter, run.cfg.sampler
    cond = {key: v[tr.tree[parents]] for key, v in cond_all.items()}
    v = ad.velocity(tr.x[parents], tr.sigma[parents], cond, s.guidance_scale)[parent_of]
    kw = dict(kind=s.kind, noise_level=s.noise_level, noise_scale=tr.noise_scale[edges])
    out = sde_step(tr.x[edges], v, tr.sigma[edges], tr.sigma_next[edges], x_next=tr.x_next[edges], **kw)
    ref_mean = None
    if cfg.train.kl_weight > 0:
        with torch.no_grad(), ad.reference():
            v_ref = ad.velocity(tr.x[parents], tr.sigma[parents], cond, s.guidance_scale)[parent_of]
            ref_mean = sde_step(tr.x[edges], v_ref, tr.sigma[edges], tr.sigma_next[edges], x_next=tr.x_next[edges],
                                **kw).mean
    if isinstance(adv, dict):
        return _stream_losses(run, tr, adv, edges, out.mean, ref_mean, n_elem, weight)
    loss, stats = policy_loss(out.log_prob, tr.log_prob[edges], adv[edges], clip_range=cfg.train.clip_range,
                              num_elements=n_elem, kl_weight=cfg.train.kl_weight, mean=out.mean, ref_mean=ref_mean,
                              std=tr.std[edges], kl_scale=_kl_scale(run, tr, edges), **_ratio_norm(run, tr, edges))
    (loss * weight).backward()
    return _loss_stats([(1.0, stats)])


def _kl_scale(run: Run, tr, edges: Tensor) -> Optional[Tensor]:
    """The edges' factor on the exact KL for ``train.kl_convention`` (``loss.kl_convention_scale``)."""
    return kl_convention_scale(tr.sigma[edges], tr.sigma_next[edges], run.cfg.train.kl_convention)


def _ratio_norm(run: Run, tr, edges: Tensor, old_mean: Optional[Tensor] = None) -> dict:
    """``policy_loss``'s GRPO-Guard options for these edges (all of one step) when ``train.ratio_norm``: RatioNorm
    against the rollout-time kernel mean (``old_mean``, default the edges' whole ``tr.mean``; a stream passes its
    slice), and the surrogate re-weighted by 1 / |dt| of the step; none otherwise."""
    if not run.cfg.train.ratio_norm:
        return {}
    dt = float(tr.sigma[edges[0]] - tr.sigma_next[edges[0]])
    return {"ratio_norm": True, "old_mean": tr.mean[edges] if old_mean is None else old_mean,
            "policy_scale": 1.0 / max(dt, 1e-12)}


def _stream_losses(run: Run, tr, adv: dict[str, Tensor], edges: Tensor, mean: Tensor, ref_mean: Optional[Tensor],
                   n_elem: int, weight: float) -> dict[str, float]:
    """Modality routing (OmniNFT): each stream's log-prob over its own elements, the clipped-ratio loss with that
    stream's advantage, weighted by its share D_m / D of the latent. The rollout-time log-prob of a stream is
    recomputed from the stored fp32 mean, so the ratio is exactly 1 before the first update. A stream with no
    routed reward is not trained."""
    cfg, parts, loss = run.cfg, [], 0.0
    x_next, old_mean, std = tr.x_next[edges].flatten(1), tr.mean[edges].flatten(1), tr.std[edges]
    mean = mean.flatten(1)
    for name, sl in run.adapter.streams.items():
        if name not in adv:
            continue
        d = sl.stop - sl.start
        new_lp = gaussian_log_prob(x_next[:, sl], mean[:, sl], std)
        old_lp = gaussian_log_prob(x_next[:, sl], old_mean[:, sl], std)
        ref = None if ref_mean is None else ref_mean.flatten(1)[:, sl]
        norm = _ratio_norm(run, tr, edges, old_mean[:, sl])
        l_m, st = policy_loss(new_lp, old_lp, adv[name][edges], clip_range=cfg.train.clip_range, num_elements=d,
                              kl_weight=cfg.train.kl_weight, mean=mean[:, sl], ref_mean=ref, std=std,
                              kl_scale=_kl_scale(run, tr, edges), **norm)
        loss = loss + l_m * d / n_elem
        parts.append((d / n_elem, st))
    (loss * weight).backward()
    return _loss_stats(parts)


def _loss_stats(parts: list) -> dict[str, float]:
    """The metrics of one minibatch's loss: ``(weight, LossStats)`` per stream, weighted sums (the ratio's extremes
    over all streams)."""
    w = sum(p[0] for p in parts)
    avg = lambda name: sum(p[0] * getattr(p[1], name) for p in parts) / w  # noqa: E731
    dev = max(max(p[1].ratio_max - 1, 1 - p[1].ratio_min) for p in parts)
    return {"kl": avg("kl"), "clip_frac": avg("clip_frac"), "approx_kl": avg("approx_kl"),
            "ratio_mean": avg("ratio_mean"), "ratio_dev": dev, "policy_loss": avg("policy_loss")}


def levels_per_leaf(sampler: SamplerConfig) -> int:
    """How many noise levels each leaf is trained at by the forward-process objectives:
    ``round(sampler.timestep_fraction * sampler.num_steps)``, at least 1."""
    return max(1, round(sampler.timestep_fraction * sampler.num_steps))


def nft_points(run: Run, batch: Batch, mask: Tensor, step: int) -> tuple[Tensor, Tensor, Tensor]:
    """Forward-process training points of this process's valid leaves: each leaf is noised at ``levels_per_leaf``
    distinct noise levels of the rollout schedule. Seeded by (seed, step, global leaf index) on the CPU, so N
    processes, and any device, draw what one process would. Returns local leaf indices ``[P]``, sigmas ``[P]`` and
    noises ``[P, ...]`` on the rollout's device."""
    cfg, s = run.cfg, run.cfg.sampler
    k = levels_per_leaf(s)
    leaves_per_tree = mask.shape[1]
    idx, sig, eps = [], [], []
    for i in mask.flatten().nonzero().flatten().tolist():
        g = torch.Generator().manual_seed(mix_seed(cfg.train.seed, step, 7, batch.first_tree * leaves_per_tree + i))
        idx.append(torch.full((k,), i))
        sig.append(run.sigmas[torch.randperm(s.num_steps, generator=g)[:k]].float())
        eps.append(torch.randn(k, *run.adapter.latent_shape, generator=g))
    dev = batch.rollout.leaves.device
    if not idx:
        return (torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, device=dev),
                torch.zeros(0, *run.adapter.latent_shape, device=dev))
    return torch.cat(idx).to(dev), torch.cat(sig).to(dev), torch.cat(eps).to(dev)


def forward_updates(run: Run, batch: Batch, adv: Tensor, mask: Tensor, step: int,
                    chunk_loss: Callable) -> dict[str, float]:
    """Forward-process updates (DiffusionNFT, AWM) on the leaves' clean latents, noised at ``nft_points``.

    ``chunk_loss(run, points, x0_all, cond_all, adv, leaves, snapshot, on_policy, share)`` computes one chunk's loss,
    runs its backward and returns its statistics. The sampling policy is the LoRA as it was at rollout time
    (``snapshot`` when a step takes several optimizer steps; ``on_policy`` in the first). Updates are grouped by
    tree like the clipped-ratio path (``train.updates_per_epoch``), points go through the model ``Run.minibatch`` at
    a time, and a process with no points still joins every update."""
    cfg, ad = run.cfg, run.adapter
    leaves = mask.shape[1]
    leaf, sigma, eps = nft_points(run, batch, mask, step)
    x0_all = batch.rollout.leaves.flatten(0, 1)
    cond_all = ad.encode(batch.prompts)
    snapshot = ad.trained_state_dict() if cfg.train.inner_epochs * cfg.train.updates_per_epoch > 1 else None
    groups = torch.arange(mask.shape[0], device=leaf.device).tensor_split(
        min(cfg.train.updates_per_epoch, mask.shape[0]))
    stats_sum: dict[str, float] = {}
    for epoch in range(cfg.train.inner_epochs):
        for u, trees in enumerate(groups):
            points = torch.isin(leaf // leaves, trees).nonzero().flatten()
            run.optimizer.zero_grad(set_to_none=True)
            chunks = points.split(run.minibatch)
            on_policy = epoch == 0 and u == 0
            for chunk in chunks:
                pts = (leaf[chunk], sigma[chunk], eps[chunk])
                st = chunk_loss(run, pts, x0_all, cond_all, adv, leaves, snapshot, on_policy, (len(chunk), len(points)))
                if epoch == 0:
                    for name, value in st.items():
                        stats_sum[name] = stats_sum.get(name, 0.0) + value * len(chunk) / len(leaf)
            dummy = (torch.zeros(1, dtype=torch.long, device=leaf.device), run.sigmas[:1].to(leaf.device),
                     torch.zeros(1, *ad.latent_shape, device=leaf.device))
            for _ in range(len(chunks), _most_calls(run, len(chunks))):  # FSDP: join the others' collectives
                chunk_loss(run, dummy, x0_all, cond_all, adv, leaves, snapshot, on_policy, (0, 1))
            _apply_update(run)
    return stats_sum


def _forward_inputs(run: Run, points: tuple[Tensor, Tensor, Tensor], x0_all: Tensor, cond_all: dict,
                    leaves: int) -> tuple[Tensor, Tensor, Tensor, dict, Tensor]:
    """One chunk's clean latents ``x0`` (fp32), noised ``x_t = (1 - sigma) x0 + sigma eps`` (fp32), the model's input
    (``x_t`` in the latents' dtype), the prompts' conditioning and the sigmas."""
    li, sg, noise = points
    x0 = x0_all[li].float()
    s_b = append_dims(sg, x0.ndim)
    x_t = (1 - s_b) * x0 + s_b * noise
    cond = {key: v[li // leaves] for key, v in cond_all.items()}
    return x0, x_t, x_t.to(x0_all.dtype), cond, sg


def _reference_velocity(run: Run, x_in: Tensor, sg: Tensor, cond: dict) -> Optional[Tensor]:
    """The reference's (adapters off) velocity when ``train.kl_weight > 0``, else None."""
    if run.cfg.train.kl_weight <= 0:
        return None
    with torch.no_grad(), run.adapter.reference():
        return run.adapter.velocity(x_in, sg, cond, run.cfg.sampler.guidance_scale)


def nft_chunk_loss(run: Run, points: tuple[Tensor, Tensor, Tensor], x0_all: Tensor, cond_all: dict, adv: Tensor,
                   leaves: int, snapshot: Optional[dict], on_policy: bool, share: tuple[int, int]) -> dict[str, float]:
    """DiffusionNFT's loss on some training points (local leaf indices ``[P]``, sigmas ``[P]``, noises ``[P, ...]``)
    and its backward, weighted by their share ``(points, points in the update)`` (``(0, 1)`` for a process that only
    joins the others' collectives; multiplied then divided, as the release did, so runs reproduce bit for bit);
    returns the loss statistics."""
    cfg, ad, s = run.cfg, run.adapter, run.cfg.sampler
    x0, x_t, x_in, cond, sg = _forward_inputs(run, points, x0_all, cond_all, leaves)
    if not on_policy:  # before the graph of v is built: the swap writes the LoRA weights in place
        with torch.no_grad(), Swap(ad, snapshot):
            v_old = ad.velocity(x_in, sg, cond, s.guidance_scale)
    v = ad.velocity(x_in, sg, cond, s.guidance_scale)
    if on_policy:
        v_old = v.detach()
    v_ref = _reference_velocity(run, x_in, sg, cond)
    loss, st = nft_loss(v, v_old, x_t, x0, sg, adv.flatten()[points[0]], beta=cfg.train.nft_beta,
                        adv_max=cfg.train.adv_clip, kl_weight=cfg.train.kl_weight, v_ref=v_ref)
    (loss * share[0] / share[1]).backward()
    return {name: getattr(st, name) for name in ("kl", "clip_frac", "old_dev", "policy_loss")}


def awm_chunk_loss(run: Run, points: tuple[Tensor, Tensor, Tensor], x0_all: Tensor, cond_all: dict, adv: Tensor,
                   leaves: int, snapshot: Optional[dict], on_policy: bool, share: tuple[int, int]) -> dict[str, float]:
    """AWM's loss (``awm_loss`` with ``train.awm_weighting``) on some training points and its backward, weighted by
    their share like ``nft_chunk_loss``. AWM needs no sampling-policy velocity (``snapshot``, ``on_policy`` unused)."""
    cfg, ad = run.cfg, run.adapter
    x0, _, x_in, cond, sg = _forward_inputs(run, points, x0_all, cond_all, leaves)
    v = ad.velocity(x_in, sg, cond, cfg.sampler.guidance_scale)
    v_ref = _reference_velocity(run, x_in, sg, cond)
    loss, st = awm_loss(v, points[2], x0, sg, adv.flatten()[points[0]], adv_max=cfg.train.adv_clip,
                        weighting=cfg.train.awm_weighting, kl_weight=cfg.train.kl_weight, v_ref=v_ref)
    (loss * share[0] / share[1]).backward()
    return {name: getattr(st, name) for name in ("kl", "clip_frac", "policy_loss")}


OBJECTIVES: dict[str, Objective] = {"ppo": ClippedRatio(), "nft": ForwardProcess(nft_chunk_loss),
                                    "awm": ForwardProcess(awm_chunk_loss)}
"""``train.objective`` -> its objective: ``ppo`` (clipped ratio on SDE transitions), ``nft`` (DiffusionNFT) and
``awm`` (Advantage Weighted Matching). Register a new one here."""


def ema_update(run: Run, state: TrainState) -> None:
    """EMA of the LoRA weights (used for evaluation and export) when ``train.ema_decay > 0``."""
    decay = run.cfg.train.ema_decay
    if decay <= 0:
        return
    current = run.adapter.trained_state_dict()
    if state.ema is None:
        state.ema = current
    else:
        for k, v in current.items():
            state.ema[k].lerp_(v, 1 - decay)
