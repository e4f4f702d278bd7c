"""Denoising steps that both sample and score (layer L1: pure torch).

Every step is a pure function of ``(x, velocity, sigma, sigma_next)``: it reads no scheduler state. Give it ``noise``
(or a ``generator``) to sample, or ``x_next`` to re-score a stored transition under grad; never both.
Maths from Flow-GRPO (arXiv 2505.05470), DanceGRPO (arXiv 2505.07818), DDPO (arXiv 2305.13301). Rectified flow:
``x_sigma = (1 - sigma) x0 + sigma eps``, ``v = eps - x0``, ``x0_hat = x - sigma v``, ``dt = sigma_next - sigma < 0``.

Log-prob reduction: the Gaussian log-density is averaged over all non-batch elements (``reduction="mean"``, the
anchors' convention) or summed (``"sum"``). See ``diffrl.loss.effective_clip_range`` for how the PPO clip range is
made independent of the number of elements.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from diffrl.types import Latents, StepOut

Sigma = Union[float, Tensor]
SDE_KINDS = ("flow", "dance", "cps", "ode")
REDUCTIONS = ("mean", "sum")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def append_dims(t: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a ``[B]`` (or scalar) tensor broadcasts against an ``ndim``-D tensor."""
    return t.reshape(t.shape + (1,) * (ndim - t.ndim)) if t.ndim else t


def reduce_elements(t: Tensor, reduction: str = "mean") -> Tensor:
    """``[B, ...] -> [B]``: mean or sum over every non-batch dim."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    dims = tuple(range(1, t.ndim))
    if not dims:
        return t
    return t.mean(dim=dims) if reduction == "mean" else t.sum(dim=dims)


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Union[Tensor, float], reduction: str = "mean") -> Tensor:
    """log N(sample; mean, std^2) per element, reduced over non-batch dims, in fp32.

    sample, mean: ``[B, ...]``. std: scalar, ``[B]`` or broadcastable to ``sample``; must be > 0.
    Returns ``[B]``: ``reduce_d [-(x_d - mu_d)^2 / (2 std^2) - log std - log sqrt(2 pi)]`` (Flow-GRPO).
    """
    x, mu = sample.float(), mean.float()
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    if s.ndim <= 1 and x.ndim > 1 and s.numel() in (1, x.shape[0]):
        # One std per row: reduce the squared error first, then scale ([B] work instead of [B, ...]).
        s = s.reshape(-1)
        sq = reduce_elements((x - mu).square_(), reduction)
        count = 1.0 if reduction == "mean" else x[0].numel()
        return -sq / (2 * s**2) - count * (torch.log(s) + _LOG_SQRT_2PI)
    s = append_dims(s, x.ndim) if s.ndim == 1 and x.ndim > 1 else s
    elementwise = -((x - mu) ** 2) / (2 * s**2) - torch.log(s) - _LOG_SQRT_2PI
    return reduce_elements(elementwise.expand_as(x), reduction)


def _as_batch(value: Sigma, x: Tensor) -> Tensor:
    """A float or ``[B]`` tensor as fp32 ``[B]`` on ``x``'s device."""
    t = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def sde_coefficients(
    x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, kind: str, noise_level: float
) -> tuple[Tensor, Tensor]:
    """Mean ``[B, ...]`` and std ``[B]`` (before any split noise scale) of one rectified-flow step, in fp32.

    flow  (Flow-GRPO, (a)): sigma_t = a sqrt(sigma / (1 - sigma)), sigma -> sigma_next at sigma = 1;
          mean = x + [v + sigma_t^2 / (2 sigma) (x + (1 - sigma) v)] dt, std = sigma_t sqrt(-dt).
    dance (DanceGRPO, (b)): the same drift with sigma_t = eta = a, std = eta sqrt(-dt).
    cps   (coefficients-preserving, (a)): s = sigma_next sin(a pi / 2),
          mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - s^2) x1_hat, std = s.
    ode   (Euler): mean = x + v dt, std = 0.
    """
    nd = x.ndim
    dt = sigma_next - sigma
    if kind == "ode":
        return torch.addcmul(x, append_dims(dt, nd), v), torch.zeros_like(sigma)
    if kind == "cps":
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        coef = torch.sqrt((sigma_next**2 - std**2).clamp_min(0))
        # (1 - s') (x - s v) + coef (x + (1 - s) v), gathered into per-row coefficients of x and v
        c_x, c_v = (1 - sigma_next) + coef, -(1 - sigma_next) * sigma + coef * (1 - sigma)
    elif kind in ("flow", "dance"):
        if kind == "flow":
            sigma_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma >= 1, sigma_next, sigma)))
        else:
            sigma_t = torch.full_like(sigma, noise_level)
        # x + [v + sigma_t^2 / (2 sigma) (x + (1 - sigma) v)] dt, gathered into per-row coefficients of x and v
        drift = sigma_t**2 / (2 * sigma)
        c_x, c_v = 1 + drift * dt, (1 + drift * (1 - sigma)) * dt
        std = sigma_t * torch.sqrt(sigma - sigma_next)
    else:
        raise ValueError(f"unknown SDE kind {kind!r}; choose one of {SDE_KINDS}")
    return torch.addcmul(append_dims(c_x, nd) * x, append_dims(c_v, nd), v), std


def _draw(x: Tensor, noise: Optional[Tensor], generator: Optional[torch.Generator]) -> Tensor:
    if noise is not None:
        if noise.shape != x.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but the latent has {tuple(x.shape)}")
        return noise.float()
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)


def _sample_and_score(
    x: Tensor,
    mean: Tensor,
    std: Tensor,
    noise: Optional[Tensor],
    generator: Optional[torch.Generator],
    x_next: Optional[Tensor],
    reduction: str,
) -> StepOut:
    """Draw ``x_next = mean + std * noise`` (or take the given one) and score it; deterministic rows score 0."""
    if x_next is None:
        eps = _draw(x, noise, generator)
        # Cast before scoring: the log-prob must be of the latent the next step really consumes, so that
        # re-scoring the stored transition with the same model gives a ratio of exactly 1.
        x_next = torch.addcmul(mean, append_dims(std, x.ndim), eps).to(x.dtype)
    stochastic = std > 0
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    log_prob = gaussian_log_prob(x_next, mean, safe_std, reduction)
    return StepOut(x_next=x_next, mean=mean, std=std, log_prob=torch.where(stochastic, log_prob, 0.0))


def sde_step(
    x: Latents,
    velocity: Latents,
    sigma: Sigma,
    sigma_next: Sigma,
    *,
    kind: str = "flow",
    noise_level: float = 0.7,
    noise: Optional[Latents] = None,
    generator: Optional[torch.Generator] = None,
    x_next: Optional[Latents] = None,
    noise_scale: Union[float, Tensor] = 1.0,
    reduction: str = "mean",
) -> StepOut:
    """One rectified-flow step from ``sigma`` to ``sigma_next`` that samples (or re-scores) and returns its log-prob.

    x, velocity: ``[B, ...]`` any rank, or dicts of such tensors (one per stream; log-probs stay per stream).
    sigma, sigma_next: floats or ``[B]``. kind: ``flow`` | ``dance`` | ``cps`` | ``ode`` (see ``sde_coefficients``).
    noise_level: Flow-GRPO's ``a`` / DanceGRPO's ``eta``. noise_scale: float or ``[B]`` std multiplier (BranchGRPO's
    split noise lambda); the log-prob uses the scaled std, i.e. the std the sample was actually drawn with.
    With ``noise`` given, ``x_next = mean + std * noise``. Returns ``StepOut`` with log_prob ``[B]``
    (``reduction`` over non-batch dims; 0 where std = 0), or ``None`` for ``kind="ode"``.
    """
    if noise is not None and x_next is not None:
        raise ValueError("sde_step takes noise (to sample) or x_next (to re-score), not both")
    if isinstance(x, dict):
        return _per_stream(
            lambda k, n, xn: sde_step(
                x[k], velocity[k], sigma, sigma_next, kind=kind, noise_level=noise_level, noise=n,
                generator=generator, x_next=xn, noise_scale=noise_scale, reduction=reduction,
            ),
            x, noise, x_next,
        )
    sig, sig_next = _as_batch(sigma, x), _as_batch(sigma_next, x)
    mean, std = sde_coefficients(x.float(), velocity.float(), sig, sig_next, kind, noise_level)
    if kind == "ode":
        return StepOut(x_next=mean.to(x.dtype), mean=mean, std=std, log_prob=None)
    std = std * _as_batch(noise_scale, x)
    return _sample_and_score(x, mean, std, noise, generator, x_next, reduction)


def _per_stream(step: Callable[[str, Optional[Tensor], Optional[Tensor]], StepOut], x: dict, noise, x_next) -> StepOut:
    """Apply a single-tensor step to each stream of a dict latent and regroup the fields into dicts."""
    outs = {k: step(k, None if noise is None else noise[k], None if x_next is None else x_next[k]) for k in x}
    log_probs = {k: o.log_prob for k, o in outs.items()}
    return StepOut(
        x_next={k: o.x_next for k, o in outs.items()},
        mean={k: o.mean for k, o in outs.items()},
        std={k: o.std for k, o in outs.items()},
        log_prob=None if any(v is None for v in log_probs.values()) else log_probs,
    )


def ddim_step(
    x: Latents,
    model_output: Latents,
    alpha_bar: Sigma,
    alpha_bar_prev: Sigma,
    *,
    eta: float = 1.0,
    prediction_type: str = "epsilon",
    noise: Optional[Latents] = None,
    generator: Optional[torch.Generator] = None,
    x_next: Optional[Latents] = None,
    reduction: str = "mean",
) -> StepOut:
    """DDIM step with log-prob for epsilon-, v- or sample-prediction diffusion models (DDPO, arXiv 2305.13301).

    x, model_output: ``[B, ...]`` (or dicts of streams). alpha_bar, alpha_bar_prev: cumulative alphas of the current
    and the next (less noisy) timestep, floats or ``[B]`` (use 1.0 for the final step's ``alpha_bar_prev``).
    x0 = (x - sqrt(1 - ab) eps) / sqrt(ab); std = eta sqrt((1 - ab') / (1 - ab)) sqrt(1 - ab / ab');
    mean = sqrt(ab') x0 + sqrt(1 - ab' - std^2) eps. Returns ``StepOut`` with log_prob ``[B]`` (0 where std = 0).
    """
    if noise is not None and x_next is not None:
        raise ValueError("ddim_step takes noise (to sample) or x_next (to re-score), not both")
    if isinstance(x, dict):
        return _per_stream(
            lambda k, n, xn: ddim_step(
                x[k], model_output[k], alpha_bar, alpha_bar_prev, eta=eta, prediction_type=prediction_type,
                noise=n, generator=generator, x_next=xn, reduction=reduction,
            ),
            x, noise, x_next,
        )
    nd = x.ndim
    ab, ab_prev = _as_batch(alpha_bar, x), _as_batch(alpha_bar_prev, x)
    a, a_prev = append_dims(ab, nd), append_dims(ab_prev, nd)
    xf, out = x.float(), model_output.float()
    if prediction_type == "epsilon":
        eps = out
        x0 = (xf - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
    elif prediction_type == "v_prediction":
        x0 = torch.sqrt(a) * xf - torch.sqrt(1 - a) * out
        eps = torch.sqrt(a) * out + torch.sqrt(1 - a) * xf
    elif prediction_type == "sample":
        x0 = out
        eps = (xf - torch.sqrt(a) * x0) / torch.sqrt(1 - a)
    else:
        raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
    variance = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    std = eta * torch.sqrt(variance.clamp_min(0))
    mean = torch.sqrt(a_prev) * x0 + torch.sqrt((1 - a_prev - append_dims(std, nd) ** 2).clamp_min(0)) * eps
    return _sample_and_score(x, mean, std, noise, generator, x_next, reduction)
