"""Wan 2.1 / 2.2 text-to-video (WanPipeline): 5-D latents ``[C, (F - 1) / 4 + 1, H / 8, W / 8]``, a UMT5 text
encoder, classifier-free guidance, and for Wan 2.2 two experts split at ``boundary_ratio``.

Wan 2.2: the high-noise expert (``transformer``) runs where the timestep is at or above ``boundary_ratio`` x 1000,
the low-noise one (``transformer_2``) below, each with its own guidance scale, as WanPipeline does; both carry a
LoRA, so the expert active at a step is the one that step's loss trains. ``expand_timesteps`` models (Wan 2.2 5B)
get the timestep per latent token. Media are videos ``[n, F, 3, H, W]`` in [0, 1]. Rollouts use the
flow-matching Euler step on the scheduler's sigmas, so WanPipeline's output is reproduced when its scheduler is
``FlowMatchEulerDiscreteScheduler`` (the shipped UniPC multistep scheduler samples differently).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from diffrl.adapters.base import DiffusersAdapter, load_pipeline


class WanAdapter(DiffusersAdapter):
    """Wraps a ``WanPipeline``. Conditioning is ``{"embeds": [n, L, D]}``."""

    FAMILY_GUIDANCE = ("guidance_scale_2",)

    def __init__(self, pipe, device: str = "cpu", dtype: str = "float32", max_sequence_length: int = 226,
                 resolution: Optional[int] = None, num_frames: Optional[int] = None,
                 guidance_scale_2: Optional[float] = None):
        super().__init__(pipe, device, dtype)
        self.max_sequence_length = max_sequence_length
        self.native_resolution = 480  # Wan 2.1 / 2.2's 480p (the 14B models also train at 720p)
        self.resolution = resolution or self.native_resolution
        self.num_frames = num_frames or 81
        t = pipe.vae_scale_factor_temporal
        if (self.num_frames - 1) % t:
            raise ValueError(f"Wan needs num_frames = {t}k + 1 (the VAE compresses time x{t}), got {self.num_frames}")
        s = pipe.vae_scale_factor_spatial
        if self.resolution % (2 * s):
            raise ValueError(f"Wan needs a resolution divisible by {2 * s}, got {self.resolution}")
        self.guidance_scale_2 = guidance_scale_2
        ratio = pipe.config.boundary_ratio
        self.boundary = None if ratio is None else ratio * pipe.scheduler.config.num_train_timesteps

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", dtype: str = "float32", attention: str = "sdpa",
                        max_sequence_length: int = 226, resolution: Optional[int] = None,
                        num_frames: Optional[int] = None) -> "WanAdapter":
        """Load a diffusers Wan pipeline from a local folder or a hub id (``HF_HUB_OFFLINE=1`` is respected)."""
        from diffusers import WanPipeline

        return cls(load_pipeline(WanPipeline, path, dtype, attention, device), device, dtype, max_sequence_length,
                   resolution, num_frames)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        p, side = self.pipe, self.resolution // self.pipe.vae_scale_factor_spatial
        return (self.transformer.config.in_channels, (self.num_frames - 1) // p.vae_scale_factor_temporal + 1, side,
                side)

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """UMT5 embeddings ``{"embeds": [n, L, D]}``."""
        embeds, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length, device=self.device)
        return {"embeds": embeds}

    def _forward(self, model, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        t = sigma * 1000
        if self.pipe.config.expand_timesteps:
            tokens = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)
            t = t[:, None].expand(-1, tokens)
        return model(hidden_states=x.to(self.dtype), timestep=t, encoder_hidden_states=cond["embeds"].to(self.dtype),
                     return_dict=False)[0].float()

    def _expert_velocity(self, model, scale: float, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.guided(lambda x, sigma, c: self._forward(model, x, sigma, c), x, sigma, cond, scale)

    def velocity(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor], guidance_scale: float = 1.0) -> Tensor:
        """``v(x [n, C, F, h, w], sigma [n])`` in fp32, each row through the expert of its timestep (Wan 2.2) with
        classifier-free guidance v_u + g (v_c - v_u) when its scale is above 1."""
        if self.boundary is None:
            return self._expert_velocity(self.transformer, guidance_scale, x, sigma, cond)
        high = sigma * 1000 >= self.boundary
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        scale_2 = guidance_scale if self.guidance_scale_2 is None else self.guidance_scale_2
        for rows, model, scale in ((high, self.transformer, guidance_scale),
                                   (~high, self.denoisers["transformer_2"], scale_2)):
            if rows.any():
                part = {k: v[rows] for k, v in cond.items()}
                out[rows] = self._expert_velocity(model, scale, x[rows], sigma[rows], part)
        return out

    def _decode(self, latents: Tensor) -> Tensor:
        """``[n, C, f, h, w]`` latents -> videos ``[n, F, 3, H, W]`` in [0, 1]."""
        vae = self.pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
        video = vae.decode((latents.float() * std + mean).to(vae.dtype), return_dict=False)[0].float()
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
