"""Tiny random pipelines of the non-SD3 families, built in code (no files, no hub), for the adapter tests."""
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from diffrl.tiny_pipeline import CLIP_HIDDEN, CLIP_LEN, T5_DIM, clip_tokenizer, t5_tokenizer


def tiny_vae(latent_channels: int = 4) -> AutoencoderKL:
    """An x1 AutoencoderKL (32 px images <-> 32 px latents) with FLUX-like scaling and shift."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=latent_channels,
                         layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=1.5,
                         shift_factor=0.1, mid_block_add_attention=False)


def tiny_flux_pipeline(guidance_embeds: bool = True, seed: int = 0) -> FluxPipeline:
    """FLUX.1 layout at toy size: double- and single-stream blocks, rotary ids, packed 2 x 2 latents."""
    import torch

    torch.manual_seed(seed)
    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=CLIP_HIDDEN, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=CLIP_LEN,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=T5_DIM, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_DIM,
                                         pooled_projection_dim=CLIP_HIDDEN, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=[4, 4, 8])
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=tiny_vae(),
                        text_encoder=clip, tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok2, transformer=transformer)


def gemma_tokenizer():
    """A character-level Gemma tokenizer built in code (letters, digits, the word marker and specials)."""
    import string

    from transformers import GemmaTokenizer

    chars = ["\u2581", *string.ascii_lowercase, *string.ascii_uppercase, *string.digits, *".,:;'\"!?-()"]
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=2048)


def tiny_sana_pipeline(seed: int = 0):
    """SANA layout at toy size (diffusers' own fast-test sizes): linear-attention DiT, DC-AE x2, Gemma 2."""
    import torch
    from diffusers import AutoencoderDC, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    tok = gemma_tokenizer()
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                         num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                         cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                         sample_size=16)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    text_encoder = Gemma2Model(Gemma2Config(head_dim=16, hidden_size=8, intermediate_size=64, num_attention_heads=2,
                                            num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(tok),
                                            max_position_embeddings=2048, attn_implementation="eager"))
    return SanaPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def tiny_wan_pipeline(two_experts: bool = False, seed: int = 0):
    """Wan layout at toy size: 3-D patches (1, 2, 2), a causal video VAE (x8 space, x4 time), UMT5; with
    ``two_experts``, Wan 2.2's high- and low-noise transformers split at boundary_ratio 0.875."""
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tok = t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=T5_DIM, d_ff=128, d_kv=16, num_layers=2,
                                               num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])

    def transformer():
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                     out_channels=16, text_dim=T5_DIM, freq_dim=256, ffn_dim=32, num_layers=2,
                                     cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)

    return WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer(),
                       transformer_2=transformer() if two_experts else None,
                       boundary_ratio=0.875 if two_experts else None,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
