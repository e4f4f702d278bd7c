"""Sigma grids and which denoising steps are stochastic and trained (layer L1: pure torch).

MixGRPO's sliding SDE window (arXiv 2507.21802) and DanceGRPO's timestep subsampling (arXiv 2505.07818).
A step mask is a bool tensor ``[T]`` over step indices ``k = 0 .. T-1`` (step k goes sigmas[k] -> sigmas[k+1]).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

WINDOW_STRATEGIES = ("fixed", "progressive", "random", "decay", "exp_decay")


def time_shift(t: Tensor, shift: float) -> Tensor:
    """sigma = shift t / (1 + (shift - 1) t): SD3/FLUX resolution shift applied to ``t`` in [0, 1]."""
    return shift * t / (1 + (shift - 1) * t)


def flow_sigmas(num_steps: int, shift: float = 1.0, device: Optional[torch.device] = None) -> Tensor:
    """``[num_steps + 1]`` fp32 sigmas from 1 down to 0: ``time_shift(linspace(1, 0), shift)``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return time_shift(torch.linspace(1.0, 0.0, num_steps + 1, device=device), shift)


def window_mask(num_steps: int, start: int, size: int) -> Tensor:
    """``[T]`` bool: True on steps ``[start, start + size)``, the SDE (and trained) window; ODE elsewhere."""
    if size < 1 or start < 0 or start + size > num_steps:
        raise ValueError(f"SDE window [{start}, {start + size}) does not fit in {num_steps} steps")
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[start : start + size] = True
    return mask


def _window_position(iteration: int, tau_of: Callable[[int], int], shift: int, max_start: int) -> int:
    """Walk the window forward: it stays ``tau_of(l)`` iterations at start ``l``, then moves by ``shift``.

    After passing ``max_start`` it rolls back to 0 (MixGRPO ``roll_back``).
    """
    start, remaining = 0, iteration
    while remaining >= tau_of(start):
        remaining -= tau_of(start)
        start += shift
        if start > max_start:
            start = 0
    return start


def mix_window_start(
    iteration: int,
    num_steps: int,
    size: int,
    *,
    strategy: str = "progressive",
    iters_per_move: int = 25,
    shift: int = 1,
    min_iters: int = 1,
    decay_k: float = 0.1,
    decay_offset: float = 13.0,
    generator: Optional[torch.Generator] = None,
) -> int:
    """Start ``l`` of MixGRPO's SDE window ``[l, l + size)`` at a training iteration (MixGRPO, arXiv 2507.21802).

    fixed: 0. progressive: moves by ``shift`` every ``iters_per_move`` iterations, rolls back after the last
    position. decay: stays tau(l) = max(min_iters, floor(tau (1 - l / l_max) + min_iters l / l_max)) iterations.
    exp_decay: tau(l) = ceil(tau exp(-k relu(l - offset))). random: uniform over ``0 .. num_steps - size``.
    """
    max_start = num_steps - size
    if max_start < 0:
        raise ValueError(f"window size {size} exceeds {num_steps} steps")
    if strategy == "fixed":
        return 0
    if strategy == "random":
        return int(torch.randint(0, max_start + 1, (1,), generator=generator))
    taus = {
        "progressive": lambda l: iters_per_move,
        "decay": lambda l: max(
            min_iters, math.floor(iters_per_move * (1 - l / max(max_start, 1)) + min_iters * l / max(max_start, 1))
        ),
        "exp_decay": lambda l: math.ceil(iters_per_move * math.exp(-decay_k * max(l - decay_offset, 0.0))),
    }
    if strategy not in taus:
        raise ValueError(f"unknown window strategy {strategy!r}; choose one of {WINDOW_STRATEGIES}")
    return _window_position(iteration, taus[strategy], shift, max_start)


def subsample_steps(mask: Tensor, fraction: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """``[T]`` bool: a random ``ceil(fraction * n)`` of the ``n`` True steps of ``mask`` (DanceGRPO's
    timestep fraction; at least one step is kept when ``mask`` has any)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"timestep fraction must be in (0, 1], got {fraction}")
    candidates = mask.nonzero().flatten()
    keep = math.ceil(fraction * len(candidates))
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:keep]]
    out = torch.zeros_like(mask)
    out[chosen] = True
    return out
