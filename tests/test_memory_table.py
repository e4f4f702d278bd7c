"""scripts/memory_table.py against closed forms that do not go through its own code path: the byte bookkeeping of
a setup, LoRA parameter counts by hand (and by peft), transformer parameter counts by formula and against the
published sizes, and one family's table end to end."""
import importlib.util
import sys
from pathlib import Path

import pytest
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _load():
    # registered before it runs: its dataclasses look their module up in sys.modules
    spec = importlib.util.spec_from_file_location("memory_table", ROOT / "scripts" / "memory_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_table"] = module
    spec.loader.exec_module(module)
    return module


mt = _load()


def _counts(params: int, lora: int, param_bytes=None):
    return mt.Counts(params=params, param_bytes=2 * params if param_bytes is None else param_bytes, buffers=0,
                     buffer_bytes=0, lora=lora, lora_modules=1, largest_block=0)


@pytest.mark.parametrize("moments, per_param", [("param", 4), ("fp32", 8)])
def test_full_finetuning_optimizer_and_fsdp_are_closed_forms(moments, per_param):
    """Full FT of P bf16 parameters: weights, reference and grads 2P bytes each, AdamW's two moments 4P (bf16, what
    torch.optim.AdamW allocates for bf16 weights) or 8P (fp32); FSDP over 8 divides each by 8, not the rest."""
    p = 1_000_000
    one = mt.memory_row(_counts(p, 0), 1, True, 1, moments, encoders=300, decoders=50, activation_bytes=7.0)
    eight = mt.memory_row(_counts(p, 0), 1, True, 8, moments, encoders=300, decoders=50, activation_bytes=7.0)
    assert one["moments"] == per_param * p and eight["moments"] == per_param * p / 8
    for key in ("trainable", "grads", "reference"):
        assert one[key] == 2 * p and eight[key] == 2 * p / 8
    assert one["frozen"] == eight["frozen"] == 0
    for row in (one, eight):
        assert row["encoders"] == 2 * 350 and row["activations"] == 7.0
    assert one["total"] == (2 + 2 + 2 + per_param) * p + 700 + 7.0
    assert eight["total"] == (2 + 2 + 2 + per_param) * p / 8 + 700 + 7.0
    # offload: the training state plus the largest of activations (7), encoders (600 B), decoders (100 B)
    assert one["total_offload"] == (2 + 2 + 2 + per_param) * p + 600
    # two experts (Wan 2.2): everything of the denoisers doubles
    two = mt.memory_row(_counts(p, 0), 2, True, 1, moments, 0, 0, 0.0)
    assert two["moments"] == 2 * per_param * p and two["reference"] == 4 * p


def test_lora_rows_are_fp32_adapters_on_a_frozen_base():
    p, lora = 1_000_000, 1_000
    for moments in ("param", "fp32"):
        one = mt.memory_row(_counts(p, lora), 1, False, 1, moments, 0, 0, 0.0)
        assert (one["frozen"], one["reference"]) == (2 * p, 0)
        assert (one["trainable"], one["grads"], one["moments"]) == (4 * lora, 4 * lora, 8 * lora)
        eight = mt.memory_row(_counts(p, lora), 1, False, 8, moments, 0, 0, 0.0)
        assert (eight["frozen"], eight["moments"]) == (2 * p / 8, lora)


def test_buffers_and_fp32_modules_are_counted_as_loaded():
    """A buffer (SD3's positional table) is not trained and not sharded by FSDP2; a module kept in fp32 (Wan) costs
    4 bytes a parameter, and its gradient and moments as much."""
    c = mt.Counts(params=100, param_bytes=2 * 90 + 4 * 10, buffers=50, buffer_bytes=100, lora=0, lora_modules=0,
                  largest_block=0)
    row = mt.memory_row(c, 1, True, 4, "param", 0, 0, 0.0)
    assert row["frozen"] == 100 and row["reference"] == 220 / 4 + 100
    assert row["trainable"] == row["grads"] == 220 / 4 and row["moments"] == 440 / 4


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(8, 16)
        self.to_k = nn.Linear(8, 16, bias=False)
        self.to_v = nn.Linear(8, 4)
        self.to_out = nn.ModuleList([nn.Linear(16, 8), nn.Dropout(0.0)])
        self.add_to_q = nn.Linear(8, 8)  # "add_to_q" does not end in ".to_q": not a target


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Attn(), _Attn()])
        self.ff = nn.Linear(8, 32)
        self.to_q = nn.Linear(3, 5)  # a top-level module named exactly like a target is one


def test_lora_count_of_a_tiny_module_matches_a_hand_count_and_peft():
    rank, targets = 4, ["to_q", "to_k", "to_v", "to_out.0"]
    per_block = rank * ((8 + 16) + (8 + 16) + (8 + 4) + (16 + 8))  # 96 + 96 + 48 + 96
    hand = 2 * per_block + rank * (3 + 5)
    assert hand == 704
    assert mt.lora_parameters(_Tiny(), targets, rank) == (hand, 9)

    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=8, target_modules=targets), _Tiny())
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == hand
    with pytest.raises(ValueError, match="not an nn.Linear"):
        mt.lora_parameters(_Tiny(), ["to_out"], rank)  # a ModuleList


def _wan_closed_form(t: dict) -> int:
    """WanTransformer3DModel's parameters from its config. Per block (d = heads x head_dim, f = ffn_dim): self- and
    cross-attention 4 (d^2 + d) each plus q/k RMSNorms across heads (2d each), the cross-attention norm's affine
    (2d), the FFN (2df + f + d), the modulation table (6d). Outside: patch Conv3d, time MLP (freq -> d -> d),
    time projection (d -> 6d), text MLP (text_dim -> d -> d), output projection, output modulation (2d)."""
    d, f = t["num_attention_heads"] * t["attention_head_dim"], t["ffn_dim"]
    patch = t["patch_size"][0] * t["patch_size"][1] * t["patch_size"][2]
    block = 8 * d * d + 8 * d + 2 * d + 2 * d + 2 * d + 2 * d * f + f + d + 6 * d
    outside = ((t["in_channels"] * patch * d + d) + (t["freq_dim"] * d + d) + (d * d + d) + (6 * d * d + 6 * d)
               + (t["text_dim"] * d + d) + (d * d + d) + (d * t["out_channels"] * patch + t["out_channels"] * patch)
               + 2 * d)
    return t["num_layers"] * block + outside


def test_wan_counts_match_the_closed_form_and_the_published_sizes():
    for t in (mt.WAN21_1_3B, mt.WAN22_A14B):
        counted = sum(p.numel() for p in mt.build("WanTransformer3DModel", t).parameters())
        assert counted == _wan_closed_form(t)
    small = _wan_closed_form(mt.WAN21_1_3B)
    assert small == 1_418_996_800
    # the published "1.3B" is the model's name: the architecture holds 9% more (1.42B)
    assert abs(small - 1.3e9) / 1.3e9 < 0.10
    assert abs(_wan_closed_form(mt.WAN22_A14B) - 14e9) / 14e9 < 0.03


def test_flux_count_is_the_published_twelve_billion():
    flux = next(f for f in mt.FAMILIES if f.key == "flux1_dev")
    counts = mt.count(flux, ["to_q", "to_k", "to_v", "to_out.0"], 32)
    assert abs(counts.params - 11.9e9) / 11.9e9 < 0.02
    assert counts.param_bytes == 2 * counts.params and counts.buffers == 0


def test_forward_rows_follow_the_configs():
    """Rows per training forward: minibatch x 2 with CFG; FLUX.1-dev's guidance embedding is one pass; LTX-2's
    tokens_per_batch 16384 fits one sample of 4096 + 126 tokens twice (CFG)."""
    from diffrl.config import load_config

    rows = {}
    for f in mt.FAMILIES:
        cfg = load_config(str(ROOT / f.config))
        rows[f.key] = mt.forward_rows(cfg, f, f.geometry(cfg).sequence_length)[:2]
    assert rows == {"sd35_medium_ocr_grpo": (8, 16), "flux1_dev": (8, 8), "sana_1600m": (8, 16),
                    "wan21_t2v_1.3b": (4, 8), "wan22_t2v_a14b": (2, 4), "ltx2_t2av": (1, 2)}


def test_one_family_end_to_end(tmp_path):
    out = tmp_path / "table.md"
    text = mt.main(["--configs", "sana_1600m", "--out", str(out)])
    assert out.read_text() == text
    assert "arithmetic, not measured" in text
    assert "1,604,462,752 parameters" in text
    table = [line for line in text.splitlines() if line.startswith("| LoRA r32") or line.startswith("| full FT")]
    assert len(table) == 4
    # full FT, 1 GPU: bf16 weights, reference and gradients 3.21 GB each, bf16 moments 6.42 GB
    full = next(line for line in table if line.startswith("| full FT, 1 GPU"))
    assert full.split(" | ")[2:6] == ["3.21", "3.21", "3.21", "6.42"]
