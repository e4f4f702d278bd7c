"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline): the image family, and the embedded tiny model.

The adapter owns everything SD3-specific: loading, prompt encoding (cached), the velocity call with classifier-free
guidance, the sigma schedule (the pipeline scheduler's own), decoding, and LoRA via peft.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from diffrl.backends import check_attention_backend
from diffrl.guidance import cfg

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model path or hub id cannot be loaded; the message says which and why."""


class SD3Adapter:
    """Wraps a ``StableDiffusion3Pipeline``. Conditioning is a dict ``{"embeds": [n, L, D], "pooled": [n, P]}``."""

    def __init__(self, pipe, device: str = "cpu", dtype: str = "float32", max_sequence_length: int = 77):
        self.pipe = pipe.to(device)
        self.device, self.dtype = torch.device(device), DTYPES[dtype]
        self.transformer = pipe.transformer
        self.max_sequence_length = min(max_sequence_length, pipe.tokenizer_3.model_max_length)
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, self.transformer):
            module.requires_grad_(False).eval()
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", dtype: str = "float32", attention: str = "sdpa",
                        max_sequence_length: int = 77) -> "SD3Adapter":
        """Load a diffusers SD3 pipeline from a local folder or a hub id (``HF_HUB_OFFLINE=1`` is respected)."""
        from diffusers import StableDiffusion3Pipeline

        check_attention_backend(attention, device)
        looks_local = path.startswith((".", "/", "~")) or os.sep in path and not _is_hub_id(path)
        if looks_local and not Path(path).expanduser().is_dir():
            raise ModelLoadError(f"model path {path!r} does not exist (build the tiny model with "
                                 "`python scripts/pretrain_tiny.py`, or give a diffusers folder or hub id)")
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=DTYPES[dtype])
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load an SD3 pipeline from {path!r}: {str(e).splitlines()[0]}") from None
        if attention == "xformers":
            pipe.enable_xformers_memory_efficient_attention()
        return cls(pipe, device, dtype, max_sequence_length)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.transformer.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def sigmas(self, num_steps: int) -> Tensor:
        """``[num_steps + 1]`` fp32 sigmas of the pipeline's own scheduler (shift included), ending at 0."""
        sched = self.pipe.scheduler
        sched.set_timesteps(num_steps, device="cpu")
        return sched.sigmas.float().clone()

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Prompt embeddings ``{"embeds": [n, L, D], "pooled": [n, P]}``, cached per prompt string."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                list(missing), None, None, device=self.device, do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length)
            for i, p in enumerate(missing):
                self._cache[p] = (embeds[i], pooled[i])
        return {"embeds": torch.stack([self._cache[p][0] for p in prompts]),
                "pooled": torch.stack([self._cache[p][1] for p in prompts])}

    def _forward(self, x: Tensor, sigma: Tensor, embeds: Tensor, pooled: Tensor) -> Tensor:
        out = self.transformer(hidden_states=x.to(self.dtype), timestep=(sigma * 1000).to(self.dtype),
                               encoder_hidden_states=embeds.to(self.dtype), pooled_projections=pooled.to(self.dtype),
                               return_dict=False)[0]
        return out.float()

    def velocity(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor], guidance_scale: float = 1.0) -> Tensor:
        """``v(x [n, C, H, W], sigma [n])`` in fp32; with guidance > 1 the unconditional and conditional passes run
        as one batch and are combined as v_u + g (v_c - v_u)."""
        if guidance_scale == 1.0:
            return self._forward(x, sigma, cond["embeds"], cond["pooled"])
        u = self.encode([""])
        n = x.shape[0]
        embeds = torch.cat([u["embeds"].expand(n, -1, -1), cond["embeds"]])
        pooled = torch.cat([u["pooled"].expand(n, -1), cond["pooled"]])
        v_u, v_c = self._forward(torch.cat([x, x]), torch.cat([sigma, sigma]), embeds, pooled).chunk(2)
        return cfg(v_u, v_c, guidance_scale)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """``[n, C, h, w]`` latents -> ``[n, 3, H, W]`` images in [0, 1]."""
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    def add_lora(self, rank: int, alpha: float, targets: Sequence[str]) -> None:
        """Attach trainable LoRA adapters (peft) to the transformer; the reference is the adapters switched off."""
        from peft import LoraConfig

        self.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                                target_modules=list(targets)))
        for name, p in self.transformer.named_parameters():
            p.requires_grad_("lora_" in name)
            if "lora_" in name:
                p.data = p.data.float()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The reference (pre-RL) model: LoRA adapters disabled inside the block."""
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    def lora_state_dict(self) -> dict[str, Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.transformer).items()}

    def load_lora_state_dict(self, state: dict[str, Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(self.transformer, state)

    def save_lora(self, directory: str, state: Optional[dict[str, Tensor]] = None) -> None:
        """Write the LoRA in the diffusers format that ``StableDiffusion3Pipeline.load_lora_weights`` reads."""
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline.save_lora_weights(directory, transformer_lora_layers=state or self.lora_state_dict(),
                                                   safe_serialization=True)


def _is_hub_id(path: str) -> bool:
    """``org/name`` with no local folder of that name."""
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not Path(path).exists()
