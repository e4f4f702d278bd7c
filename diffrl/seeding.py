"""Seeds and noise that depend only on where they are used (layer L1, pure torch): a splitmix64 mix of integers,
and one tree's noise at one step drawn from ``(tree_seed, step)``, so any subset of a tree's nodes can be sampled or
regenerated with exactly the noise a full rollout draws."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 chain): the same ``(tree_seed, step)`` always gives the
    same noise, whichever subset of nodes is sampled or regenerated."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def step_noise(tree_seed: int, step: int, count: int, shape: Sequence[int],
               dtype: torch.dtype = torch.float32) -> Tensor:
    """``[count, *shape]`` standard normal noise of one tree at one step, drawn on the CPU from ``(tree_seed, step)``.

    step = -1 gives the root's initial noise (count 1). Row ``i`` is the noise of the i-th child created at ``step``.
    """
    g = torch.Generator().manual_seed(mix_seed(tree_seed, step))
    return torch.randn((count, *shape), generator=g, dtype=torch.float32).to(dtype)
