"""scripts/research/probe_conditioning.py: its one-word prompt edits against hand-written prompts, its velocity
sensitivity against a model whose velocity is known in closed form, and one tiny end-to-end run."""
import json
import subprocess
import sys

import pytest
import torch
from research_helpers import load_probe, probe_path

from diffrl.shapes import Obj, Scene
from tests_helpers import MODEL, ROOT, SUBPROCESS_ENV


def test_edits_change_one_word():
    probe = load_probe("probe_conditioning")
    relation = Scene("relation", (Obj("red", "circle"), Obj("blue", "square")), "left of")
    assert probe.edits(relation) == {
        "relation word flipped": "a red circle to the right of a blue square",
        "objects swapped": "a blue square to the left of a red circle",
        "relation: first colour changed": "a green circle to the left of a blue square",
    }
    count = Scene("count", (Obj("yellow", "triangle", 4),))
    assert probe.edits(count) == {"count word changed": "two yellow triangles",
                                  "count: colour changed": "four red triangles"}
    with pytest.raises(ValueError, match="not 'single'"):
        probe.edits(Scene("single", (Obj("red", "circle"),)))


class LengthVelocity:
    """Velocity = the prompt's length in characters, everywhere: |v' - v| / |v| = |len' - len| / len."""

    latent_shape = (1, 2, 2)

    def encode(self, prompts):
        return {"pooled": torch.tensor([float(len(p)) for p in prompts])}

    def velocity(self, x, sigma, cond, guidance):
        assert guidance == 4.5 and len(sigma) == len(x)
        return cond["pooled"].view(-1, 1, 1, 1).expand_as(x) + 0 * x


def test_sensitivity_is_the_relative_velocity_change():
    probe = load_probe("probe_conditioning")
    out = probe.sensitivity(LengthVelocity(), ["abcd", "ab"], [{"e": "abcdef"}, {"e": "a"}], (0.9, 0.5), 4.5, seed=0)
    # (|6 - 4| / 4 + |1 - 2| / 2) / 2 = 0.5 at every noise level
    assert out == {"e": {0.9: pytest.approx(0.5), 0.5: pytest.approx(0.5)}}


@pytest.mark.slow
def test_tiny_run_ends_with_its_json():
    done = subprocess.run([sys.executable, probe_path("probe_conditioning"), "--n", "4", "--steps", "4"],
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(out["sensitivity"]) == {"relation word flipped", "objects swapped", "relation: first colour changed",
                                       "count word changed", "count: colour changed"}
    for row in out["sensitivity"].values():
        assert list(row) == ["0.98", "0.9", "0.7", "0.5"] and all(v >= 0 for v in row.values())


def test_pretraining_checkpoint_weights_reach_the_probed_model(tmp_path):
    from diffrl import checkpoint
    from diffrl.inference import load_for_inference

    probe = load_probe("probe_conditioning")
    adapter = load_for_inference(MODEL)
    pipe = adapter.pipe
    tensors = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
               for name in probe.PRETRAINED_MODULES}
    raw = {k: v + 1.0 for k, v in pipe.transformer.state_dict().items()}
    ema = {k: v + 2.0 for k, v in pipe.transformer.state_dict().items()}
    tensors["text_encoder_3"] = {k: v + 3.0 for k, v in tensors["text_encoder_3"].items()}
    key = next(iter(raw))
    path = checkpoint.save(tmp_path, 7, {**tensors, "transformer": raw, "ema": ema}, {}, {})
    probe.load_pretraining_checkpoint(adapter, str(path), "transformer")
    assert torch.equal(pipe.transformer.state_dict()[key], raw[key])
    probe.load_pretraining_checkpoint(adapter, str(path), "ema")
    assert torch.equal(pipe.transformer.state_dict()[key], ema[key])
    t5_key = "encoder.final_layer_norm.weight"
    assert torch.equal(pipe.text_encoder_3.state_dict()[t5_key], tensors["text_encoder_3"][t5_key])

    (tmp_path / "bare").mkdir()
    bare = checkpoint.save(tmp_path / "bare", 1, {"transformer": raw}, {}, {})
    with pytest.raises(SystemExit, match="holds no text_encoder, text_encoder_2, text_encoder_3, ema weights"):
        probe.load_pretraining_checkpoint(adapter, str(bare), "ema")
    with pytest.raises(SystemExit, match="not a checkpoint folder"):
        probe.load_pretraining_checkpoint(adapter, str(tmp_path / "nowhere"), "ema")
