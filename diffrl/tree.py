"""Branching rollout trees with shared prefixes (BranchGRPO, arXiv 2509.06040); layer L1, pure torch.

A tree over ``T`` denoising steps starts from one root latent (node 0, depth 0). At step ``k`` every active node
emits ``b_k`` children (``b_k`` = the branch factor if ``k`` is a split step, else 1); a child created at step ``k``
has depth ``k + 1``. Node ids are local to a tree and numbered in creation order, so the children of step ``k``
are one contiguous id range. Flat GRPO is the tree with no splits: one root, one chain, one leaf.
"""
from __future__ import annotations

import math
from functools import cached_property
from typing import Optional, Sequence, Union

import torch
from torch import Tensor


class TreeSchedule:
    """Split steps, branch factors and the node table of one tree.

    num_steps: T. split_steps: step indices in ``[0, T)`` where every active node branches. branch_factor: one int
    for every split or one per split. Attributes (all tensors are long):
      parent ``[N]`` (-1 for the root), depth ``[N]``, step_nodes[k] ``[A_k]`` the nodes advanced at step k,
      step_children[k] ``[A_k * b_k]`` the nodes created at step k, leaves ``[L]``, num_leaves = prod(b),
      nfe = sum_k A_k (velocity evaluations for one tree, per latent: each shared prefix counted once).
    """

    def __init__(self, num_steps: int, split_steps: Sequence[int] = (), branch_factor: Union[int, Sequence[int]] = 2):
        splits = list(split_steps)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if sorted(set(splits)) != splits:
            raise ValueError(f"split_steps must be strictly increasing, got {splits}")
        if splits and splits[-1] >= num_steps:
            raise ValueError(f"split step {splits[-1]} is past the last step {num_steps - 1}")
        if splits and splits[0] < 0:
            raise ValueError(f"split steps must be >= 0, got {splits}")
        factors = [branch_factor] * len(splits) if isinstance(branch_factor, int) else list(branch_factor)
        if len(factors) != len(splits):
            raise ValueError(f"{len(factors)} branch factors given for {len(splits)} split steps")
        if any(b < 2 for b in factors):
            raise ValueError(f"branch factors must be >= 2, got {factors}")
        self.num_steps, self.split_steps, self.branch_factors = num_steps, splits, factors
        self.branch = [1] * num_steps
        for s, b in zip(splits, factors):
            self.branch[s] = b
        self._build()

    def _build(self) -> None:
        parent, depth, active = [-1], [0], [0]
        self.step_nodes: list[Tensor] = []
        self.step_children: list[Tensor] = []
        for k in range(self.num_steps):
            first = len(parent)
            count = len(active) * self.branch[k]
            parent.extend(n for n in active for _ in range(self.branch[k]))
            depth.extend([k + 1] * count)
            self.step_nodes.append(torch.tensor(active, dtype=torch.long))
            active = list(range(first, first + count))
            self.step_children.append(torch.tensor(active, dtype=torch.long))
        self.parent = torch.tensor(parent, dtype=torch.long)
        self.depth = torch.tensor(depth, dtype=torch.long)
        self.leaves = torch.tensor(active, dtype=torch.long)

    @property
    def num_nodes(self) -> int:
        return self.parent.numel()

    @property
    def num_leaves(self) -> int:
        return math.prod(self.branch_factors)

    @property
    def active_counts(self) -> list[int]:
        """``A_k`` for k = 0 .. T-1: nodes advanced (velocity evaluations) at each step."""
        return [len(n) for n in self.step_nodes]

    @property
    def nfe(self) -> int:
        return sum(self.active_counts)

    @cached_property
    def leaf_matrix(self) -> Tensor:
        """``[N, L]`` bool: ``M[n, j]`` is True when leaf ``j`` descends from (or is) node ``n``."""
        m = torch.zeros(self.num_nodes, self.num_leaves, dtype=torch.bool)
        ids, cols = self.leaves.clone(), torch.arange(self.num_leaves)
        for _ in range(self.num_steps + 1):  # every leaf sits at depth T: T hops up reach the root
            m[ids, cols] = True
            ids = self.parent[ids].clamp_min(0)
        return m

    def __repr__(self) -> str:
        return (
            f"TreeSchedule(num_steps={self.num_steps}, split_steps={self.split_steps}, "
            f"branch_factors={self.branch_factors}, leaves={self.num_leaves}, nfe={self.nfe})"
        )


def width_prune_mask(
    schedule: TreeSchedule, step: Tensor, child: Tensor, tree: Tensor, leaf_adv: Tensor, ratio: float = 0.5,
    mode: str = "topk",
) -> Tensor:
    """``[E]`` bool, edges kept for the gradient after width pruning (BranchGRPO (c); rollouts are unchanged).

    Only edges after the last split (step > last split) are pruned; each belongs to one leaf's chain.
    step, child, tree: ``[E]`` long per edge. leaf_adv: ``[T, L]`` per-leaf advantage (or reward).
    mode ``topk``: within each set of siblings created at the last split, keep the top ``ceil(ratio * b)``
    chains. mode ``best_worst``: per tree keep the best ``ceil(ratio L / 2)`` and worst ``ceil(ratio L / 2)``.
    """
    if not schedule.split_steps:
        return torch.ones_like(step, dtype=torch.bool)
    last = schedule.split_steps[-1]
    n_trees, n_leaves = leaf_adv.shape
    if mode == "topk":
        b = schedule.branch[last]
        keep_n = max(1, math.ceil(ratio * b))
        groups = leaf_adv.reshape(n_trees, n_leaves // b, b)
        order = groups.argsort(dim=-1, descending=True)
        kept = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :keep_n], True)
        kept = kept.reshape(n_trees, n_leaves)
    elif mode == "best_worst":
        half = max(1, math.ceil(ratio * n_leaves / 2))
        order = leaf_adv.argsort(dim=-1, descending=True)
        kept = torch.zeros_like(leaf_adv, dtype=torch.bool)
        kept.scatter_(-1, order[:, :half], True).scatter_(-1, order[:, -half:], True)
    else:
        raise ValueError(f"width pruning mode must be 'topk' or 'best_worst', got {mode!r}")
    leaf_of = node_leaf_index(schedule)
    after = step > last
    leaf_idx = leaf_of[child].clamp_min(0)
    return ~after | kept[tree, leaf_idx]


def node_leaf_index(schedule: TreeSchedule) -> Tensor:
    """``[N]`` long: for a node with exactly one descendant leaf, that leaf's index in ``leaves``; else -1."""
    m = schedule.leaf_matrix
    single = m.sum(dim=1) == 1
    return torch.where(single, m.float().argmax(dim=1), torch.full((schedule.num_nodes,), -1))


def depth_prune_mask(
    depth: Tensor, prune_depths: Sequence[int], iteration: int = 0, interval: Optional[int] = None, stop_depth: int = 0
) -> Tensor:
    """``[E]`` bool, edges kept after depth pruning (BranchGRPO (c)): drop edges whose child depth is in D_active.

    D_active = {d - min(floor(iteration / interval), min(D) - stop_depth) : d in D}: a window that slides
    towards ``stop_depth`` by one depth every ``interval`` iterations (no sliding when ``interval`` is None).
    """
    if not prune_depths:
        return torch.ones_like(depth, dtype=torch.bool)
    offset = 0 if interval is None else min(iteration // interval, min(prune_depths) - stop_depth)
    active = torch.tensor([d - max(offset, 0) for d in prune_depths], dtype=depth.dtype)
    return ~torch.isin(depth, active)
