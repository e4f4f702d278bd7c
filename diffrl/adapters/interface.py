"""What the trainer, the update, exploration and inference need from a model family: the ``Adapter`` protocol.

``DiffusersAdapter`` (``diffrl.adapters.base``) implements it for diffusers pipelines; a family that is not a
diffusers pipeline implements these members itself and registers under ``model.family: pkg.module:Class``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Adapter(Protocol):
    """A model family as the RL loop uses it. Latents are ``[n, *latent_shape]``; conditioning is a dict of
    ``[n, ...]`` tensors; sigmas run from 1 (noise) to 0 (data)."""

    device: torch.device
    dtype: torch.dtype
    pipe: Any
    """The underlying pipeline (diffusers' for ``DiffusersAdapter``)."""
    denoisers: dict[str, torch.nn.Module]
    """The trained networks by component name (``transformer``; Wan 2.2 also ``transformer_2``)."""
    streams: Optional[dict[str, slice]]
    """Joint latents: the flat element range of each stream (``video``, ``audio``); None for one stream."""
    sharded: bool
    full_finetune: bool

    @property
    def latent_shape(self) -> tuple[int, ...]: ...

    @property
    def sequence_length(self) -> int:
        """Transformer tokens per sample (sequence-length-aware batching)."""

    def sigmas(self, num_steps: int) -> Tensor:
        """``[num_steps + 1]`` fp32 noise levels of the family's schedule, from 1 to 0."""

    def encode(self, prompts: Sequence[str]) -> dict[str, Tensor]: ...

    def velocity(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor], guidance_scale: float = 1.0) -> Tensor:
        """``v(x, sigma)`` in fp32 with classifier-free guidance at ``guidance_scale`` (1: none)."""

    def decode(self, latents: Tensor) -> Any:
        """Media in [0, 1]: images ``[n, 3, H, W]``, videos ``[n, F, 3, H, W]`` or a dict of streams."""

    def add_lora(self, rank: int, alpha: float, targets: Sequence[str]) -> None: ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def named_trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]: ...

    def trained_state_dict(self) -> dict[str, Tensor]: ...

    def load_trained_state_dict(self, state: dict[str, Tensor]) -> None: ...

    def reference(self) -> contextlib.AbstractContextManager:
        """The reference (pre-RL) model inside the block."""

    def using_denoisers(self, denoisers: dict[str, torch.nn.Module]) -> contextlib.AbstractContextManager: ...

    def merged_weights(self) -> dict[str, dict[str, Tensor]]:
        """The denoisers' weights with the LoRA merged in (exploration's low-precision copy starts from them)."""

    def merged_copies(self) -> dict[str, torch.nn.Module]: ...

    def enable_gradient_checkpointing(self) -> None: ...

    def compile(self) -> None:
        """``torch.compile`` of the denoisers' repeated blocks, in place (``model.compile``)."""

    def enable_offload(self) -> None: ...

    def shard(self, cpu_offload: bool = False) -> None: ...

    def export(self, run_dir: str, state: Optional[dict[str, Tensor]] = None) -> str: ...

    def load_lora(self, directory: str) -> None: ...

    def set_family_guidance(self, scales: dict[str, float]) -> None: ...
