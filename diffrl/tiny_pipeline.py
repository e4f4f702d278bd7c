"""Tiny StableDiffusion3Pipeline components built in code, offline (no files, no hub), for the shapes world.

Sizes are those measured to pretrain on a 2-core CPU in 20-40 minutes (patch 2 was 2.6-3.8x slower per image): a
6-layer SD3 transformer (4 heads x 32) on 4 x 32 x 32 latents with patch 4, an x1 AutoencoderKL without mid-block
attention (32 px images <-> 32 px latents), two CLIP text encoders (hidden 32) and a T5 encoder (d_model 64). Both
tokenizers are word-level over the shapes vocabulary: CLIP's through BPE merges that build each word left to right,
T5's through unigram pieces. Other text still tokenizes (CLIP falls back to characters, T5 to <unk>).
"""
from __future__ import annotations

import string

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from diffrl.shapes import COLORS, NUMBERS, RELATIONS, SHAPES, SIZES

CLIP_LEN, T5_LEN = 16, 16
CLIP_HIDDEN, CLIP_PROJ, T5_DIM = 32, 32, 64


def shapes_words() -> list[str]:
    """Every word of the shapes grammar (the T5 tokenizer's vocabulary)."""
    words = {"a", "an", "and", "to", "the", *NUMBERS.values(), *COLORS, *SIZES, *SHAPES, *(s + "s" for s in SHAPES)}
    for r in RELATIONS:
        words.update(r.split())
    return sorted(words)


def clip_tokenizer() -> CLIPTokenizer:
    """CLIP BPE tokenizer whose merges spell every shapes word as one token (characters for anything else)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]:
        vocab[c] = len(vocab)
    merges: list[tuple[str, str]] = []
    # Longest words first: their merges get the lowest ranks, so a short word's merge ("a n" of "an") never
    # pre-empts a longer word's ("tri a" of "triangle").
    for word in sorted(shapes_words(), key=lambda w: (-len(w), w)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        piece = symbols[0]
        for sym in symbols[1:]:
            merged = piece + sym
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((piece, sym))
            piece = merged
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_LEN, pad_token="<|endoftext|>")


def t5_tokenizer() -> T5Tokenizer:
    """Word-level T5 (unigram) tokenizer over the shapes vocabulary; other words map to <unk>."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in shapes_words()]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_LEN)


def clip_encoder(seed_vocab: int) -> CLIPTextModelWithProjection:
    cfg = CLIPTextConfig(vocab_size=seed_vocab, hidden_size=CLIP_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=CLIP_LEN, projection_dim=CLIP_PROJ,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModelWithProjection(cfg)


def tiny_sd3_pipeline() -> StableDiffusion3Pipeline:
    """A randomly initialised tiny StableDiffusion3Pipeline for 32 x 32 images."""
    tok, tok3 = clip_tokenizer(), t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=T5_DIM, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(16,), latent_channels=4,
                        layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=1.0, shift_factor=0.0,
                        mid_block_add_attention=False)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=4, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=T5_DIM, caption_projection_dim=128,
        pooled_projection_dim=2 * CLIP_PROJ, pos_embed_max_size=8, qk_norm="rms_norm",
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae,
        text_encoder=clip_encoder(len(tok)), tokenizer=tok, text_encoder_2=clip_encoder(len(tok)),
        tokenizer_2=clip_tokenizer(), text_encoder_3=t5, tokenizer_3=tok3,
    )
