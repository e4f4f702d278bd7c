"""How much of a policy gradient is signal (pure torch; the gradient-SNR probe's estimator).

A policy-gradient estimate from one rollout batch is the true gradient plus noise. Gradients of independent
batches share only the true part, so their dot products measure it: ``gradient_agreement`` turns N such gradients
into the signal share of one batch's gradient and the number of batches a gradient step needs before its direction
is mostly signal. ``probe_gradient_snr.py`` (beside this module) measures it for a training config.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def gradient_agreement(grads: Tensor) -> dict[str, float]:
    """Signal share of a one-batch gradient, from ``grads`` ``[N, P]`` (N >= 2 independent batches, P parameters).

    Model: g_i = s + n_i with independent zero-mean noise, E|n_i|^2 = sigma^2. Then E[g_i . g_j] = |s|^2 for i != j
    and E|g_i|^2 = |s|^2 + sigma^2, so ``rho = mean_{i<j} g_i . g_j / mean_i |g_i|^2`` estimates
    |s|^2 / (|s|^2 + sigma^2): 1 is pure signal, 0 pure noise. It is also about the expected cosine of two batches'
    gradients (``pairwise_cos``, the direct mean, reported alongside). The mean of n batches' gradients has
    cos^2(mean, s) = |s|^2 / (|s|^2 + sigma^2 / n), so ``batches_for_45deg = (1 - rho) / rho`` batches make a
    gradient whose direction is at 45 degrees from the true one (inf when rho <= 0). ``rho_se``: the jackknife
    standard error of rho over the batches (needs N >= 3; nan otherwise).
    """
    if grads.ndim != 2 or grads.shape[0] < 2:
        raise ValueError(f"gradient_agreement needs [N >= 2, P] gradients, got shape {tuple(grads.shape)}")
    g = grads.double()
    n = g.shape[0]
    gram = g @ g.T
    rho = _rho(gram)
    loo = [_rho(gram[keep][:, keep]) for keep in (torch.arange(n) != i for i in range(n))] if n >= 3 else []
    se = math.sqrt((n - 1) / n * sum((r - sum(loo) / n) ** 2 for r in loo)) if loo else math.nan
    pairs = n * (n - 1)
    norms = gram.diagonal().sqrt()
    cos = gram / (norms[:, None] * norms[None, :]).clamp_min(1e-300)
    pairwise = float((cos.sum() - cos.diagonal().sum()) / pairs)
    return {"rho": rho, "rho_se": se, "pairwise_cos": pairwise,
            "batches_for_45deg": (1 - rho) / rho if rho > 0 else math.inf}


def _rho(gram: Tensor) -> float:
    """rho from the Gram matrix ``[N, N]`` of N gradients: mean off-diagonal over mean diagonal entry."""
    n = gram.shape[0]
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)) / gram.diagonal().mean())
