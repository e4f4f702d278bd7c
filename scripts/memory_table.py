"""Training memory per GPU for diffrl's model families: arithmetic, not measured.

For each family config (SD3.5-Medium, FLUX.1-dev, Sana 1600M, Wan2.1 T2V 1.3B, Wan2.2 T2V A14B, LTX-2) it prints a
markdown table: LoRA (the config's ``lora_rank`` and ``lora_targets``) and full fine-tuning (``lora_rank: 0``), each on
1 GPU and under FSDP over ``--gpus`` GPUs, with the bytes of the frozen denoiser weights, the frozen reference, the
trainable weights, their gradients, AdamW's moments, the text encoders + VAE, the activations of one training forward
with gradient checkpointing, and the total per GPU.

Nothing runs on a GPU and no weights are loaded:

* parameter counts: the diffusers transformer classes instantiated on the ``meta`` device with the published
  ``transformer/config.json`` values hard-coded below (shapes only, no memory, no compute);
* LoRA parameters: peft's target rule (a module named ``t`` or ending in ``.t`` for a target ``t``) over the
  ``nn.Linear`` modules of that meta model, ``rank x (in + out)`` each;
* text encoders and VAEs: parameter counts hard-coded below (each counted once by instantiating its class on the meta
  device with the published config; the published round figure is in the comment);
* activations: per block boundary the hidden state(s) kept by gradient checkpointing, ``[rows, tokens, hidden]`` in
  bf16, plus the saved-for-backward tensors of one block (the largest; the one being recomputed) and of the layers
  outside the blocks. The block's saved tensors are counted by running a 3-4 block copy of the transformer forward
  on the meta device at the real batch and token counts under ``torch.autograd.graph.saved_tensors_hooks`` (distinct
  storages, parameters excluded), with LoRA attached by peft as diffrl attaches it, and with
  ``scaled_dot_product_attention`` counted as a FlashAttention-style kernel (it keeps q, k, v, the output and an fp32
  log-sum-exp, no T x T matrix).

Run: ``python scripts/memory_table.py [--out FILE] [--gpus 8] [--moments param|fp32] [--configs NAME ...]``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GB = 1e9
"""Decimal gigabytes, as the configs' own memory comments use."""
BF16, FP32 = 2, 4

# ---------------------------------------------------------------------------------------------------------------
# Published transformer configs (transformer/config.json of each hub repo; the keys that change parameter shapes).
# ---------------------------------------------------------------------------------------------------------------

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (SD3Transformer2DModel). Published size "2.5B":
# 2.24B parameters + the 384 x 384 x 1536 positional table, a buffer (0.23B).
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=list(range(13)), qk_norm="rms_norm")

# black-forest-labs/FLUX.1-dev, transformer/config.json (FluxTransformer2DModel). Published size "12B".
FLUX1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=[16, 56, 56])

# Efficient-Large-Model/Sana_1600M_1024px_diffusers, transformer/config.json (SanaTransformer2DModel): diffusers'
# scripts/convert_sana_to_diffusers.py, model_kwargs["SanaMS_1600M_P1_D20"] with its transformer_kwargs (Sana 1.0:
# no qk_norm; sample_size 1024 // 32). Published size "1.6B".
SANA_1600M = dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                  num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                  caption_channels=2304, mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1,
                  norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None, qk_norm=None)

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json (WanTransformer3DModel): diffusers'
# scripts/convert_wan_to_diffusers.py, "Wan-T2V-1.3B". Published name "1.3B"; the architecture has 1.42B parameters
# (1,418,996,800; tests/test_memory_table.py derives it in closed form).
WAN21_1_3B = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                  rope_max_seq_len=1024)

# Wan-AI/Wan2.2-T2V-A14B-Diffusers, transformer/config.json and transformer_2/config.json (two identical experts;
# boundary_ratio 0.875 in model_index.json): diffusers' scripts/convert_wan_to_diffusers.py, "Wan2.2-T2V-A14B".
# Published: "A14B", 14B active of 27B in all.
WAN22_A14B = dict(WAN21_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)

# Lightricks/LTX-2, transformer/config.json (LTX2VideoTransformer3DModel): diffusers'
# scripts/convert_ltx2_to_diffusers.py, get_ltx2_transformer_config("2.0"). Published size "19B" (video + audio).
LTX2 = dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
            attention_head_dim=128, cross_attention_dim=4096, vae_scale_factors=[8, 32, 32], pos_embed_max_pos=20,
            base_height=2048, base_width=2048, audio_in_channels=128, audio_out_channels=128, audio_patch_size=1,
            audio_patch_size_t=1, audio_num_attention_heads=32, audio_attention_head_dim=64,
            audio_cross_attention_dim=2048, audio_scale_factor=4, audio_pos_embed_max_pos=20,
            audio_sampling_rate=16000, audio_hop_length=160, num_layers=48, activation_fn="gelu-approximate",
            qk_norm="rms_norm_across_heads", norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=3840,
            attention_bias=True, attention_out_bias=True, rope_theta=10000.0, rope_double_precision=True,
            causal_offset=1, timestep_scale_multiplier=1000, cross_attn_timestep_scale_multiplier=1000,
            rope_type="split")

# ---------------------------------------------------------------------------------------------------------------
# Text encoders, connectors, VAEs and vocoder: parameter counts. Each was counted by instantiating the class on the
# meta device with the published config named here (transformers 5.x / diffusers 0.42); the round figure is the
# published one.
# ---------------------------------------------------------------------------------------------------------------

# T5EncoderModel, google/t5-v1_1-xxl (d_model 4096, d_ff 10240, 24 layers, 64 heads, vocab 32128): "4.7B".
T5_XXL_ENCODER = 4_762_310_656
# UMT5EncoderModel, google/umt5-xxl (as T5-XXL, vocab 256384): "5.7B" (configs/wan21_t2v_1.3b.yaml).
UMT5_XXL_ENCODER = 5_680_910_336
# CLIPTextModel, openai/clip-vit-large-patch14 text tower (768 wide, 12 layers): "123M" (FLUX text_encoder).
CLIP_L = 123_060_480
# CLIPTextModelWithProjection, the same tower + 768 x 768 projection (SD3 text_encoder).
CLIP_L_PROJ = 123_650_304
# CLIPTextModelWithProjection, OpenCLIP ViT-bigG/14 text tower (1280 wide, 32 layers) + projection: "695M".
CLIP_G_PROJ = 694_659_840
# Gemma2Model (the decoder SanaPipeline keeps), google/gemma-2-2b-it (2304 wide, 26 layers, vocab 256000): "2.6B".
GEMMA2_2B = 2_614_341_888
# Gemma3ForConditionalGeneration, google/gemma-3-12b-it (text 3840 wide, 48 layers, vocab 262208, tied head; SigLIP
# vision tower 1152 wide, 27 layers): "12B" (12.2B with the 0.4B vision tower). LTX2Pipeline's text_encoder.
GEMMA3_12B = 12_202_563_392
# LTX2TextConnectors, Lightricks/LTX-2 connectors/config.json (diffusers get_ltx2_connectors_config("2.0"): a
# 188160 -> 3840 input projection, then 2 + 2 connector blocks 3840 wide). diffrl keeps it with the text encoders.
LTX2_CONNECTORS = 1_431_475_200
# AutoencoderKL, SD3.5 / FLUX.1 vae/config.json (16 latent channels, blocks 128-256-512-512, no quant convs): "84M".
VAE_SD3_FLUX = 83_819_683
# AutoencoderDC, dc-ae-f32c32-sana-1.0 (diffusers scripts/convert_dcae_to_diffusers.py): Sana's DC-AE.
DCAE_F32C32 = 312_250_275
# AutoencoderKLWan, Wan2.1_VAE (diffusers defaults: base_dim 96, z_dim 16); Wan2.2 A14B ships the same VAE: "127M".
WAN_VAE = 126_892_531
# AutoencoderKLLTX2Video, Lightricks/LTX-2 vae/config.json (get_ltx2_video_vae_config("2.0")).
LTX2_VIDEO_VAE = 1_222_479_601
# AutoencoderKLLTX2Audio, Lightricks/LTX-2 audio_vae/config.json (get_ltx2_audio_vae_config("2.0")).
LTX2_AUDIO_VAE = 53_248_146
# LTX2Vocoder, Lightricks/LTX-2 vocoder/config.json (get_ltx2_vocoder_config("2.0")).
LTX2_VOCODER = 55_592_802


# ---------------------------------------------------------------------------------------------------------------
# Families: geometry (tokens per block boundary), the trace inputs and block structure.
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Geometry:
    """What one training forward carries: ``streams`` are (name, tokens, hidden) kept at every block boundary;
    ``sequence_length`` is the adapter's tokens per sample (what ``train.tokens_per_batch`` counts)."""

    streams: list[tuple[str, int, int]]
    sequence_length: int
    shapes: dict[str, int]
    text: str


@dataclass
class Family:
    key: str
    title: str
    config: str
    model_class: str
    transformer: dict
    experts: int
    encoders: list[tuple[str, int]]
    decoders: list[tuple[str, int]]
    geometry: Callable[[Any], Geometry]
    reduced: Callable[[dict], dict]
    """Transformer kwargs of the 3-4 block copy traced for activations (block 1 has block 0's type)."""
    blocks: Callable[[torch.nn.Module], list]
    """The model's transformer blocks, in order."""
    block_types: Callable[[dict], list[tuple[int, int, str]]]
    """(index in the traced copy, how many the full model has, label) per block type."""
    inputs: Callable[[int, Geometry], dict]
    published: str = ""
    """The published size, for comparison with the count."""
    one_pass_guidance: bool = False
    """Guidance is an embedding (FLUX.1-dev): one pass per forward, not CFG's two."""


def _meta(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def _sd3_geometry(cfg) -> Geometry:
    t = SD35_MEDIUM
    res = cfg.model.resolution or t["sample_size"] * 8
    side = res // 8
    tokens = (side // t["patch_size"]) ** 2
    text = 77 + 77  # CLIP-L/G 77 tokens + T5 at diffrl's SD3Adapter max_sequence_length 77, joined in every block
    hidden = t["num_attention_heads"] * t["attention_head_dim"]
    return Geometry([("image", tokens, hidden), ("text", text, hidden)], tokens, dict(side=side, text=text),
                    f"{res} px -> {side}x{side} latent, patch 2 -> {tokens} image tokens + {text} text tokens "
                    f"(CLIP 77 + T5 77) in both streams, hidden {hidden}")


def _flux_geometry(cfg) -> Geometry:
    t = FLUX1_DEV
    res = cfg.model.resolution or 1024
    side = 2 * (res // 16)
    tokens = (side // 2) ** 2
    text = 512  # diffrl's FluxAdapter max_sequence_length
    hidden = t["num_attention_heads"] * t["attention_head_dim"]
    return Geometry([("image", tokens, hidden), ("text", text, hidden)], tokens, dict(tokens=tokens, text=text),
                    f"{res} px -> {side}x{side} latent packed 2x2 -> {tokens} image tokens + {text} T5 tokens "
                    f"(double blocks: two streams; single blocks: one joined stream), hidden {hidden}")


def _sana_geometry(cfg) -> Geometry:
    t = SANA_1600M
    res = cfg.model.resolution or t["sample_size"] * 32
    side = res // 32
    tokens = side ** 2
    hidden = t["num_attention_heads"] * t["attention_head_dim"]
    return Geometry([("image", tokens, hidden)], tokens, dict(side=side, text=300),
                    f"{res} px -> DC-AE f32 {side}x{side} latent, patch 1 -> {tokens} image tokens, hidden {hidden}; "
                    f"300 Gemma tokens for cross-attention (shared by all blocks)")


def _wan_geometry(t: dict) -> Callable[[Any], Geometry]:
    def geometry(cfg) -> Geometry:
        res, frames = cfg.model.resolution or 480, cfg.model.num_frames or 81
        f, side = (frames - 1) // 4 + 1, res // 8
        tokens = f * (side // 2) ** 2
        hidden = t["num_attention_heads"] * t["attention_head_dim"]
        return Geometry([("video", tokens, hidden)], tokens, dict(f=f, side=side, text=226),
                        f"{frames} frames at {res}x{res} -> {f}x{side}x{side} latent, patch 1x2x2 -> {tokens} tokens, "
                        f"hidden {hidden}; 226 UMT5 tokens for cross-attention (shared by all blocks)")
    return geometry


def _ltx2_geometry(cfg) -> Geometry:
    t = LTX2
    res, frames, fps = cfg.model.resolution or 512, cfg.model.num_frames or 121, 24.0
    grid = ((frames - 1) // 8 + 1, res // 32, res // 32)
    video = math.prod(grid)
    # LTX2Adapter: round(frames / fps x sampling_rate / hop_length / audio VAE temporal compression 4)
    audio = round(frames / fps * t["audio_sampling_rate"] / t["audio_hop_length"] / 4)
    hv = t["num_attention_heads"] * t["attention_head_dim"]
    ha = t["audio_num_attention_heads"] * t["audio_attention_head_dim"]
    return Geometry([("video", video, hv), ("audio", audio, ha)], video + audio,
                    dict(f=grid[0], h=grid[1], w=grid[2], audio=audio, text=1024),
                    f"{frames} frames at {res}x{res} -> {grid[0]}x{grid[1]}x{grid[2]} = {video} video tokens (hidden "
                    f"{hv}) + {audio} audio tokens (hidden {ha}); 1024 text tokens per stream for cross-attention")


def _wan_family(key: str, title: str, config: str, t: dict, experts: int, published: str) -> Family:
    return Family(
        key, title, config, "WanTransformer3DModel", t, experts, [("UMT5-XXL encoder", UMT5_XXL_ENCODER)],
        [("Wan VAE", WAN_VAE)], _wan_geometry(t), lambda t: dict(t, num_layers=3), lambda m: list(m.blocks),
        lambda t: [(1, t["num_layers"], "block")],
        lambda rows, g: dict(hidden_states=_meta(rows, 16, g.shapes["f"], g.shapes["side"], g.shapes["side"]),
                             timestep=_meta(rows), encoder_hidden_states=_meta(rows, 226, 4096)), published)


FAMILIES = [
    Family("sd35_medium_ocr_grpo", "SD3.5-Medium", "configs/sd35_medium_ocr_grpo.yaml", "SD3Transformer2DModel",
           SD35_MEDIUM, 1,
           [("CLIP-L", CLIP_L_PROJ), ("CLIP-G", CLIP_G_PROJ), ("T5-XXL encoder", T5_XXL_ENCODER)],
           [("VAE", VAE_SD3_FLUX)], _sd3_geometry,
           lambda t: dict(t, num_layers=4, dual_attention_layers=[0, 1]),
           lambda m: list(m.transformer_blocks),
           lambda t: [(1, len(t["dual_attention_layers"]), "joint + dual attention"),
                      (2, t["num_layers"] - len(t["dual_attention_layers"]) - 1, "joint"), (3, 1, "last")],
           lambda rows, g: dict(hidden_states=_meta(rows, 16, g.shapes["side"], g.shapes["side"]),
                                encoder_hidden_states=_meta(rows, g.shapes["text"], 4096),
                                pooled_projections=_meta(rows, 2048), timestep=_meta(rows)),
           "2.5B, the positional table included"),
    Family("flux1_dev", "FLUX.1-dev", "configs/flux1_dev.yaml", "FluxTransformer2DModel", FLUX1_DEV, 1,
           [("CLIP-L", CLIP_L), ("T5-XXL encoder", T5_XXL_ENCODER)], [("VAE", VAE_SD3_FLUX)], _flux_geometry,
           lambda t: dict(t, num_layers=2, num_single_layers=2),
           lambda m: list(m.transformer_blocks) + list(m.single_transformer_blocks),
           lambda t: [(1, t["num_layers"], "double"), (3, t["num_single_layers"], "single")],
           lambda rows, g: dict(hidden_states=_meta(rows, g.shapes["tokens"], 64),
                                encoder_hidden_states=_meta(rows, g.shapes["text"], 4096),
                                pooled_projections=_meta(rows, 768), timestep=_meta(rows),
                                img_ids=_meta(g.shapes["tokens"], 3), txt_ids=_meta(g.shapes["text"], 3),
                                guidance=_meta(rows)),
           "12B", one_pass_guidance=True),
    Family("sana_1600m", "Sana 1600M", "configs/sana_1600m.yaml", "SanaTransformer2DModel", SANA_1600M, 1,
           [("Gemma-2-2B", GEMMA2_2B)], [("DC-AE f32c32", DCAE_F32C32)], _sana_geometry,
           lambda t: dict(t, num_layers=3), lambda m: list(m.transformer_blocks),
           lambda t: [(1, t["num_layers"], "block")],
           lambda rows, g: dict(hidden_states=_meta(rows, 32, g.shapes["side"], g.shapes["side"]),
                                encoder_hidden_states=_meta(rows, g.shapes["text"], 2304), timestep=_meta(rows),
                                encoder_attention_mask=_meta(rows, g.shapes["text"])), "1.6B"),
    _wan_family("wan21_t2v_1.3b", "Wan2.1 T2V 1.3B", "configs/wan21_t2v_1.3b.yaml", WAN21_1_3B, 1,
                "1.3B, the model's name"),
    _wan_family("wan22_t2v_a14b", "Wan2.2 T2V A14B (two experts, both trained)", "configs/wan22_t2v_a14b.yaml",
                WAN22_A14B, 2, "A14B: 14B per expert, 27B in all"),
    Family("ltx2_t2av", "LTX-2 (joint audio-video)", "configs/ltx2_t2av.yaml", "LTX2VideoTransformer3DModel", LTX2, 1,
           [("Gemma 3 12B", GEMMA3_12B), ("text connectors", LTX2_CONNECTORS)],
           [("video VAE", LTX2_VIDEO_VAE), ("audio VAE", LTX2_AUDIO_VAE), ("vocoder", LTX2_VOCODER)],
           _ltx2_geometry, lambda t: dict(t, num_layers=3), lambda m: list(m.transformer_blocks),
           lambda t: [(1, t["num_layers"], "block")],
           lambda rows, g: dict(hidden_states=_meta(rows, g.sequence_length - g.shapes["audio"], 128),
                                audio_hidden_states=_meta(rows, g.shapes["audio"], 128),
                                encoder_hidden_states=_meta(rows, g.shapes["text"], 3840),
                                audio_encoder_hidden_states=_meta(rows, g.shapes["text"], 3840),
                                timestep=_meta(rows), sigma=_meta(rows),
                                encoder_attention_mask=_meta(rows, g.shapes["text"]),
                                audio_encoder_attention_mask=_meta(rows, g.shapes["text"]),
                                num_frames=g.shapes["f"], height=g.shapes["h"], width=g.shapes["w"], fps=24.0,
                                audio_num_frames=g.shapes["audio"], use_cross_timestep=True),
           "19B"),
]


# ---------------------------------------------------------------------------------------------------------------
# Counting.
# ---------------------------------------------------------------------------------------------------------------

def build(model_class: str, kwargs: dict) -> torch.nn.Module:
    """The diffusers class on the meta device in bf16 (the configs' ``model.dtype``), with the class's
    ``_keep_in_fp32_modules`` in fp32 as ``from_pretrained(torch_dtype=torch.bfloat16)`` leaves them (Wan)."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, model_class)(**kwargs)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if any(k in name.split(".") for k in keep) else torch.bfloat16)
    for module in model.modules():
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point():
                setattr(module, name, b.to(torch.bfloat16))
    return model


def matches_target(name: str, targets: Sequence[str]) -> bool:
    """peft's rule for a list of ``target_modules``: the module's full name is a target or ends in ``.target``."""
    return name in targets or any(name.endswith(f".{t}") for t in targets)


def lora_parameters(model: torch.nn.Module, targets: Sequence[str], rank: int) -> tuple[int, int]:
    """(LoRA parameters, adapted modules): ``rank x (in + out)`` per targeted ``nn.Linear`` (A: r x in, B: out x r).
    A target matching anything but an ``nn.Linear`` is an error (peft would adapt it with other shapes)."""
    total = count = 0
    for name, module in model.named_modules():
        if name and matches_target(name, targets):
            if not isinstance(module, torch.nn.Linear):
                raise ValueError(f"LoRA target {name} is a {type(module).__name__}, not an nn.Linear")
            total += rank * (module.in_features + module.out_features)
            count += 1
    return total, count


@dataclass
class Counts:
    """Per denoiser (one expert). Bytes as loaded in bf16 (fp32 where the class keeps modules in fp32)."""

    params: int
    param_bytes: int
    buffers: int
    buffer_bytes: int
    lora: int
    lora_modules: int
    largest_block: int


def count(family: Family, targets: Sequence[str], rank: int) -> Counts:
    model = build(family.model_class, family.transformer)
    lora, modules = lora_parameters(model, targets, rank)
    ps, bs = list(model.parameters()), list(model.buffers())
    return Counts(sum(p.numel() for p in ps), sum(p.numel() * p.element_size() for p in ps),
                  sum(b.numel() for b in bs), sum(b.numel() * b.element_size() for b in bs), lora, modules,
                  max(sum(p.numel() for p in b.parameters()) for b in family.blocks(model)))


class _FlashLike(torch.autograd.Function):
    """Stands in for ``scaled_dot_product_attention`` in the trace: what a FlashAttention-style kernel keeps for the
    backward (q, k, v, the output and an fp32 log-sum-exp per query and head), never the T x T matrix."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the trace never runs a backward
        raise RuntimeError("shape-only trace")


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FlashLike.apply(query, key, value)


def saved_bytes(model: torch.nn.Module, blocks: list, inputs: dict) -> dict[Optional[int], int]:
    """Bytes of the distinct non-parameter storages autograd saves for the backward during one forward, keyed by the
    index of the block running when each was first saved (None: outside the blocks)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, tuple[int, Optional[int]]] = {}
    where: list[Optional[int]] = [None]

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params and key not in seen:
            seen[key] = (t.untyped_storage().nbytes(), where[0])
        return t

    hooks = []
    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i)))
        hooks.append(block.register_forward_hook(lambda m, a, o: where.__setitem__(0, None)))
    sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, _sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**inputs, return_dict=False)
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    out: dict[Optional[int], int] = defaultdict(int)
    for nbytes, block in seen.values():
        out[block] += nbytes
    return dict(out)


@dataclass
class Activations:
    boundary: float
    """Bytes kept per block boundary by gradient checkpointing."""
    blocks: int
    block: float
    """Saved bytes of the largest block (recomputed one at a time)."""
    outside: float
    no_checkpointing: float
    """All blocks' saved bytes at once, for comparison."""

    @property
    def checkpointed(self) -> float:
        return self.blocks * self.boundary + self.block + self.outside


def activations(family: Family, geometry: Geometry, rows: int, lora: Optional[tuple[int, float, Sequence[str]]]
                ) -> Activations:
    """Activation bytes of one training forward of ``rows`` rows. ``lora``: (rank, alpha, targets) attached by peft
    as diffrl's ``add_lora`` does (fp32 adapters, base frozen); None: full fine-tuning (every weight trained)."""
    reduced = family.reduced(family.transformer)
    model = build(family.model_class, reduced)
    if lora is None:
        model.requires_grad_(True)
    else:
        from diffrl.adapters.base import attach_lora

        with torch.device("meta"):
            attach_lora(model, *lora)
    saved = saved_bytes(model, family.blocks(model), family.inputs(rows, geometry))
    types = family.block_types(family.transformer)
    block = max(saved.get(i, 0) for i, _, _ in types)
    outside = saved.get(None, 0) + saved.get(0, 0) - saved.get(1, 0)  # block 0 first saves what all blocks share
    boundary = rows * sum(tokens * hidden for _, tokens, hidden in geometry.streams) * BF16
    n_blocks = sum(n for _, n, _ in types)
    return Activations(boundary, n_blocks, block, outside, sum(n * saved.get(i, 0) for i, n, _ in types) + outside)


def forward_rows(cfg, family: Family, sequence_length: int) -> tuple[int, int, str]:
    """(samples, rows) per training forward and a description: ``train.minibatch`` samples, or fewer under
    ``train.tokens_per_batch`` (diffrl.trainer.batch_size: both CFG passes counted), times 2 rows with CFG."""
    t, g = cfg.train, cfg.sampler.guidance_scale
    passes = 1 if g == 1.0 else 2
    samples = t.minibatch
    why = f"train.minibatch {t.minibatch}"
    if t.tokens_per_batch is not None:
        samples = min(t.minibatch, max(1, t.tokens_per_batch // (sequence_length * passes)))
        why = f"train.tokens_per_batch {t.tokens_per_batch} // ({sequence_length} tokens x {passes} passes)"
    rows = samples * (1 if g == 1.0 or family.one_pass_guidance else 2)
    how = "guidance embedding, one pass" if family.one_pass_guidance else ("no CFG" if g == 1.0 else "x 2 (CFG)")
    return samples, rows, f"{rows} rows = {samples} sample{'s' * (samples != 1)} ({why}), {how}"


# ---------------------------------------------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------------------------------------------

COLUMNS = ["setup", "denoiser weights (frozen)", "frozen reference", "trainable weights", "gradients",
           "AdamW moments", "text encoders + VAE", "activations (ckpt)", "total / GPU", "total, model.offload"]


def memory_row(counts: Counts, experts: int, full: bool, gpus: int, moments: str, encoders: int, decoders: int,
               activation_bytes: float) -> dict[str, float]:
    """Bytes per GPU of one setup. ``counts`` is per denoiser; ``encoders``/``decoders`` are parameter counts of the
    text-encoder and decoder groups (bf16, replicated); FSDP (``gpus`` > 1) divides the denoisers' parameters, the
    reference, the trainable weights, gradients and moments by ``gpus`` (buffers are not sharded)."""
    n = gpus
    weights, buffers = counts.param_bytes * experts, counts.buffer_bytes * experts
    if full:  # gradients and (default) moments in each parameter's dtype
        moment = 2 * weights if moments == "param" else 2 * FP32 * counts.params * experts
        row = dict(frozen=buffers, reference=weights / n + buffers, trainable=weights / n, grads=weights / n,
                   moments=moment / n)
    else:  # LoRA: fp32 adapters, fp32 grads and fp32 moments whatever --moments says
        lora = counts.lora * experts
        row = dict(frozen=weights / n + buffers, reference=0.0, trainable=lora * FP32 / n, grads=lora * FP32 / n,
                   moments=lora * 2 * FP32 / n)
    states = sum(row.values())
    row["encoders"] = (encoders + decoders) * BF16
    row["activations"] = activation_bytes
    row["total"] = states + row["encoders"] + activation_bytes
    row["total_offload"] = states + max(activation_bytes, encoders * BF16, decoders * BF16)
    return row


def _gb(x: float) -> str:
    x /= GB
    if x == 0:
        return "0"
    if x < 0.005:
        return "<0.01"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _b(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def fsdp_rejected(config: str, overrides: Sequence[str]) -> bool:
    """Whether diffrl's config validation refuses ``model.fsdp: true`` for this config with these overrides."""
    from diffrl.config import ConfigError, load_config

    try:
        load_config(config, [*overrides, "model.fsdp=true"])
    except ConfigError as e:
        if "model.fsdp" in str(e):
            return True
        raise
    return False


def family_section(family: Family, gpus: int, moments: str) -> tuple[str, dict]:
    from diffrl.config import load_config

    cfg = load_config(str(ROOT / family.config))
    lora_fsdp_rejected = fsdp_rejected(str(ROOT / family.config), [])
    m = cfg.model
    counts = count(family, m.lora_targets, m.lora_rank)
    geometry = family.geometry(cfg)
    samples, rows, rows_text = forward_rows(cfg, family, geometry.sequence_length)
    act_lora = activations(family, geometry, rows, (m.lora_rank, m.lora_alpha, m.lora_targets))
    act_full = activations(family, geometry, rows, None)
    enc = sum(p for _, p in family.encoders)
    dec = sum(p for _, p in family.decoders)
    e = family.experts
    each = " each" if e > 1 else ""
    lines = [f"### {family.title}: `{family.config}` (family `{m.family}`)", ""]
    fp32 = "; the class keeps a few modules in fp32" if counts.param_bytes > BF16 * counts.params else ""
    lines.append(f"- Transformer (`{family.model_class}`, published config): {counts.params:,} parameters"
                 + (f" + {counts.buffers:,} buffer values" if counts.buffers > 1e6 else "")
                 + f" = {_b(counts.params + counts.buffers)}{each} (published: {family.published}); "
                 f"{_gb(counts.param_bytes + counts.buffer_bytes)} GB as loaded{each}{fp32}"
                 + (f"; {e} experts: {_b(e * (counts.params + counts.buffers))}" if e > 1 else "") + ".")
    lines.append(f"- LoRA: rank {m.lora_rank} on {', '.join(m.lora_targets)} (the config's): {counts.lora_modules} "
                 f"`nn.Linear` modules, {counts.lora:,} parameters{each} "
                 f"({100 * counts.lora / counts.params:.2f}% of the transformer), fp32.")
    parts = ", ".join(f"{n} {_b(p)}" for n, p in family.encoders + family.decoders)
    offload = " (`model.offload: true` in this config)" if m.offload else ""
    lines.append(f"- Text encoders + VAE, bf16: {parts} = {_b(enc + dec)}{offload}.")
    lines.append(f"- Activations: {geometry.text}; forward batch {rows_text}; {act_full.blocks} blocks"
                 + (" per expert (one expert runs per forward)" if e > 1 else "") + f". Kept per block boundary: "
                 f"{_gb(act_full.boundary)} GB; one block recomputed: {_gb(act_lora.block)} GB (LoRA) / "
                 f"{_gb(act_full.block)} GB (full); outside the blocks: {_gb(act_lora.outside)} / "
                 f"{_gb(act_full.outside)} GB.")
    ckpt = ("on in this config" if m.gradient_checkpointing else
            "off in this config (`model.gradient_checkpointing: true` for these numbers)")
    lines.append(f"- Gradient checkpointing is {ckpt}; without it the activations are {_gb(act_lora.no_checkpointing)} "
                 f"GB (LoRA) / {_gb(act_full.no_checkpointing)} GB (full).")
    lines.append(f"- FSDP gathers one block's full weights at a time: the largest has {counts.largest_block:,} "
                 f"parameters, {_gb(counts.largest_block * BF16)} GB bf16 (x2 with prefetch, plus its unsharded "
                 f"gradient in the backward); not in the totals.")
    lines.append("")
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    data = {}
    for full in (False, True):
        for n in (1, gpus):
            act = act_full if full else act_lora
            row = memory_row(counts, e, full, n, moments, enc, dec, act.checkpointed)
            name = "full FT" if full else f"LoRA r{m.lora_rank}"
            where = "1 GPU" if n == 1 else f"FSDP {n} GPUs" + (" †" if not full and lora_fsdp_rejected else "")
            data[(name.split()[0], n)] = row
            cells = [f"{name}, {where}", _gb(row["frozen"]), "—" if not full else _gb(row["reference"]),
                     _gb(row["trainable"]), _gb(row["grads"]), _gb(row["moments"]), _gb(row["encoders"]),
                     _gb(row["activations"]), f"**{_gb(row['total'])}**", _gb(row["total_offload"])]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines), dict(counts=counts, rows=data, forward_rows=rows, samples=samples,
                                  lora_fsdp_rejected=lora_fsdp_rejected)


def header(gpus: int, moments: str, dagger: bool) -> str:
    import diffusers
    import peft

    moment_text = ("in the parameter's dtype, as `torch.optim.AdamW` allocates them (`zeros_like(p)`): fp32 for LoRA "
                   "(8 B per trainable parameter), bf16 for full fine-tuning (4 B per parameter; pass `--moments fp32` "
                   "for 8 B)" if moments == "param" else
                   "fp32, 8 B per trainable parameter (`--moments fp32`; diffrl's `torch.optim.AdamW` keeps bf16 "
                   "moments for bf16 weights: 4 B)")
    return "\n".join([
        "## Training memory per GPU: arithmetic, not measured",
        "",
        f"Generated by `scripts/memory_table.py` (diffusers {diffusers.__version__}, peft {peft.__version__}). "
        "Nothing was run on a GPU and no weights were loaded: parameter counts come from the diffusers classes built "
        "on the meta device with each model's published config, activations from shape-only traces. GB = 1e9 bytes.",
        "",
        "- Weights bf16 (`model.dtype: bfloat16` in every config). LoRA: the base frozen, the adapters fp32 "
        "(`add_lora`); its reference is the adapters switched off (no copy). Full fine-tuning (`model.lora_rank: 0`): "
        "the bf16 weights train in place, and the reference is a frozen bf16 copy of the denoisers.",
        "- Gradients in the trained parameters' dtype (fp32 LoRA, bf16 full). AdamW moments: " + moment_text + ".",
        f"- FSDP over {gpus} GPUs (`model.fsdp`, FSDP2): the denoisers' parameters, the reference copy, the gradients "
        "and the moments are divided by the GPU count (buffers are not sharded); the text encoders, VAE and the "
        "activations are not." + (" † diffrl's config check rejects `model.fsdp: true` with this LoRA (checked when "
        "the table is made): such a run replicates on every GPU, as in its 1-GPU row, and the † row is arithmetic "
        "for comparison." if dagger else ""),
        "- Text encoders + VAE: bf16, replicated on every GPU. `total, model.offload`: with `model.offload: true` they "
        "stay on the CPU and come to the GPU as a group only while they encode or decode, when no training "
        "activations are alive: the training state plus the largest of (activations, encoders, decoders).",
        "- Activations with gradient checkpointing: per block boundary the hidden state(s) `[rows, tokens, hidden]` "
        "in bf16 kept, plus one block's saved-for-backward tensors (the largest block, recomputed one at a time) "
        "and the saved tensors outside the blocks. Those two are counted on a 3-4 block meta copy of the transformer "
        "run at the real rows and tokens: distinct storages saved by autograd (fp32 upcasts included; peft's fp32 "
        "copies of the LoRA inputs included), parameters excluded, attention as a FlashAttention-style kernel "
        "(q, k, v, output, log-sum-exp; no T x T matrix). Rows per forward: `train.minibatch` samples (or fewer "
        "under `train.tokens_per_batch`), x 2 with classifier-free guidance.",
        "- Not counted: the rollouts (no-grad sampling forwards), reward models, the CUDA context (~0.5-1 GB), the "
        "backward's transient gradient buffers of the block in flight, FSDP's gathered block (see each family), the "
        "optimizer step's temporaries, allocator fragmentation, cached prompt embeddings.",
        "",
    ])


def summary(families: list[Family], sections: list[tuple[str, dict]], gpus: int) -> str:
    """Total per GPU of every family and setup, GB (with ``model.offload`` in parentheses)."""
    cols = [("LoRA", 1), ("LoRA", gpus), ("full", 1), ("full", gpus)]
    lines = ["Total per GPU, GB (with `model.offload: true` in parentheses); the sections below itemise each.", "",
             f"| config | LoRA, 1 GPU | LoRA, FSDP {gpus} | full FT, 1 GPU | full FT, FSDP {gpus} |",
             "|---|---|---|---|---|"]
    for family, (_, data) in zip(families, sections):
        cells = [f"{_gb(data['rows'][c]['total'])} ({_gb(data['rows'][c]['total_offload'])})" for c in cols]
        if data["lora_fsdp_rejected"]:
            cells[1] += " †"
        lines.append(f"| {family.title} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="also write the markdown here")
    p.add_argument("--gpus", type=int, default=8, help="GPUs of the FSDP rows (default 8)")
    p.add_argument("--moments", choices=("param", "fp32"), default="param",
                   help="AdamW moment dtype for full fine-tuning: param (bf16, what torch.optim.AdamW does; default) "
                        "or fp32")
    p.add_argument("--configs", nargs="*", help="config stems to include (default: all six)")
    args = p.parse_args(argv)
    if args.gpus < 2:
        p.error("--gpus is the FSDP rows' GPU count: at least 2")
    start = time.perf_counter()
    families = [f for f in FAMILIES if not args.configs or f.key in args.configs]
    if args.configs and len(families) != len(args.configs):
        p.error(f"unknown config among {args.configs}; choose from {[f.key for f in FAMILIES]}")
    sections = [family_section(family, args.gpus, args.moments) for family in families]
    dagger = any(data["lora_fsdp_rejected"] for _, data in sections)
    parts = [header(args.gpus, args.moments, dagger), summary(families, sections, args.gpus)]
    parts += [text for text, _ in sections]
    text = "\n".join(parts).rstrip() + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    print(f"[memory_table: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
