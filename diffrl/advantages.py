"""Rewards -> advantages (layer L1: pure torch). papers.md part 1 (a) GRPO, (c) BranchGRPO, (g) GDPO / OmniNFT.

Conventions: rewards ``[B]`` float; ``group_ids`` ``[B]`` any integers (one id per prompt); standard deviations
are population stds (``unbiased=False``, as Flow-GRPO's ``np.std``). A group whose rewards are all equal (or
that has one member) gives advantage exactly 0, never NaN.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from diffrl.tree import TreeSchedule

STD_FLOOR = 1e-6
"""A group std below this counts as zero variance: its advantages are 0."""


def _group_stats(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row group mean ``[B]``, population std ``[B]`` and group size ``[B]`` (fp64 sums for accuracy)."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    v = values.double()
    count = torch.zeros(n_groups, dtype=torch.float64, device=v.device).index_add_(0, inverse, torch.ones_like(v))
    total = torch.zeros_like(count).index_add_(0, inverse, v)
    mean = total / count
    sq = torch.zeros_like(count).index_add_(0, inverse, (v - mean[inverse]) ** 2)
    std = torch.sqrt(sq / count)
    return mean[inverse], std[inverse], count[inverse]


def _zscore(values: Tensor, mean: Tensor, std: Tensor, eps: float) -> Tensor:
    adv = (values.double() - mean) / (std + eps)
    return torch.where(std < STD_FLOOR, torch.zeros_like(adv), adv).to(values.dtype)


def group_advantages(
    rewards: Tensor, group_ids: Tensor, *, global_std: bool = False, eps: float = 1e-4, clip: Optional[float] = None,
    valid: Optional[Tensor] = None,
) -> Tensor:
    """Group-relative advantage (GRPO): A_i = (R_i - mean_g(i) R) / (std + eps), like ``rewards``.

    std is the group's (default) or the whole batch's (``global_std``, Flow-GRPO's option). Zero-variance groups
    give 0. ``clip`` bounds |A| (Flow-GRPO clips at 5). ``valid`` ``[B]`` bool: invalid samples (a reward failed)
    are left out of the statistics and get advantage 0.
    """
    if valid is not None:
        out = torch.zeros_like(rewards)
        out[valid] = group_advantages(rewards[valid], group_ids[valid], global_std=global_std, eps=eps, clip=clip)
        return out
    mean, std, _ = _group_stats(rewards, group_ids)
    if global_std:
        std = rewards.double().std(unbiased=False).expand_as(mean) if rewards.numel() > 1 else torch.zeros_like(mean)
    return clip_advantages(_zscore(rewards, mean, std, eps), clip)


def rloo_advantages(rewards: Tensor, group_ids: Tensor, *, clip: Optional[float] = None) -> Tensor:
    """Leave-one-out baseline: A_i = R_i - mean_{j != i, g(j) = g(i)} R_j = n (R_i - mean_g) / (n - 1).

    Groups of one give 0. Not normalised by a std.
    """
    mean, _, count = _group_stats(rewards, group_ids)
    adv = torch.where(count > 1, count * (rewards.double() - mean) / (count - 1).clamp_min(1), 0.0)
    return clip_advantages(adv.to(rewards.dtype), clip)


def clip_advantages(adv: Tensor, clip: Optional[float]) -> Tensor:
    """Clamp advantages to ``[-clip, clip]`` (no-op for None)."""
    return adv if clip is None else adv.clamp(-clip, clip)


def batch_normalize(adv: Tensor, eps: float = 1e-4) -> Tensor:
    """Batch-wise standardisation (GDPO's BN): (A - mean) / (std + eps) over the whole batch; 0 if constant."""
    return _zscore(adv, adv.double().mean().expand_as(adv), adv.double().std(unbiased=False).expand_as(adv), eps)


def _check_rewards(rewards_by_name: Mapping[str, Tensor], weights: Optional[Mapping[str, float]]) -> dict[str, float]:
    if not rewards_by_name:
        raise ValueError("no rewards given")
    weights = dict(weights) if weights is not None else {k: 1.0 for k in rewards_by_name}
    unknown = sorted(set(weights) - set(rewards_by_name))
    missing = sorted(set(rewards_by_name) - set(weights))
    if unknown or missing:
        raise ValueError(f"reward weights do not match the rewards: unknown {unknown}, without a weight {missing}")
    return weights


def gdpo_advantages(
    rewards_by_name: Mapping[str, Tensor],
    group_ids: Tensor,
    weights: Optional[Mapping[str, float]] = None,
    *,
    batch_norm: bool = True,
    eps: float = 1e-4,
    clip: Optional[float] = None,
) -> Tensor:
    """GDPO decoupled multi-reward advantage: A = BN(sum_k w_k z_k), z_k = group z-score of reward k (papers.md (g)).

    rewards_by_name: name -> ``[B]``. weights: name -> float (all 1 when None). ``batch_norm=False`` gives the
    MixGRPO / OmniNFT variant (weighted sum of per-reward advantages, no batch renormalisation). Returns ``[B]``.
    """
    weights = _check_rewards(rewards_by_name, weights)
    total = sum(weights[k] * group_advantages(r, group_ids, eps=eps) for k, r in rewards_by_name.items())
    return clip_advantages(batch_normalize(total, eps) if batch_norm else total, clip)


def summed_reward_advantages(
    rewards_by_name: Mapping[str, Tensor], group_ids: Tensor, weights: Optional[Mapping[str, float]] = None, **kw
) -> Tensor:
    """Plain GRPO on the weighted sum of rewards (Flow-GRPO, DiffusionNFT): group z-score of sum_k w_k R_k."""
    weights = _check_rewards(rewards_by_name, weights)
    return group_advantages(sum(weights[k] * r for k, r in rewards_by_name.items()), group_ids, **kw)


def route_advantages(
    rewards_by_name: Mapping[str, Tensor],
    group_ids: Tensor,
    routing: Mapping[str, Sequence[str]],
    weights: Optional[Mapping[str, float]] = None,
    *,
    batch_norm: bool = False,
    eps: float = 1e-4,
    clip: Optional[float] = None,
) -> dict[str, Tensor]:
    """Modality routing (OmniNFT branch-aware): each modality gets A^m = sum_{k routed to m} w_k z_k.

    routing: reward name -> the modalities it drives, e.g. ``{"aesthetic": ["video"], "av_sync": ["video",
    "audio"]}``. Returns modality -> ``[B]``. Every reward must be routed; a modality named nowhere is absent.
    """
    weights = _check_rewards(rewards_by_name, weights)
    unrouted = sorted(set(rewards_by_name) - set(routing))
    if unrouted:
        raise ValueError(f"rewards {unrouted} are not routed to any modality; add them to the routing")
    z = {k: group_advantages(r, group_ids, eps=eps) for k, r in rewards_by_name.items()}
    out: dict[str, Tensor] = {}
    for name, modalities in routing.items():
        if name not in rewards_by_name:
            raise ValueError(f"routing names reward {name!r}, which is not among {sorted(rewards_by_name)}")
        for m in modalities:
            out[m] = out.get(m, 0) + weights[name] * z[name]
    return {m: clip_advantages(batch_normalize(a, eps) if batch_norm else a, clip) for m, a in out.items()}


def tree_node_values(
    leaf_rewards: Tensor, schedule: TreeSchedule, *, fusion: str = "mean", edge_log_probs: Optional[Tensor] = None,
    alpha: float = 1.0,
) -> Tensor:
    """Reward of every node of ``T`` trees from their leaves' rewards (BranchGRPO reward fusion, papers.md (c)).

    leaf_rewards: ``[T, L]``. fusion ``mean``: R(n) = mean of the rewards of n's leaves. fusion ``prob``:
    R(n) = sum_c softmax_c(alpha log pi(c | n)) R(c) over n's children, where ``edge_log_probs`` ``[T, N]`` holds
    each node's log-prob given its parent. Returns ``[T, N]``.
    """
    n_trees = leaf_rewards.shape[0]
    if fusion == "mean":
        m = schedule.leaf_matrix.to(leaf_rewards.device, leaf_rewards.dtype)
        return (leaf_rewards @ m.T) / m.sum(dim=1)
    if fusion != "prob":
        raise ValueError(f"reward fusion must be 'mean' or 'prob', got {fusion!r}")
    if edge_log_probs is None:
        raise ValueError("fusion='prob' needs edge_log_probs [trees, nodes]")
    values = leaf_rewards.new_zeros(n_trees, schedule.num_nodes)
    values[:, schedule.leaves] = leaf_rewards
    for k in reversed(range(schedule.num_steps)):
        kids, b = schedule.step_children[k], schedule.branch[k]
        logits = (alpha * edge_log_probs[:, kids].to(values.dtype)).reshape(n_trees, -1, b)
        fused = (torch.softmax(logits, dim=-1) * values[:, kids].reshape(n_trees, -1, b)).sum(-1)
        values[:, schedule.step_nodes[k]] = fused
    return values


def depthwise_advantages(
    node_values: Tensor, schedule: TreeSchedule, tree_groups: Optional[Tensor] = None, eps: float = 1e-8,
    valid: Optional[Tensor] = None,
) -> Tensor:
    """Depth-wise advantage of every node (BranchGRPO (c)): z-score of R(n) among the nodes of the same depth.

    node_values: ``[T, N]``. tree_groups: ``[T]`` ids; trees with the same id (e.g. several trees of one prompt)
    are normalised together per depth (default: each tree alone). A depth with one node, or with std < 1e-6,
    gives 0. valid: ``[T, N]`` bool, the nodes that take part (e.g. those above a regenerated or valid leaf); the
    others get 0 and move no statistic. Returns ``[T, N]``; the edge parent -> child trains with the child's
    advantage.
    """
    n_trees, n_nodes = node_values.shape
    groups = torch.arange(n_trees) if tree_groups is None else tree_groups.cpu()
    depth = schedule.depth
    keys = (groups.repeat_interleave(n_nodes) * (schedule.num_steps + 1) + depth.repeat(n_trees)).to(node_values.device)
    values = node_values.flatten()
    if valid is None:
        mean, std, _ = _group_stats(values, keys)
        return _zscore(values, mean, std, eps).reshape(n_trees, n_nodes)
    v = valid.flatten().to(values.device)
    out = torch.zeros_like(values)
    mean, std, _ = _group_stats(values[v], keys[v])
    out[v] = _zscore(values[v], mean, std, eps)
    return out.reshape(n_trees, n_nodes)


ESTIMATORS: dict[str, Callable[..., Tensor]] = {"grpo": group_advantages, "rloo": rloo_advantages}
MULTI_REWARD: dict[str, Callable[..., Tensor]] = {"gdpo": gdpo_advantages, "sum": summed_reward_advantages}
