"""Rewards -> advantages (layer L1: pure torch). GRPO as in Flow-GRPO (arXiv 2505.05470), BranchGRPO
(arXiv 2509.06040), GDPO (arXiv 2601.05242) / OmniNFT (arXiv 2605.12480).

Conventions: rewards ``[B]`` float; ``group_ids`` ``[B]`` any integers (one id per prompt); standard deviations
are population stds (``unbiased=False``, as Flow-GRPO's ``np.std``). A group whose rewards are all equal (or
that has one member) gives advantage exactly 0, never NaN.
"""
from __future__ import annotations

from dataclasses import dataclass
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


def rloo_advantages(rewards: Tensor, group_ids: Tensor, *, clip: Optional[float] = None,
                    valid: Optional[Tensor] = None) -> Tensor:
    """Leave-one-out baseline: A_i = R_i - mean_{j != i, g(j) = g(i)} R_j = n (R_i - mean_g) / (n - 1).

    Groups of one give 0. Not normalised by a std. ``valid`` ``[B]`` bool as in ``group_advantages``.
    """
    if valid is not None:
        out = torch.zeros_like(rewards)
        out[valid] = rloo_advantages(rewards[valid], group_ids[valid], clip=clip)
        return out
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
    """GDPO (arXiv 2601.05242) decoupled multi-reward advantage: A = BN(sum_k w_k z_k), z_k = group z-score of reward k.

    rewards_by_name: name -> ``[B]``. weights: name -> float (all 1 when None). ``batch_norm=False`` gives the
    MixGRPO / OmniNFT variant (weighted sum of per-reward advantages, no batch renormalisation). Returns ``[B]``.
    """
    weights = _check_rewards(rewards_by_name, weights)
    total = sum(weights[k] * group_advantages(r, group_ids, eps=eps) for k, r in rewards_by_name.items())
    return clip_advantages(batch_normalize(total, eps) if batch_norm else total, clip)


def tree_node_values(
    leaf_rewards: Tensor, schedule: TreeSchedule, *, fusion: str = "mean", edge_log_probs: Optional[Tensor] = None,
    alpha: float = 1.0,
) -> Tensor:
    """Reward of every node of ``T`` trees from their leaves' rewards (BranchGRPO reward fusion, arXiv 2509.06040).

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


def fill_invalid(values: Tensor, valid: Tensor, group_ids: Tensor) -> Tensor:
    """Invalid entries take their group's mean valid value (0 for a group with none), so they move no group
    statistic. values, valid (bool), group_ids: the same shape, e.g. ``[T, L]``."""
    n = int(group_ids.max()) + 1
    means = torch.zeros(n, device=values.device).index_add_(0, group_ids[valid], values[valid].float())
    ones = torch.ones_like(values[valid]).float()
    counts = torch.zeros(n, device=values.device).index_add_(0, group_ids[valid], ones)
    return torch.where(valid, values, (means / counts.clamp_min(1))[group_ids].to(values.dtype))


def leaf_means(leaf_values: Tensor, schedule: TreeSchedule, valid: Optional[Tensor] = None) -> Tensor:
    """``[T, L]`` -> ``[T, N]``: each node's mean over the (valid) leaves below it; 0 for a node with no valid leaf
    below. A leaf node's value is its own (0 if invalid)."""
    m = schedule.leaf_matrix.to(leaf_values.device).to(leaf_values.dtype)
    if valid is None:
        return (leaf_values @ m.T) / m.sum(1)
    w = valid.to(leaf_values.dtype)
    den = w @ m.T
    return torch.where(den > 0, ((leaf_values * w) @ m.T) / den.clamp_min(1), torch.zeros_like(den))


@dataclass(frozen=True)
class LeafValues:
    """What an aggregation makes of the rewards and an estimator turns into advantages.

    values: ``[T, L]``, one row per tree (every process's trees), one value per leaf; an invalid leaf (its reward
    failed) holds a value that moves no group statistic. valid: ``[T, L]`` bool, the leaves whose rewards count.
    groups: ``[T]`` prompt ids; the trees of one prompt form one group. normalized: the values are group-normalised
    advantages already (GDPO), which a group-relative estimator must not normalise a second time.
    """

    values: Tensor
    valid: Tensor
    groups: Tensor
    normalized: bool = False

    @property
    def leaf_groups(self) -> Tensor:
        """``[T, L]``: every leaf's prompt id."""
        return self.groups[:, None].expand_as(self.values)


@dataclass(frozen=True)
class Trees:
    """The rollouts' shape, for estimators that read it: the tree ``schedule``, the node ``fusion`` of the depth-wise
    estimator (``mean`` or ``path_prob``) and, for ``path_prob``, every node's log-prob given its parent
    ``edge_log_probs`` ``[T, N]``."""

    schedule: TreeSchedule
    fusion: str = "mean"
    edge_log_probs: Optional[Tensor] = None


Aggregation = Callable[[Mapping[str, Tensor], Mapping[str, float], Tensor, Tensor], LeafValues]
"""(scores ``{name: [T, L]}``, weights ``{name: w}``, valid ``[T, L]``, groups ``[T]``) -> LeafValues."""

Estimator = Callable[[LeafValues, Trees], Tensor]
"""(LeafValues, Trees) -> node advantages ``[T, N]``: the edge parent -> child trains with the child's advantage, a
per-leaf objective with the leaves' (``schedule.leaves``); a node with no valid leaf below gets 0."""


def weighted_sum(scores: Mapping[str, Tensor], weights: Mapping[str, float], valid: Tensor,
                 groups: Tensor) -> LeafValues:
    """``reward_aggregation: sum`` (Flow-GRPO, DiffusionNFT): each leaf's value is sum_k w_k R_k; invalid leaves take
    their group's mean valid value."""
    weights = _check_rewards(scores, weights)
    total = sum(weights[k] * r for k, r in scores.items())
    return LeafValues(fill_invalid(total, valid, groups[:, None].expand_as(total)), valid, groups)


def weighted_mean(scores: Mapping[str, Tensor], weights: Mapping[str, float], valid: Tensor,
                  groups: Tensor) -> LeafValues:
    """``reward_aggregation: mean``: each leaf's value is sum_k w_k R_k / sum_k w_k (the weights need a non-zero
    sum); invalid leaves take their group's mean valid value."""
    weights = _check_rewards(scores, weights)
    norm = sum(weights.values())
    if norm == 0:
        raise ValueError("reward_aggregation 'mean' needs reward weights with a non-zero sum")
    total = sum(weights[k] * r for k, r in scores.items()) / norm
    return LeafValues(fill_invalid(total, valid, groups[:, None].expand_as(total)), valid, groups)


def weighted_min(scores: Mapping[str, Tensor], weights: Mapping[str, float], valid: Tensor,
                 groups: Tensor) -> LeafValues:
    """``reward_aggregation: min``, a pessimistic ensemble against reward hacking: each leaf's value is
    min_k w_k R_k, so a leaf scores high only when every reward agrees (the weights put the rewards on one scale);
    invalid leaves take their group's mean valid value."""
    weights = _check_rewards(scores, weights)
    total = torch.stack([weights[k] * r for k, r in scores.items()]).amin(0)
    return LeafValues(fill_invalid(total, valid, groups[:, None].expand_as(total)), valid, groups)


def gdpo(scores: Mapping[str, Tensor], weights: Mapping[str, float], valid: Tensor, groups: Tensor) -> LeafValues:
    """``reward_aggregation: gdpo`` (GDPO, arXiv 2601.05242): each valid leaf's value is the decoupled advantage
    BN(sum_k w_k z_k) over the valid leaves (``gdpo_advantages``), invalid leaves 0. Already normalised."""
    leaf_groups = groups[:, None].expand_as(valid)
    out = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    out[valid] = gdpo_advantages({k: s[valid] for k, s in scores.items()}, leaf_groups[valid], weights).float()
    return LeafValues(out, valid, groups, normalized=True)


def group_zscore(leaves: LeafValues, trees: Trees) -> Tensor:
    """``advantage: grpo`` (Flow-GRPO): every leaf's group z-score (or GDPO's advantage as it is), then each node
    the mean of the valid leaves below it (every chain of a flat rollout is one leaf)."""
    v = leaves.values
    adv = v if leaves.normalized else group_advantages(
        v.flatten(), leaves.leaf_groups.flatten(), valid=leaves.valid.flatten()).reshape(v.shape)
    return leaf_means(adv, trees.schedule, leaves.valid)


def leave_one_out(leaves: LeafValues, trees: Trees) -> Tensor:
    """``advantage: rloo``: every valid leaf's value minus the mean of its group's other valid leaves, then node
    means as ``group_zscore``."""
    v = leaves.values
    adv = rloo_advantages(v.flatten(), leaves.leaf_groups.flatten(), valid=leaves.valid.flatten()).reshape(v.shape)
    return leaf_means(adv, trees.schedule, leaves.valid)


def depth_wise(leaves: LeafValues, trees: Trees) -> Tensor:
    """``advantage: tree`` (BranchGRPO): node values fused from the leaves (``mean`` of the valid leaves below, or
    ``path_prob``: ``tree_node_values``' probability fusion), then each node's z-score among the nodes of its depth
    in its prompt's trees (``depthwise_advantages``); only nodes above a valid leaf take part."""
    sched = trees.schedule
    if trees.fusion == "mean":
        values = leaf_means(leaves.values, sched, leaves.valid)
    elif trees.fusion == "path_prob":
        if trees.edge_log_probs is None:
            raise ValueError("path_prob fusion needs the edges' log-probs [trees, nodes]")
        values = tree_node_values(leaves.values, sched, fusion="prob", edge_log_probs=trees.edge_log_probs)
    else:
        raise ValueError(f"tree fusion must be 'mean' or 'path_prob', got {trees.fusion!r}")
    above_valid = (leaves.valid.float() @ sched.leaf_matrix.to(values.device).float().T) > 0
    return depthwise_advantages(values, sched, tree_groups=leaves.groups, valid=above_valid)


AGGREGATIONS: dict[str, Aggregation] = {"sum": weighted_sum, "mean": weighted_mean, "min": weighted_min,
                                         "gdpo": gdpo}
"""``train.reward_aggregation`` -> how several rewards become one value per leaf. Add an entry to offer another."""

ESTIMATORS: dict[str, Estimator] = {"grpo": group_zscore, "rloo": leave_one_out, "tree": depth_wise}
"""``train.advantage`` -> how leaf values become node advantages. Add an entry to offer another."""


def node_advantages(scores: Mapping[str, Tensor], weights: Mapping[str, float], valid: Tensor, groups: Tensor,
                    trees: Trees, *, aggregation: str = "sum", estimator: str = "grpo") -> Tensor:
    """scores ``{name: [T, L]}`` -> node advantages ``[T, N]``: ``AGGREGATIONS[aggregation]`` then
    ``ESTIMATORS[estimator]``."""
    return ESTIMATORS[estimator](AGGREGATIONS[aggregation](scores, weights, valid, groups), trees)


def routed_advantages(scores: Mapping[str, Tensor], weights: Mapping[str, float], valid: Tensor, groups: Tensor,
                      trees: Trees, routing: Mapping[str, Sequence[str]], **kw: str) -> dict[str, Tensor]:
    """Modality routing (OmniNFT branch-aware advantages) composed with any aggregation and estimator: each stream's
    node advantages ``[T, N]`` come from the rewards routed to it alone (``node_advantages``), e.g. ``{"aesthetic":
    ["video"], "av_sync": ["video", "audio"]}``. With ``gdpo`` a stream's leaf value is BN(sum_k w_k z_k) over its
    rewards, OmniNFT's sum of per-reward z-scores renormalised over the batch. Every reward must be routed."""
    unrouted = sorted(set(scores) - set(routing))
    if unrouted:
        raise ValueError(f"rewards {unrouted} are not routed to any modality; add them to the routing")
    unknown = sorted(set(routing) - set(scores))
    if unknown:
        raise ValueError(f"routing names rewards {unknown}, which are not among {sorted(scores)}")
    streams = sorted({m for ms in routing.values() for m in ms})
    return {m: node_advantages({k: scores[k] for k in routing if m in routing[k]},
                               {k: weights[k] for k in routing if m in routing[k]}, valid, groups, trees, **kw)
            for m in streams}
