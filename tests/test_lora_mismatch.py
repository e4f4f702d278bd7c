"""``--lora`` folders that do not fit the model end in one sentence before diffusers sees them: a LoRA of another
model (named from its run's config.yaml), one that only partly matches, one of other layer sizes (no torch
``size mismatch`` traceback); a LoRA that fits loads as before."""
import os
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from diffrl.adapters import load_adapter_class
from diffrl.adapters.base import ModelLoadError
from diffrl.cli import main
from diffrl.inference import LORA_WEIGHTS as WEIGHTS
from diffrl.inference import check_lora_fits, load_for_inference, sample
from tests_helpers import MODEL

os.environ["HF_HUB_OFFLINE"] = "1"
PROMPTS = ["two red circles"]
OTHER_MODEL = {"family": "flux", "path": "black-forest-labs/FLUX.1-dev"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model with a LoRA that changes it, written by ``save_lora`` to ``RUN/lora``."""
    adapter = load_adapter_class("sd3").from_pretrained(MODEL)
    adapter.add_lora(4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    lora = tmp_path_factory.mktemp("run") / "lora"
    adapter.save_lora(str(lora))
    return adapter, lora


def edited(lora: Path, out: Path, edit: Callable[[dict], dict], config: dict | None = None) -> Path:
    """A copy of ``lora`` at ``out/lora`` with its tensors passed through ``edit``, and ``config`` (a run config)
    written to ``out/config.yaml`` when given."""
    (out / "lora").mkdir(parents=True)
    save_file(edit(load_file(str(lora / WEIGHTS))), str(out / "lora" / WEIGHTS))
    if config is not None:
        (out / "config.yaml").write_text(yaml.safe_dump({"model": config}))
    return out / "lora"


def renamed(state: dict, old: str, new: str, keep: Callable[[str], bool] = lambda k: False) -> dict:
    """``state`` with ``old`` replaced by ``new`` in every key that ``keep`` does not spare."""
    return {(k if keep(k) else k.replace(old, new)): v for k, v in state.items()}


def halved(state: dict) -> dict:
    """``state`` as if made for the same architecture at half the width: lora_A [r, in/2], lora_B [out/2, r]."""
    return {k: (v[:, : v.shape[1] // 2] if "lora_A" in k else v[: v.shape[0] // 2]).contiguous()
            for k, v in state.items()}


def layers(lora: Path) -> int:
    """How many layers (lora_A and lora_B pairs) the LoRA in ``lora`` holds."""
    return len(load_file(str(lora / WEIGHTS))) // 2


FOREIGN = {"another DiT": lambda s: renamed(s, "transformer_blocks.", "single_transformer_blocks."),
           "a UNet": lambda s: renamed(s, "transformer.", "unet.")}
"""LoRAs of other models: layers this model lacks, and keys diffusers routes nowhere (silently skipped before)."""


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_a_lora_of_another_model_names_the_model_it_was_made_for(trained, tmp_path, kind):
    _, lora = trained
    foreign = edited(lora, tmp_path, FOREIGN[kind], OTHER_MODEL)
    with pytest.raises(ModelLoadError) as e:
        load_for_inference(MODEL, str(foreign))
    msg = str(e.value)
    assert f"none of its {layers(lora)} layers exist" in msg and repr(MODEL) in msg and str(foreign) in msg
    assert "it was made for 'black-forest-labs/FLUX.1-dev' (family flux)" in msg
    (tmp_path / "config.yaml").unlink()
    with pytest.raises(ModelLoadError, match="none of its") as e:  # no run config beside it: no model to name
        load_for_inference(MODEL, str(foreign))
    assert "made for" not in str(e.value)


def test_a_partly_matching_lora_gives_the_count_and_missing_names(trained, tmp_path):
    _, lora = trained
    part = edited(lora, tmp_path, lambda s: renamed(s, "attn.to_q", "attn.to_query", keep=lambda k: "to_q" not in k))
    n = layers(lora)
    missing = sum(".to_q." in k for k in load_file(str(lora / WEIGHTS))) // 2
    with pytest.raises(ModelLoadError, match=f"{n - missing} of its {n} layers") as e:
        load_for_inference(MODEL, str(part))
    assert "attn.to_query" in str(e.value)


def test_a_lora_of_other_layer_sizes_names_the_layer_and_both_shapes(trained, tmp_path):
    _, lora = trained
    narrow = edited(lora, tmp_path, halved)
    with pytest.raises(ModelLoadError) as e:
        load_for_inference(MODEL, str(narrow))
    msg = str(e.value)
    assert "transformer_blocks.0.attn." in msg and "[4, 64]" in msg and "[4, 128]" in msg
    assert "size mismatch" not in msg


@pytest.mark.parametrize("kind, says", [("a UNet", "none of its"), ("narrow", "of shape [4, 64]")])
def test_the_cli_says_it_in_one_line(trained, tmp_path, capsys, kind, says):
    _, lora = trained
    bad = edited(lora, tmp_path, FOREIGN.get(kind, halved))
    assert main(["eval", "--model", MODEL, "--lora", str(bad), "--n", "1", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("diffrl:")]
    assert len(lines) == 1 and str(bad) in lines[0] and says in lines[0], err
    assert "Traceback" not in err and "size mismatch" not in err


def test_wan_2_2s_second_expert_is_checked_in_its_subfolder(tmp_path):
    from tiny_families import tiny_wan_pipeline

    def wan():
        return load_adapter_class("wan")(tiny_wan_pipeline(two_experts=True), max_sequence_length=16, resolution=32,
                                         num_frames=9)

    adapter = wan()
    adapter.add_lora(4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    adapter.save_lora(str(tmp_path / "lora"))
    fresh = wan()
    check_lora_fits(fresh, str(tmp_path / "lora"), "tiny-wan")
    second = tmp_path / "lora" / "transformer_2" / WEIGHTS
    save_file(halved(load_file(str(second))), str(second))
    with pytest.raises(ModelLoadError, match=r"LoRA in '.*transformer_2' does not fit 'tiny-wan': its layer"):
        check_lora_fits(fresh, str(tmp_path / "lora"), "tiny-wan")


def test_a_lora_that_fits_still_loads_and_changes_the_samples(trained):
    adapter, lora = trained
    ours = sample(load_for_inference(MODEL, str(lora)), PROMPTS, seed=3, steps=2, guidance=4.5)
    torch.testing.assert_close(ours, sample(adapter, PROMPTS, seed=3, steps=2, guidance=4.5), atol=1e-4, rtol=0)
    assert (ours - sample(adapter, PROMPTS, seed=3, steps=2, guidance=4.5, reference=True)).abs().max() > 1e-3
