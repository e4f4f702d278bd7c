"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline): the image family, and the embedded tiny model.

The adapter owns everything SD3-specific: prompt encoding (cached), the velocity call with classifier-free guidance,
the sigma schedule (the pipeline scheduler's own) and decoding; loading and LoRA come from ``DiffusersAdapter``.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from diffrl.adapters.base import DiffusersAdapter, ModelLoadError, load_pipeline

__all__ = ["SD3Adapter", "ModelLoadError"]


def check_resolution(resolution: int, vae_scale_factor: int, config) -> None:
    """A ``ValueError`` in one sentence unless ``resolution`` pixels are a whole number of patches
    (``vae_scale_factor * patch_size``) within the position embedding (``pos_embed_max_size`` patches, when set)."""
    step = vae_scale_factor * config.patch_size
    largest = config.get("pos_embed_max_size") and config.pos_embed_max_size * step
    if resolution % step or (largest and resolution > largest):
        raise ValueError(f"'model.resolution' must be a multiple of {step} pixels (VAE factor x patch size)"
                         + (f" and at most {largest}" if largest else "") + f" for this model, got {resolution}")


class SD3Adapter(DiffusersAdapter):
    """Wraps a ``StableDiffusion3Pipeline``. Conditioning is a dict ``{"embeds": [n, L, D], "pooled": [n, P]}``."""

    def __init__(self, pipe, device: str = "cpu", dtype: str = "float32", max_sequence_length: int = 77,
                 resolution: Optional[int] = None):
        super().__init__(pipe, device, dtype)
        self.max_sequence_length = min(max_sequence_length, pipe.tokenizer_3.model_max_length)
        if resolution:
            check_resolution(resolution, pipe.vae_scale_factor, self.transformer.config)
        self._side = resolution // pipe.vae_scale_factor if resolution else self.transformer.config.sample_size
        self.native_resolution = self.transformer.config.sample_size * pipe.vae_scale_factor

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", dtype: str = "float32", attention: str = "sdpa",
                        max_sequence_length: int = 77, resolution: Optional[int] = None) -> "SD3Adapter":
        """Load a diffusers SD3 pipeline from a local folder or a hub id (``HF_HUB_OFFLINE=1`` is respected);
        ``resolution`` (pixels, square) defaults to the transformer's sample size."""
        from diffusers import StableDiffusion3Pipeline

        return cls(load_pipeline(StableDiffusion3Pipeline, path, dtype, attention, device), device, dtype,
                   max_sequence_length, resolution)

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """Prompt embeddings ``{"embeds": [n, L, D], "pooled": [n, P]}``."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=self.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return {"embeds": embeds, "pooled": pooled}

    def _forward(self, x: Tensor, sigma: Tensor, embeds: Tensor, pooled: Tensor) -> Tensor:
        out = self.transformer(hidden_states=x.to(self.dtype), timestep=(sigma * 1000).to(self.dtype),
                               encoder_hidden_states=embeds.to(self.dtype), pooled_projections=pooled.to(self.dtype),
                               return_dict=False)[0]
        return out.float()

    def velocity(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor], guidance_scale: float = 1.0) -> Tensor:
        """``v(x [n, C, H, W], sigma [n])`` in fp32; with guidance > 1 the unconditional and conditional passes run
        as one batch and are combined as v_u + g (v_c - v_u)."""
        forward = lambda x, sigma, c: self._forward(x, sigma, c["embeds"], c["pooled"])  # noqa: E731
        return self.guided(forward, x, sigma, cond, guidance_scale)
