"""The denoising-step policy loss (layer L1: pure torch). Flow-GRPO: arXiv 2505.05470.

Clip range convention. Log-probs are reduced over the ``D`` elements of a latent (mean by default, as the anchors
do). Under a small policy change, the per-element log-ratios are independent, so the spread of the mean log-ratio
shrinks like 1/sqrt(D) and that of the summed one grows like sqrt(D): a fixed PPO epsilon means different things
at different resolutions (hence the anchors' 1e-4 .. 1e-5, retuned per resolution). diffrl's ``clip_range`` is the
epsilon of a one-element action; the loss applies ``effective_clip_range`` = clip_range / sqrt(D) to mean-reduced
log-probs (clip_range * sqrt(D) to summed ones), so the clipped fraction is the same at every resolution.
Converting an anchor's epsilon_a tuned at D_a elements: ``clip_range = epsilon_a * sqrt(D_a)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from diffrl.advantages import clip_advantages
from diffrl.sde import append_dims, reduce_elements


def effective_clip_range(clip_range: float, num_elements: int, reduction: str = "mean") -> float:
    """The ratio clip actually applied: clip_range / sqrt(D) for ``mean`` log-probs, clip_range * sqrt(D) for
    ``sum``."""
    if num_elements < 1:
        raise ValueError(f"num_elements must be >= 1, got {num_elements}")
    scale = math.sqrt(num_elements)
    return clip_range / scale if reduction == "mean" else clip_range * scale


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor, reduction: str = "mean") -> Tensor:
    """KL(N(mean, std^2) || N(ref_mean, std^2)) per element = (mean - ref_mean)^2 / (2 std^2), reduced: ``[B]``.

    mean, ref_mean: ``[B, ...]``; std: ``[B]`` > 0 (the two transition kernels share it).
    """
    s = append_dims(std.float(), mean.ndim)
    return reduce_elements((mean.float() - ref_mean.float()) ** 2 / (2 * s**2), reduction)


def ratio_norm_log_ratio(log_ratio: Tensor, mean: Tensor, old_mean: Tensor, std: Tensor, num_elements: int) -> Tensor:
    """GRPO-Guard RatioNorm (arXiv 2510.22319): s [log_ratio + ||mean - old_mean||^2 / (2 D s^2)], s = std ``[E]``.

    Removes the deterministic negative bias of the mean-reduced log-ratio and rescales its spread by the step's std.
    ``mean``/``old_mean``: ``[E, ...]``. Returns ``[E]``.
    """
    s = std.float()
    bias = (mean.float() - old_mean.float()).pow(2).flatten(1).sum(1) / (2 * num_elements * s**2)
    return s * (log_ratio + bias)


def kl_convention_scale(sigma: Tensor, sigma_next: Tensor, convention: str) -> Optional[Tensor]:
    """Per-transition factor ``[E]`` on the exact Gaussian KL of a step, ``||mu - mu_ref||^2 / (2 std^2)`` with the
    flow SDE's ``std^2 = sigma_t^2 |dsigma|``: None for ``exact``; ``|dsigma| = sigma - sigma_next`` for
    ``flow_grpo``, which gives the KL of Flow-GRPO's released code (Liu et al. 2025), ``||mu - mu_ref||^2 /
    (2 sigma_t^2)``. A beta tuned with Flow-GRPO's convention carries over with ``flow_grpo``; with ``exact`` the same
    beta weighs step k's KL 1 / |dsigma_k| times more (about 9x at the main grid's early steps, 1000x at its last)."""
    if convention == "exact":
        return None
    if convention == "flow_grpo":
        return (sigma - sigma_next).float()
    raise ValueError(f"KL convention must be 'exact' or 'flow_grpo', got {convention!r}")


@dataclass
class LossStats:
    """Diagnostics of one policy-loss evaluation (floats, detached)."""

    policy_loss: float
    kl: float
    clip_frac: float
    approx_kl: float
    ratio_mean: float
    ratio_max: float
    ratio_min: float
    adv_mean: float
    adv_std: float


def policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    *,
    clip_range: float,
    num_elements: int,
    reduction: str = "mean",
    adv_clip: Optional[float] = None,
    weights: Optional[Tensor] = None,
    kl_weight: float = 0.0,
    mean: Optional[Tensor] = None,
    ref_mean: Optional[Tensor] = None,
    std: Optional[Tensor] = None,
    ratio_norm: bool = False,
    old_mean: Optional[Tensor] = None,
    policy_scale: float = 1.0,
    kl_scale: Optional[Tensor] = None,
) -> tuple[Tensor, LossStats]:
    """PPO clipped surrogate per transition plus beta * KL to the reference (Flow-GRPO, arXiv 2505.05470).

    log_prob, old_log_prob, advantages: ``[E]``. L = wmean(max(-A rho, -A clip(rho, 1 - c, 1 + c))) + beta wmean(KL)
    with rho = exp(log_prob - old_log_prob), c = ``effective_clip_range(clip_range, num_elements, reduction)``,
    KL = ``gaussian_kl(mean, ref_mean, std)`` (needs those three when ``kl_weight > 0``), ``weights`` ``[E]``
    (default 1) for the weighted mean. ``ratio_norm`` applies GRPO-Guard RatioNorm (needs mean, old_mean, std);
    ``policy_scale`` multiplies the surrogate term only (GRPO-Guard's per-step 1 / |dt| re-weighting; the KL term
    and the logged ``policy_loss`` are unscaled); ``kl_scale`` ``[E]`` multiplies each transition's KL (the
    anchors' convention, see ``kl_convention_scale``). Returns a scalar loss and ``LossStats``.
    """
    adv = clip_advantages(advantages.float(), adv_clip)
    log_ratio = log_prob.float() - old_log_prob.float()
    if ratio_norm:
        if mean is None or old_mean is None or std is None:
            raise ValueError("ratio_norm needs mean, old_mean and std")
        log_ratio = ratio_norm_log_ratio(log_ratio, mean, old_mean, std, num_elements)
    ratio = torch.exp(log_ratio)
    c = effective_clip_range(clip_range, num_elements, reduction)
    per = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - c, 1 + c))
    w = torch.ones_like(per) if weights is None else weights.float()
    wmean = lambda t: (t * w).sum() / w.sum().clamp_min(1e-12)  # noqa: E731
    loss = wmean(per) * policy_scale
    kl = torch.zeros((), device=per.device)
    if kl_weight > 0:
        if mean is None or ref_mean is None or std is None:
            raise ValueError("kl_weight > 0 needs mean, ref_mean and std")
        per_kl = gaussian_kl(mean, ref_mean, std, reduction)
        kl = wmean(per_kl if kl_scale is None else per_kl * kl_scale.float())
        loss = loss + kl_weight * kl
    with torch.no_grad():
        stats = LossStats(
            policy_loss=float(wmean(per)), kl=float(kl), clip_frac=float(wmean(((ratio - 1).abs() > c).float())),
            approx_kl=float(wmean(0.5 * log_ratio**2)), ratio_mean=float(wmean(ratio)), ratio_max=float(ratio.max()),
            ratio_min=float(ratio.min()),
            adv_mean=float(adv.mean()), adv_std=float(adv.std(unbiased=False)),
        )
    return loss, stats



def velocity_kl(v: Tensor, v_ref: Optional[Tensor], kl_weight: float) -> Tensor:
    """The forward-process objectives' KL to the reference, mean_B |v - v_ref|^2 (element mean; ``v_ref``
    detached); 0 when ``kl_weight`` is 0."""
    if kl_weight <= 0:
        return torch.zeros((), device=v.device)
    if v_ref is None:
        raise ValueError("kl_weight > 0 needs v_ref")
    return reduce_elements((v.float() - v_ref.float().detach()).square()).mean()


@dataclass
class NFTStats:
    """Diagnostics of one DiffusionNFT loss evaluation (floats, detached)."""

    policy_loss: float
    kl: float
    clip_frac: float
    """Fraction of samples whose advantage was clipped at ``adv_max`` (their r saturates at 0 or 1)."""
    old_dev: float
    """mean (v_theta - v_old)^2: how far the trained policy has moved from the one that sampled."""


def nft_loss(
    v: Tensor,
    v_old: Tensor,
    x_t: Tensor,
    x0: Tensor,
    sigma: Tensor,
    advantages: Tensor,
    *,
    beta: float,
    adv_max: float,
    kl_weight: float = 0.0,
    v_ref: Optional[Tensor] = None,
) -> tuple[Tensor, NFTStats]:
    """DiffusionNFT forward-process objective (arXiv 2509.16117).

    v, v_old, x_t, x0: ``[B, ...]`` (v with grad, v_old the sampling policy's velocity at the same x_t), sigma ``[B]``
    with ``x_t = (1 - sigma) x0 + sigma eps``, advantages ``[B]``. With r = clip(1/2 + clip(A, -A_max, A_max) /
    (2 A_max), 0, 1), implicit policies v+ = (1 - beta) v_old + beta v and v- = (1 + beta) v_old - beta v and their
    clean predictions x0+- = x_t - sigma v+-:

        L = mean_B (A_max / beta) [r |x0+ - x0|^2 / w+ + (1 - r) |x0- - x0|^2 / w-] + kl_weight mean_B |v - v_ref|^2

    where |.|^2 is the per-element mean of squares and w+- = stop_grad(mean |x0+- - x0|) (clipped at 1e-5), the
    anchors' adaptive weight. At v = v_old the gradient is that of advantage-weighted flow matching,
    -A (2 sigma / w) (x0_hat - x0) per element, whatever beta is. Returns a scalar loss and ``NFTStats``.
    """
    if beta <= 0 or adv_max <= 0:
        raise ValueError(f"beta and adv_max must be > 0, got {beta} and {adv_max}")
    vf, vo, xt, x0f = v.float(), v_old.float().detach(), x_t.float(), x0.float()
    s = append_dims(sigma.float(), vf.ndim)
    adv = advantages.float()
    r = (0.5 + 0.5 * clip_advantages(adv, adv_max) / adv_max).clamp(0, 1)

    def term(v_implicit: Tensor) -> Tensor:
        err = xt - s * v_implicit - x0f
        w = reduce_elements(err.detach().abs()).clamp_min(1e-5)
        return reduce_elements(err.square()) / w

    per = (adv_max / beta) * (r * term((1 - beta) * vo + beta * vf) + (1 - r) * term((1 + beta) * vo - beta * vf))
    kl = velocity_kl(vf, v_ref, kl_weight)
    loss = per.mean() + kl_weight * kl
    with torch.no_grad():
        stats = NFTStats(policy_loss=float(per.mean()), kl=float(kl),
                         clip_frac=float((adv.abs() > adv_max).float().mean()),
                         old_dev=float((vf - vo).square().mean()))
    return loss, stats


@dataclass
class AWMStats:
    """Diagnostics of one AWM loss evaluation (floats, detached)."""

    policy_loss: float
    kl: float
    clip_frac: float
    """Fraction of samples whose advantage was clipped at ``adv_max``."""


def awm_loss(
    v: Tensor,
    noise: Tensor,
    x0: Tensor,
    sigma: Tensor,
    advantages: Tensor,
    *,
    adv_max: float,
    weighting: str = "ghuber",
    power: float = 0.25,
    kl_weight: float = 0.0,
    v_ref: Optional[Tensor] = None,
) -> tuple[Tensor, AWMStats]:
    """Advantage Weighted Matching (Xue et al., arXiv 2509.25050): the pretraining flow-matching loss on the policy's
    own clean samples, weighted by their advantages.

    v, noise, x0: ``[B, ...]`` (v with grad, evaluated at ``x_t = (1 - sigma) x0 + sigma noise``), sigma ``[B]``,
    advantages ``[B]``. With m = per-element mean of (v - (noise - x0))^2 and a = clip(A, -A_max, A_max) / A_max
    (the release's scaling):

        uniform:  L = mean_B a m                                              (the paper's plain form)
        ghuber:   L = mean_B a sigma ((m + 1e-10)^p - 1e-10^p) / p            (the release's default, p = 0.25)

    plus ``kl_weight`` mean_B |v - v_ref|^2 (element mean) to the reference. The release's PPO ratio built from these
    losses is exactly 1 on policy (one optimizer step per rollout), so it is left out. Returns a scalar loss and
    ``AWMStats``.
    """
    if adv_max <= 0:
        raise ValueError(f"adv_max must be > 0, got {adv_max}")
    if weighting not in ("uniform", "ghuber"):
        raise ValueError(f"AWM weighting must be 'uniform' or 'ghuber', got {weighting!r}")
    vf = v.float()
    target = noise.float() - x0.float()
    m = reduce_elements((vf - target).square())
    if weighting == "ghuber":
        m = sigma.float() * ((m + 1e-10) ** power - 1e-10**power) / power
    adv = advantages.float()
    per = clip_advantages(adv, adv_max) / adv_max * m
    kl = velocity_kl(vf, v_ref, kl_weight)
    loss = per.mean() + kl_weight * kl
    with torch.no_grad():
        stats = AWMStats(policy_loss=float(per.mean()), kl=float(kl),
                         clip_frac=float((adv.abs() > adv_max).float().mean()))
    return loss, stats
