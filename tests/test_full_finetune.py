"""Full fine-tuning (``model.lora_rank: 0``) on the shipped tiny model: every denoiser weight trains, the reference
stays the frozen base, the run starts exactly on policy, and the exported transformer folder is the trained model."""
import json
import os

import torch
import yaml

from diffrl import trainer
from diffrl.config import load_config
from tests_helpers import BRIGHT, MODEL, ROOT, TINY

os.environ["HF_HUB_OFFLINE"] = "1"


def test_full_finetuning_trains_every_weight_against_a_frozen_reference_and_exports_the_transformer(tmp_path):
    from diffusers import SD3Transformer2DModel

    cfg = load_config(str(ROOT / "configs" / "tiny_shapes_tree.yaml"),
                      TINY + [BRIGHT, "model.lora_rank=0", "train.steps=2", "train.lr=1e-4", "log.checkpoint_every=1"])
    summary = trainer.train(cfg, out=str(tmp_path))
    m = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert m[0]["first_ratio_dev"] == 0.0 and m[1]["kl"] > 0  # on policy at first, then away from the reference
    assert summary["steps"] == 2 and not (tmp_path / "lora").exists()
    base = SD3Transformer2DModel.from_pretrained(MODEL, subfolder="transformer")
    tuned = SD3Transformer2DModel.from_pretrained(str(tmp_path / "transformer"))
    moved = [k for k, v in tuned.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert len(moved) > 0.9 * len(base.state_dict())  # (nearly) every tensor trained, not just attention
    card = (tmp_path / "transformer" / "README.md").read_text()  # the model card beside the weights
    assert card.startswith("---\n") and yaml.safe_load(card.split("---\n")[1])["base_model"] == MODEL
    run = trainer.build(cfg, tmp_path / "again")
    ad = run.adapter
    x, sigma = torch.randn(2, *ad.latent_shape), torch.tensor([0.8, 0.3])
    cond = ad.encode(["a red circle", "two green squares"])
    ad.load_trained_state_dict({k: v for k, v in tuned.state_dict().items()})
    with torch.no_grad():
        v_tuned = ad.velocity(x, sigma, cond, 4.5)
        with ad.reference():
            v_ref = ad.velocity(x, sigma, cond, 4.5)
        ad.load_trained_state_dict(base.state_dict())
        v_base = ad.velocity(x, sigma, cond, 4.5)
    assert torch.equal(v_ref, v_base) and not torch.allclose(v_tuned, v_base, atol=1e-4)
