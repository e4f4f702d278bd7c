"""AWM (Advantage Weighted Matching, arXiv 2509.25050): the loss against independent computations, and the
objective through the trainer's seam."""
import math

import pytest
import torch
import torch.nn.functional as F

from diffrl.config import ConfigError, load_config
from diffrl.loss import awm_loss
from diffrl.update import OBJECTIVES
from tests_helpers import MODEL, ROOT


def batch(seed=0, b=3, shape=(2, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    v, noise, x0 = (torch.randn(b, *shape, generator=g) for _ in range(3))
    return v.requires_grad_(), noise, x0, torch.tensor([0.2, 0.5, 0.9])[:b], torch.tensor([2.0, -1.0, 7.0])[:b]


def test_uniform_awm_is_the_advantage_weighted_flow_matching_loss():
    v, noise, x0, sigma, adv = batch()
    loss, stats = awm_loss(v, noise, x0, sigma, adv, adv_max=5.0, weighting="uniform")
    a = adv.clamp(-5, 5) / 5
    per = torch.stack([F.mse_loss(v[i], noise[i] - x0[i]) for i in range(3)])
    torch.testing.assert_close(loss, (a * per).mean())
    loss.backward()
    d = v[0].numel()
    expected = torch.stack([2 * a[i] * (v[i] - (noise[i] - x0[i])) / (d * 3) for i in range(3)])
    torch.testing.assert_close(v.grad, expected.detach())
    assert stats.clip_frac == pytest.approx(1 / 3)  # 7 > A_max


def test_ghuber_weighting_is_the_release_s_power_law_times_sigma():
    v, noise, x0, sigma, adv = batch(1)
    loss, _ = awm_loss(v, noise, x0, sigma, adv, adv_max=5.0)
    total = 0.0
    for i in range(3):
        m = sum((float(v[i].flatten()[j]) - float((noise[i] - x0[i]).flatten()[j])) ** 2 for j in range(v[i].numel()))
        m /= v[i].numel()
        total += max(-1.0, min(1.0, float(adv[i]) / 5)) * float(sigma[i]) * ((m + 1e-10) ** 0.25 - 1e-10 ** 0.25) / 0.25
    assert float(loss) == pytest.approx(total / 3, rel=1e-5)


def test_a_step_pulls_positive_samples_in_and_pushes_negative_ones_out():
    v, noise, x0, sigma, adv = batch(2)
    loss, _ = awm_loss(v, noise, x0, sigma, adv, adv_max=5.0)
    loss.backward()
    before = (v - (noise - x0)).square().flatten(1).mean(1)
    after = (v - 0.1 * v.grad - (noise - x0)).square().flatten(1).mean(1)
    assert after[0] < before[0] and after[1] > before[1] and after[2] < before[2]


def test_the_kl_term_is_the_mean_squared_velocity_gap_to_the_reference():
    v, noise, x0, sigma, adv = batch(3)
    ref = v.detach() + 0.5
    loss, stats = awm_loss(v, noise, x0, sigma, torch.zeros(3), adv_max=5.0, kl_weight=0.1, v_ref=ref)
    assert stats.kl == pytest.approx(0.25) and float(loss) == pytest.approx(0.025)


def test_awm_is_a_per_leaf_objective_of_the_registry():
    assert OBJECTIVES["awm"].per_leaf and OBJECTIVES["nft"].per_leaf and not OBJECTIVES["ppo"].per_leaf
    cfg = load_config(str(ROOT / "configs" / "tiny_shapes_tree.yaml"), ["train.objective=awm"])
    assert cfg.train.advantage == "tree"  # on trees it trains on the leaves' depth-wise advantages
    with pytest.raises(ConfigError, match=r"'train.objective' must be one of \['ppo', 'nft', 'awm'\]"):
        load_config(str(ROOT / "configs" / "tiny_shapes.yaml"), ["train.objective=dpo"])


@pytest.mark.parametrize("weighting", ["ghuber", "uniform"])
def test_one_awm_step_of_the_main_job_moves_the_lora(weighting, tmp_path):
    """The contract's command (``train.steps=1 train.prompts_per_step=4`` plus the key) on the main job's config."""
    from diffrl.trainer import train

    cfg = load_config(str(ROOT / "configs" / "tiny_shapes.yaml"),
                      [f"model.path={MODEL}", "train.steps=1", "train.prompts_per_step=4", "train.objective=awm",
                       f"train.awm_weighting={weighting}", "data.eval_size=4", "log.tensorboard=false"])
    summary = train(cfg, out=str(tmp_path / "r"))
    assert summary["status"] == "finished" and math.isfinite(summary["final_accuracy"])
    from safetensors.torch import load_file

    lora = load_file(str(tmp_path / "r" / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(float(t.abs().max()) > 0 for k, t in lora.items() if "lora_B" in k)  # B starts at 0: it moved
