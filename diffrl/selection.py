"""Which of N previewed candidates to regenerate and train on, and how well the preview ranked them (layer L1, pure
torch): Sol-RL's K-of-N selection strategies (FP4 Explore, BF16 Train, arXiv 2604.06916) and the Spearman rank
agreement between preview and regenerated rewards."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

STRATEGIES = ("best_worst", "mean_deviation", "max_variance", "random")


def select_candidates(rewards: Tensor, k: int, strategy: str = "best_worst",
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """Which K of each prompt's N candidates to regenerate and train on.

    rewards: ``[P, N]`` preview rewards. Returns ``[P, K]`` long candidate indices, ascending within each row.
    best_worst (Sol-RL default): the top floor(K/2) and the bottom K - floor(K/2); mean_deviation: the K largest
    |r - mean_row|; max_variance (D^3S): the K-subset with the largest reward variance (it is always some j lowest
    plus K - j highest, so the K + 1 such subsets are compared); random: a uniform K-subset (the control). Ties
    break towards the lower index.
    """
    p, n = rewards.shape
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} candidates per prompt")
    order = torch.stack([torch.tensor(sorted(range(n), key=lambda i: (float(r[i]), i))) for r in rewards])  # [P, N]
    if strategy == "best_worst":
        top = k // 2
        picks = torch.cat([order[:, : k - top], order[:, n - top :]], dim=1)
    elif strategy == "mean_deviation":
        dev = (rewards - rewards.mean(dim=1, keepdim=True)).abs()
        picks = torch.stack([torch.tensor(sorted(range(n), key=lambda i: (-float(d[i]), i))[:k]) for d in dev])
    elif strategy == "max_variance":
        picks = torch.stack([_max_variance(rewards[i], order[i], k) for i in range(p)])
    elif strategy == "random":
        picks = torch.stack([torch.randperm(n, generator=generator)[:k] for _ in range(p)])
    else:
        raise ValueError(f"unknown selection strategy {strategy!r}; choose one of {STRATEGIES}")
    return picks.sort(dim=1).values


def _max_variance(r: Tensor, order: Tensor, k: int) -> Tensor:
    """The K-subset of ``r`` with the largest variance, among the j-lowest + (K-j)-highest ones (first on ties)."""
    n, best, best_var = len(r), None, -math.inf
    for j in range(k + 1):
        idx = torch.cat([order[:j], order[n - (k - j) :]])
        var = float(r[idx].double().var(unbiased=False))
        if var > best_var + 1e-12:
            best, best_var = idx, var
    return best


def ranks(x: Tensor) -> Tensor:
    """``[n]`` -> ``[n]`` fp64 ranks 1..n, ties given their average rank."""
    xd = x.double()
    less = (xd[None, :] < xd[:, None]).sum(1).double()
    equal = (xd[None, :] == xd[:, None]).sum(1).double()
    return less + (equal + 1) / 2


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two ``[n]`` vectors (Pearson of the average ranks); NaN when either is
    constant or n < 2."""
    if a.numel() < 2:
        return float("nan")
    ra, rb = ranks(a.flatten()), ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def mean_spearman(preview: Tensor, exact: Tensor) -> float:
    """Mean over prompts of the Spearman agreement of ``[P, K]`` preview and exact rewards (prompts where either is
    constant are left out); NaN when none is left."""
    values = [spearman(a, b) for a, b in zip(preview, exact)]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")
