"""LTX-2 joint audio-video (LTX2Pipeline): one transformer denoises a video stream and an audio stream together.

The rollout latent of one sample is the two packed streams flattened and concatenated, ``[Nv * Cv + Na * Ca]``
(video tokens ``Nv = F' H' W'`` of ``Cv`` channels, then audio tokens ``Na`` of ``Ca``), so trees, SDE steps and
the trainer run unchanged; ``streams`` names each stream's slice, which gives per-modality log-probs and
advantages (``train.reward_routing``, OmniNFT). Both streams share the pipeline's sigmas (``mu`` from the video
token count, ``shift_terminal``) and take plain classifier-free guidance against ``""``, video and audio each
with their own scale; the pipeline's extra guidance passes (STG, modality isolation, guidance rescale) are not
used. Media are ``{"video": [n, F, 3, H, W], "audio": [n, channels, samples], "fps", "sample_rate"}``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from diffrl.adapters.base import DiffusersAdapter, load_pipeline
from diffrl.guidance import classifier_free_guidance


class LTX2Adapter(DiffusersAdapter):
    """Wraps an ``LTX2Pipeline``. Conditioning is the connectors' output per prompt:
    ``{"video_text": [n, L, D], "audio_text": [n, L, D], "mask": [n, L]}``."""

    FAMILY_GUIDANCE = ("audio_guidance_scale",)

    def __init__(self, pipe, device: str = "cpu", dtype: str = "float32", max_sequence_length: int = 1024,
                 resolution: Optional[int] = None, num_frames: Optional[int] = None, frame_rate: float = 24.0,
                 audio_guidance_scale: Optional[float] = None):
        super().__init__(pipe, device, dtype)
        self.max_sequence_length, self.frame_rate = max_sequence_length, frame_rate
        self.native_resolution = 512
        self.resolution, self.num_frames = resolution or self.native_resolution, num_frames or 121
        t, s = pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio
        if (self.num_frames - 1) % t:
            raise ValueError(f"LTX-2 needs num_frames = {t}k + 1 (the VAE compresses time x{t}), got {self.num_frames}")
        if self.resolution % s:
            raise ValueError(f"LTX-2 needs a resolution divisible by {s}, got {self.resolution}")
        self.audio_guidance_scale = audio_guidance_scale
        self.video_grid = ((self.num_frames - 1) // t + 1, self.resolution // s, self.resolution // s)
        per_second = pipe.audio_sampling_rate / pipe.audio_hop_length / float(pipe.audio_vae_temporal_compression_ratio)
        self.audio_tokens = round(self.num_frames / frame_rate * per_second)
        self.mel_bins = pipe.audio_vae.config.mel_bins // pipe.audio_vae_mel_compression_ratio
        self.video_channels = self.transformer.config.in_channels
        self.audio_channels = pipe.audio_vae.config.latent_channels * self.mel_bins
        nv = int(np.prod(self.video_grid)) * self.video_channels
        self.streams = {"video": slice(0, nv), "audio": slice(nv, nv + self.audio_tokens * self.audio_channels)}

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", dtype: str = "float32", attention: str = "sdpa",
                        max_sequence_length: int = 1024, resolution: Optional[int] = None,
                        num_frames: Optional[int] = None) -> "LTX2Adapter":
        """Load a diffusers LTX-2 pipeline from a local folder or a hub id (``HF_HUB_OFFLINE=1`` is respected)."""
        from diffusers import LTX2Pipeline

        return cls(load_pipeline(LTX2Pipeline, path, dtype, attention, device), device, dtype, max_sequence_length,
                   resolution, num_frames)

    @property
    def latent_shape(self) -> tuple[int]:
        return (self.streams["audio"].stop,)

    @property
    def sequence_length(self) -> int:
        """Video plus audio tokens per sample."""
        return int(np.prod(self.video_grid)) + self.audio_tokens

    def sigmas(self, num_steps: int) -> Tensor:
        """``[num_steps + 1]`` fp32 sigmas as LTX2Pipeline sets them: linspace(1, 1/N, N) shifted by ``mu`` =
        calculate_shift(video tokens) (and stretched to the scheduler's ``shift_terminal``), then 0."""
        return self.shifted_sigmas(num_steps, int(np.prod(self.video_grid)), 1024, 4096, 0.95, 2.05)

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """Gemma hidden states through the pipeline's text connectors (per prompt, so caching them is exact)."""
        embeds, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                                     max_sequence_length=self.max_sequence_length, device=self.device)
        side = getattr(self.pipe.tokenizer, "padding_side", "left") if self.pipe.tokenizer is not None else "left"
        video_text, audio_text, mask = self.pipe.connectors(embeds, mask, padding_side=side)
        return {"video_text": video_text, "audio_text": audio_text, "mask": mask}

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[n, D]`` -> packed video ``[n, Nv, Cv]`` and packed audio ``[n, Na, Ca]``."""
        n = x.shape[0]
        return (x[:, self.streams["video"]].reshape(n, -1, self.video_channels),
                x[:, self.streams["audio"]].reshape(n, self.audio_tokens, self.audio_channels))

    def _forward(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        xv, xa = self.split(x)
        f, h, w = self.video_grid
        t = (sigma * 1000).to(self.dtype)
        v_video, v_audio = self.transformer(
            hidden_states=xv.to(self.dtype), audio_hidden_states=xa.to(self.dtype),
            encoder_hidden_states=cond["video_text"].to(self.dtype),
            audio_encoder_hidden_states=cond["audio_text"].to(self.dtype), timestep=t, sigma=t,
            encoder_attention_mask=cond["mask"], audio_encoder_attention_mask=cond["mask"], num_frames=f, height=h,
            width=w, fps=self.frame_rate, audio_num_frames=self.audio_tokens, use_cross_timestep=True,
            return_dict=False)
        return v_video.float(), v_audio.float()

    def velocity(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor], guidance_scale: float = 1.0) -> Tensor:
        """``v(x [n, D], sigma [n])`` in fp32, both streams in one transformer call, with classifier-free guidance
        per stream (video at ``guidance_scale``, audio at ``audio_guidance_scale``, default the same)."""
        g_audio = guidance_scale if self.audio_guidance_scale is None else self.audio_guidance_scale
        if guidance_scale == 1.0 and g_audio == 1.0:
            v_video, v_audio = self._forward(x, sigma, cond)
        else:
            v_video, v_audio = self._forward(*self.with_unconditional(x, sigma, cond))
            v_video = classifier_free_guidance(*v_video.chunk(2), guidance_scale)
            v_audio = classifier_free_guidance(*v_audio.chunk(2), g_audio)
        return torch.cat([v_video.flatten(1), v_audio.flatten(1)], dim=1)

    def _decode(self, latents: Tensor) -> dict:
        """``[n, D]`` latents -> ``{"video": [n, F, 3, H, W] in [0, 1], "audio": [n, channels, samples], "fps",
        "sample_rate"}`` (the pipeline's denormalisation, VAE decodes and vocoder)."""
        p = self.pipe
        xv, xa = self.split(latents.float())
        f, h, w = self.video_grid
        video = p._unpack_latents(xv, f, h, w, p.transformer_spatial_patch_size, p.transformer_temporal_patch_size)
        video = p._denormalize_latents(video, p.vae.latents_mean, p.vae.latents_std, p.vae.config.scaling_factor)
        timestep = torch.zeros(video.shape[0], device=video.device) if p.vae.config.timestep_conditioning else None
        frames = p.vae.decode(video.to(p.vae.dtype), timestep, return_dict=False)[0].float()
        audio = p._denormalize_audio_latents(xa, p.audio_vae.latents_mean, p.audio_vae.latents_std)
        audio = p._unpack_audio_latents(audio, self.audio_tokens, num_mel_bins=self.mel_bins)
        mel = p.audio_vae.decode(audio.to(p.audio_vae.dtype), return_dict=False)[0]
        return {"video": (frames / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4), "audio": p.vocoder(mel).float(),
                "fps": self.frame_rate, "sample_rate": p.vocoder.config.output_sampling_rate}
