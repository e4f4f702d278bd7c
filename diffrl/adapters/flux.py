"""FLUX.1 (FluxPipeline): packed 2 x 2 latent patches, rotary position ids, a resolution-dependent sigma shift, and
guidance as an embedding (FLUX.1-dev) instead of classifier-free guidance.

The samplers see ordinary ``[n, C, h, w]`` latents; this adapter packs them into FLUX's ``[n, h/2 * w/2, 4C]``
tokens for the transformer and unpacks its output, so trees, log-probs and the trainer are the same as for SD3.
``guidance_scale`` goes to the guidance embedding when the transformer has one (``guidance_embeds``); otherwise a
scale above 1 runs true classifier-free guidance against the empty prompt (FluxPipeline's ``true_cfg_scale`` with
``negative_prompt=""``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from diffrl.adapters.base import DiffusersAdapter, load_pipeline


class FluxAdapter(DiffusersAdapter):
    """Wraps a ``FluxPipeline``. Conditioning is ``{"embeds": [n, L, D], "pooled": [n, P]}``; images are
    ``resolution`` pixels square (default: the pipeline's own default size)."""

    def __init__(self, pipe, device: str = "cpu", dtype: str = "float32", max_sequence_length: int = 512,
                 resolution: Optional[int] = None):
        super().__init__(pipe, device, dtype)
        self.max_sequence_length = min(max_sequence_length, pipe.tokenizer_2.model_max_length)
        self.native_resolution = pipe.default_sample_size * pipe.vae_scale_factor
        self.resolution = resolution or self.native_resolution
        side = 2 * (self.resolution // (pipe.vae_scale_factor * 2))
        if side < 2:
            raise ValueError(f"resolution {self.resolution} is too small for a VAE that downsamples "
                             f"x{pipe.vae_scale_factor} (FLUX needs an even latent side of at least 2)")
        self._side = side
        self._img_ids = pipe._prepare_latent_image_ids(1, side // 2, side // 2, self.device, self.dtype)

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", dtype: str = "float32", attention: str = "sdpa",
                        max_sequence_length: int = 512, resolution: Optional[int] = None) -> "FluxAdapter":
        """Load a diffusers FLUX.1 pipeline from a local folder or a hub id (``HF_HUB_OFFLINE=1`` is respected)."""
        from diffusers import FluxPipeline

        return cls(load_pipeline(FluxPipeline, path, dtype, attention, device), device, dtype, max_sequence_length,
                   resolution)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.transformer.config.in_channels // 4, self._side, self._side)

    def sigmas(self, num_steps: int) -> Tensor:
        """``[num_steps + 1]`` fp32 sigmas exactly as FluxPipeline sets them: linspace(1, 1/N, N) shifted by
        ``mu`` = calculate_shift(image tokens), then 0."""
        return self.shifted_sigmas(num_steps, (self._side // 2) ** 2, 256, 4096, 0.5, 1.15)

    @property
    def sequence_length(self) -> int:
        """Image tokens per sample: FLUX packs 2 x 2 latent patches into one token."""
        return (self._side // 2) ** 2

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """Prompt embeddings ``{"embeds": [n, L, D], "pooled": [n, P]}`` (T5 sequence, CLIP pooled)."""
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
        return {"embeds": embeds, "pooled": pooled}

    def pack(self, x: Tensor) -> Tensor:
        """``[n, C, h, w]`` -> FLUX tokens ``[n, h/2 * w/2, 4C]``."""
        n, c, h, w = x.shape
        return self.pipe._pack_latents(x, n, c, h, w)

    def unpack(self, tokens: Tensor) -> Tensor:
        """FLUX tokens ``[n, h/2 * w/2, 4C]`` -> ``[n, C, h, w]``."""
        n, _, d = tokens.shape
        side = self._side
        return tokens.view(n, side // 2, side // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, d // 4, side,
                                                                                                      side)

    def _forward(self, x: Tensor, sigma: Tensor, embeds: Tensor, pooled: Tensor, guidance: Optional[float]) -> Tensor:
        n = x.shape[0]
        g = None if guidance is None else torch.full((n,), guidance, device=x.device, dtype=torch.float32)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=self.dtype)
        out = self.transformer(hidden_states=self.pack(x.to(self.dtype)), timestep=(sigma * 1000).to(self.dtype) / 1000,
                               guidance=g, pooled_projections=pooled.to(self.dtype),
                               encoder_hidden_states=embeds.to(self.dtype), txt_ids=txt_ids, img_ids=self._img_ids,
                               return_dict=False)[0]
        return self.unpack(out).float()

    def velocity(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor], guidance_scale: float = 1.0) -> Tensor:
        """``v(x [n, C, h, w], sigma [n])`` in fp32: one pass with the guidance embedding (FLUX.1-dev), or the
        unconditional and conditional passes as one batch combined as v_u + g (v_c - v_u) (no embedding, g > 1)."""
        if self.transformer.config.guidance_embeds:
            return self._forward(x, sigma, cond["embeds"], cond["pooled"], guidance_scale)
        forward = lambda x, sigma, c: self._forward(x, sigma, c["embeds"], c["pooled"], None)  # noqa: E731
        return self.guided(forward, x, sigma, cond, guidance_scale)
