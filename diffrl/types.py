"""Typed containers shared by the math and the rollout engine (layer L0: imports only torch)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Union

import torch
from torch import Tensor

Latents = Union[Tensor, dict[str, Tensor]]
"""One latent tensor ``[B, ...]`` (image ``[B, C, H, W]``, video ``[B, C, F, H, W]``) or a dict of streams
(``{"video": ..., "audio": ...}``) that share the batch dimension."""


@dataclass
class StepOut:
    """One denoising transition x -> x_next.

    x_next: like ``x`` (in ``x``'s dtype). mean: like ``x``, fp32. std: ``[B]`` fp32, the std of the Gaussian the
    sample was drawn from (0 for a deterministic step). log_prob: ``[B]`` fp32, or ``None`` for an ODE step.
    For a dict of streams each field is a dict with the same keys (log-probs are kept per modality).
    """

    x_next: Latents
    mean: Latents
    std: Union[Tensor, dict[str, Tensor]]
    log_prob: Optional[Union[Tensor, dict[str, Tensor]]]


@dataclass
class Transitions:
    """Every edge (parent -> child) of a batch of rollout trees, one row per edge; ``E`` edges in all.

    Flat GRPO rollouts are trees without splits, so this is also the flat rollout record.
    """

    x: Tensor  # [E, ...] parent latent
    x_next: Tensor  # [E, ...] child latent (exactly what the next step consumed)
    mean: Tensor  # [E, ...] fp32 mean of the transition kernel under the rollout policy
    std: Tensor  # [E] fp32 std the child was drawn with (split noise scale included)
    log_prob: Tensor  # [E] fp32 log-prob under the rollout policy (0 where the step was deterministic)
    sigma: Tensor  # [E] fp32 noise level of the parent
    sigma_next: Tensor  # [E] fp32 noise level of the child
    step: Tensor  # [E] long, denoising step index k (the child sits at depth k + 1)
    depth: Tensor  # [E] long, child depth in its tree
    tree: Tensor  # [E] long, index of the tree (row of the rollout's tree seeds)
    parent: Tensor  # [E] long, parent node id local to its tree (see TreeSchedule)
    child: Tensor  # [E] long, child node id local to its tree
    noise_scale: Tensor  # [E] fp32 std multiplier used at this edge (lambda at split steps, else 1)
    stochastic: Tensor  # [E] bool, False for deterministic (ODE / zero-std) edges, which carry no log-prob

    def __len__(self) -> int:
        return self.log_prob.shape[0]

    def index(self, idx: Tensor) -> "Transitions":
        """Rows selected by a bool mask ``[E]`` or a long index ``[E']``."""
        return Transitions(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def to(self, device: Union[str, torch.device]) -> "Transitions":
        return Transitions(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass
class TreeRollout:
    """What a rollout of ``T`` trees returns: the edges, and each leaf's final latent.

    leaves: ``[T, L, ...]`` final latents (x at sigma = 0), leaf ``j`` of tree ``t`` is ``leaves[t, j]``.
    leaf_ids: ``[L]`` long, local node ids of the leaves (same for every tree).
    transitions: every edge of every tree.
    nfe: velocity-function evaluations actually made, counted per latent.
    kept: ``[T, L]`` bool, the leaves computed when the rollout regenerated selected paths only (the others are
    zeros); None: every leaf.
    """

    leaves: Tensor
    leaf_ids: Tensor
    transitions: Transitions
    nfe: int
    kept: Optional[Tensor] = None
