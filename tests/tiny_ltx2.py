"""A tiny random LTX-2 (joint audio-video) pipeline built in code (no files, no hub), for the adapter tests.

LTX-2.0 layout at toy size: a Gemma 3 text encoder whose stacked per-layer hidden states go through the text
connectors (one 1-D transformer per stream, with learnable registers), an audio-video DiT with video and audio
streams and a2v / v2a cross-attention, a causal video VAE with the real compression (x32 space, x8 time, so
``num_frames = 8k + 1`` and sides divisible by 32), an audio VAE (mel spectrogram, x4 in time and mel bins) and a
HiFi-GAN-style vocoder (x240: 16 kHz mel hop 160 -> 24 kHz samples). The scheduler is the flow-matching Euler one with
LTX's resolution-dependent exponential shift and terminal stretch.
"""
from __future__ import annotations

VIDEO_LATENT = 8  # video latent channels = transformer in_channels (real: 128)
AUDIO_LATENT, MEL_BINS = 4, 16  # audio latent channels, mel bins (real: 8, 64); packed audio width 4 * 16 / 4 = 16
TEXT_DIM, TEXT_LAYERS = 16, 2  # Gemma hidden size and layers (real Gemma-3-12B: 3840, 48)
REGISTERS = 4  # connector learnable registers; max_sequence_length must be a multiple (real: 128, 1024)


def tiny_ltx2_pipeline(seed: int = 0):
    """A random ``LTX2Pipeline``: call it with ``max_sequence_length`` a multiple of 4 (e.g. 16),
    ``num_frames = 8k + 1``, ``height`` and ``width`` multiples of 32 (e.g. 9 frames at 64 x 96 -> video latents
    ``[8, 2, 2, 3]``, audio latents ``[4, 9, 4]``)."""
    import torch
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors, LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    from tiny_families import gemma_tokenizer

    torch.manual_seed(seed)
    tok = gemma_tokenizer()
    text_encoder = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=Gemma3TextConfig(vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=32,
                                     num_hidden_layers=TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1,
                                     head_dim=8, max_position_embeddings=256, sliding_window=64,
                                     pad_token_id=0, bos_token_id=2, eos_token_id=1),
        vision_config=SiglipVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=8, patch_size=2),
        mm_tokens_per_image=4))
    # text_proj_in: (TEXT_DIM * (layers + 1)) -> TEXT_DIM; each connector's heads * head_dim must be TEXT_DIM.
    connectors = LTX2TextConnectors(caption_channels=TEXT_DIM, text_proj_in_factor=TEXT_LAYERS + 1,
                                    video_connector_num_attention_heads=2, video_connector_attention_head_dim=8,
                                    video_connector_num_layers=1, video_connector_num_learnable_registers=REGISTERS,
                                    audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=8,
                                    audio_connector_num_layers=1, audio_connector_num_learnable_registers=REGISTERS,
                                    connector_rope_base_seq_len=256)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=VIDEO_LATENT, out_channels=VIDEO_LATENT, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, audio_in_channels=AUDIO_LATENT * MEL_BINS // 4,
        audio_out_channels=AUDIO_LATENT * MEL_BINS // 4, audio_num_attention_heads=2, audio_attention_head_dim=8,
        audio_cross_attention_dim=16, num_layers=2, caption_channels=TEXT_DIM)
    vae = AutoencoderKLLTX2Video(
        latent_channels=VIDEO_LATENT, block_out_channels=(16, 32, 64), down_block_types=("LTX2VideoDownBlock3D",) * 3,
        layers_per_block=(1, 1, 1, 1), spatio_temporal_scaling=(True, True, True),
        downsample_type=("spatiotemporal",) * 3, decoder_block_out_channels=(8, 16, 32),
        decoder_layers_per_block=(1, 1, 1, 1), decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False,) * 4, upsample_type=("spatiotemporal",) * 3, upsample_residual=(True,) * 3,
        upsample_factor=(2, 2, 2), patch_size=4, patch_size_t=1)  # x32 space, x8 time
    # latents_mean / latents_std have base_channels entries and normalise the packed [B, L, C * M / 4] audio tokens,
    # so base_channels must equal AUDIO_LATENT * MEL_BINS / 4.
    audio_vae = AutoencoderKLLTX2Audio(base_channels=AUDIO_LATENT * MEL_BINS // 4, output_channels=2, ch_mult=(1, 1, 1),
                                       num_res_blocks=1, latent_channels=AUDIO_LATENT, mel_bins=MEL_BINS)
    vocoder = LTX2Vocoder(in_channels=2 * MEL_BINS, hidden_channels=32, out_channels=2,
                          upsample_kernel_sizes=[12, 11, 16], upsample_factors=[6, 5, 8], resnet_kernel_sizes=[3],
                          resnet_dilations=[[1]])
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)
    return LTX2Pipeline(scheduler=scheduler, vae=vae, audio_vae=audio_vae, text_encoder=text_encoder, tokenizer=tok,
                        connectors=connectors, transformer=transformer, vocoder=vocoder)


# Call kwargs: CFG and every extra guidance pass off (STG, modality isolation and guidance rescale are on by default),
# and a short text sequence (a multiple of the connectors' 4 registers).
FAST_CALL = dict(guidance_scale=1.0, audio_guidance_scale=1.0, stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0,
                 audio_modality_scale=1.0, guidance_rescale=0.0, audio_guidance_rescale=0.0, max_sequence_length=16)


if __name__ == "__main__":
    import sys
    import time

    import torch

    torch.set_num_threads(1)
    t = time.perf_counter()
    import diffusers.pipelines.ltx2  # noqa: F401  (the lazy diffusers / transformers imports, timed apart)
    import transformers.models.gemma3  # noqa: F401

    t0 = time.perf_counter()
    pipe = tiny_ltx2_pipeline()
    t1 = time.perf_counter()
    cfg = "--cfg" in sys.argv  # exercise the CFG (negative + positive batch) path too
    kw = dict(FAST_CALL, guidance_scale=3.0, audio_guidance_scale=7.0) if cfg else FAST_CALL
    video, audio = pipe(prompt="a red circle", num_frames=9, height=64, width=96, num_inference_steps=2,
                        output_type="pt", generator=torch.Generator().manual_seed(0), return_dict=False, **kw)
    t2 = time.perf_counter()
    print(f"video {tuple(video.shape)} {video.dtype} [{video.min():.3f}, {video.max():.3f}]")
    print(f"audio {tuple(audio.shape)} {audio.dtype} at {pipe.vocoder.config.output_sampling_rate} Hz")
    print(f"imports {t0 - t:.2f} s, build {t1 - t0:.2f} s, call {t2 - t1:.2f} s (cfg={cfg})")
