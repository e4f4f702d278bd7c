"""SANA (SanaPipeline): a linear-attention DiT on a deep-compression autoencoder (DC-AE, x32), conditioned on a
Gemma text encoder's sequence with an attention mask, with classifier-free guidance.

As SanaPipeline does, prompts are encoded behind its default "complex human instruction" (and the unconditional
prompt without it), the timestep is the scheduler's times ``transformer.config.timestep_scale``, and a transformer
with twice the latent channels (learned sigma) has its second half dropped. Rollouts use the flow-matching Euler
step, so the pipeline's own output is reproduced when its scheduler is ``FlowMatchEulerDiscreteScheduler``; a
pipeline shipped with a multistep (DPM-Solver) scheduler samples differently from diffrl's Euler/SDE steps.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor

from diffrl.adapters.base import DiffusersAdapter, load_pipeline


class SanaAdapter(DiffusersAdapter):
    """Wraps a ``SanaPipeline``. Conditioning is ``{"embeds": [n, L, D], "mask": [n, L]}``."""

    def __init__(self, pipe, device: str = "cpu", dtype: str = "float32", max_sequence_length: int = 300,
                 resolution: Optional[int] = None, complex_human_instruction: Optional[list[str]] = None):
        super().__init__(pipe, device, dtype)
        self.max_sequence_length = max_sequence_length
        default = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
        self.complex_human_instruction = default if complex_human_instruction is None else complex_human_instruction
        side = self.transformer.config.sample_size
        self._side = resolution // pipe.vae_scale_factor if resolution else side
        self.native_resolution = side * pipe.vae_scale_factor
        self._uncond: Optional[dict[str, Tensor]] = None

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", dtype: str = "float32", attention: str = "sdpa",
                        max_sequence_length: int = 300, resolution: Optional[int] = None) -> "SanaAdapter":
        """Load a diffusers SANA pipeline from a local folder or a hub id (``HF_HUB_OFFLINE=1`` is respected)."""
        from diffusers import SanaPipeline

        return cls(load_pipeline(SanaPipeline, path, dtype, attention, device), device, dtype, max_sequence_length,
                   resolution)

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """Gemma embeddings and attention masks ``{"embeds": [n, L, D], "mask": [n, L]}``."""
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=self.device,
            max_sequence_length=self.max_sequence_length, complex_human_instruction=self.complex_human_instruction)
        return {"embeds": embeds, "mask": mask}

    @torch.no_grad()
    def unconditional(self) -> dict[str, Tensor]:
        """The empty prompt without the complex human instruction, as SanaPipeline encodes its negative prompt."""
        if self._uncond is None:
            embeds, mask = self.pipe._get_gemma_prompt_embeds(
                prompt=[""], device=self.device, dtype=self.pipe.text_encoder.dtype, clean_caption=False,
                max_sequence_length=self.max_sequence_length, complex_human_instruction=False)
            self._uncond = {"embeds": embeds, "mask": mask}
        return self._uncond

    def _forward(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        c = self.transformer.config
        out = self.transformer(x.to(self.dtype), encoder_hidden_states=cond["embeds"].to(self.dtype),
                               encoder_attention_mask=cond["mask"], timestep=(sigma * 1000) * c.timestep_scale,
                               return_dict=False)[0].float()
        return out.chunk(2, dim=1)[0] if c.out_channels // 2 == c.in_channels else out

    def velocity(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor], guidance_scale: float = 1.0) -> Tensor:
        """``v(x [n, C, h, w], sigma [n])`` in fp32; with guidance > 1 the unconditional and conditional passes run
        as one batch and are combined as v_u + g (v_c - v_u)."""
        return self.guided(self._forward, x, sigma, cond, guidance_scale)
