"""RL guidance on the shipped tiny model: w = 0 is the base sampler and w = 1 the fine-tuned one bit for bit, the
velocity is linear in w, each model's CFG matches the formula, w = 1 steps skip the reference pass, and the sweep
and the CLI write their grid, plot and JSON."""
import json
import os

import pytest
import torch

from diffrl.cli import main
from diffrl.guidance import classifier_free_guidance, guidance_schedule
from diffrl.guided_sampling import guided_sample, rl_guided_velocity, sweep
from diffrl.inference import load_for_inference, sample
from diffrl.rollout import tree_rollout
from diffrl.seeding import mix_seed
from diffrl.tree import TreeSchedule
from tests_helpers import MODEL, random_lora

os.environ["HF_HUB_OFFLINE"] = "1"
PROMPTS = ["two red circles", "a blue square left of a green triangle"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The tiny model with a LoRA that changes it, saved in the diffusers format."""
    folder = tmp_path_factory.mktemp("lora")
    return random_lora(folder), folder


def test_w0_is_the_base_sampler_and_w1_the_fine_tuned_one_bit_for_bit(tuned):
    ad, _ = tuned
    for w, reference in ((0.0, True), (1.0, False)):
        got = guided_sample(ad, PROMPTS, 7, 4, 4.5, torch.full((4,), w))
        assert torch.equal(got, sample(ad, PROMPTS, 7, 4, 4.5, reference=reference))
    assert not torch.equal(sample(ad, PROMPTS, 7, 4, 4.5, reference=True), sample(ad, PROMPTS, 7, 4, 4.5))
    # An SDE sampler too: w = 0 is the reference's own SDE rollout from the same seeds and noises.
    seeds = [mix_seed(7, i) for i in range(len(PROMPTS))]
    with torch.no_grad(), ad.reference():
        ro = tree_rollout(lambda x, s, c: ad.velocity(x, s, c, 4.5), TreeSchedule(4), ad.sigmas(4), seeds,
                          ad.latent_shape, kind="flow", cond=ad.encode(PROMPTS))
        base_sde = ad.decode(ro.leaves.flatten(0, 1))
    assert torch.equal(guided_sample(ad, PROMPTS, 7, 4, 4.5, torch.zeros(4), kind="flow"), base_sde)


def test_velocity_is_linear_in_w_and_each_model_has_its_own_cfg(tuned):
    ad, _ = tuned
    sigmas = ad.sigmas(4)
    x, sigma, cond = torch.randn(2, *ad.latent_shape), sigmas[1].expand(2), ad.encode(PROMPTS)
    uncond = {k: v.expand(2, *v.shape[1:]) for k, v in ad.unconditional().items()}
    with torch.no_grad():
        v = {w: rl_guided_velocity(ad, torch.full((4,), w), sigmas, 4.5, ref_guidance=2.0)(x, sigma, cond)
             for w in (0.0, 0.5, 1.0, 2.0)}
        with ad.reference():
            ref = classifier_free_guidance(ad.velocity(x, sigma, uncond, 1.0), ad.velocity(x, sigma, cond, 1.0), 2.0)
        pol = classifier_free_guidance(ad.velocity(x, sigma, uncond, 1.0), ad.velocity(x, sigma, cond, 1.0), 4.5)
    torch.testing.assert_close(v[0.0], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v[1.0], pol, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v[0.5], (v[0.0] + v[1.0]) / 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v[2.0], 2 * v[1.0] - v[0.0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v[2.0], ref + 2 * (pol - ref), atol=1e-4, rtol=1e-4)


def test_steps_at_w1_make_no_reference_pass(tuned, monkeypatch):
    ad, _ = tuned
    calls = []
    original = type(ad).reference

    def spy(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(type(ad), "reference", spy)
    guided_sample(ad, PROMPTS, 7, 4, 4.5, guidance_schedule(4, 1.5, rl_only_steps=3))
    assert len(calls) == 1  # only the last step combines the two models
    calls.clear()
    guided_sample(ad, PROMPTS, 7, 4, 4.5, guidance_schedule(4, 1.5))
    assert len(calls) == 4


def test_a_second_full_model_as_the_reference(tuned):
    ad, _ = tuned
    other = load_for_inference(MODEL)  # the base weights, as a separate model
    got = guided_sample(ad, PROMPTS, 3, 4, 4.5, torch.zeros(4), reference=other)
    assert torch.equal(got, sample(ad, PROMPTS, 3, 4, 4.5, reference=True))


def test_sweep_and_cli_write_grid_plot_and_json(tuned, tmp_path, capsys):
    ad, folder = tuned
    import rewards

    res = sweep(ad, PROMPTS, [0.0, 1.0, 2.0], {"shapes_partial": rewards.load("shapes_partial")}, tmp_path / "s",
                steps=4)
    assert [r["w"] for r in res["results"]] == [0.0, 1.0, 2.0]
    assert all(0 <= r["shapes_partial"] <= 1 and r["sample_s"] > 0 for r in res["results"])
    for f in ("sweep.png", "sweep_rewards.png", "sweep.json"):
        assert (tmp_path / "s" / f).is_file()
    from PIL import Image

    assert Image.open(tmp_path / "s" / "sweep.png").size[0] == 3 * 32 * 4  # three columns of 4x-upscaled 32 px images
    rc = main(["guide", "--model", MODEL, "--lora", str(folder), "--w", "0", "1.5", "--steps", "3", "--n", "2",
               "--reward", "shapes", "--out", str(tmp_path / "cli"), "--rl-only-steps", "1"])
    assert rc == 0
    saved = json.loads((tmp_path / "cli" / "sweep.json").read_text())
    assert [r["w"] for r in saved["results"]] == [0.0, 1.5] and saved["rl_only_steps"] == 1
    assert main(["guide", "--model", MODEL, "--out", str(tmp_path / "x")]) == 2
    assert "needs a fine-tuned model" in capsys.readouterr().err
    assert main(["guide", "--model", MODEL, "--lora", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["guide", "--model", MODEL, "--lora", str(folder), "--reward", "shapez", "--n", "1"]) == 2
    assert "unknown reward 'shapez'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="one scale per step"):
        guided_sample(ad, PROMPTS, 0, 4, 4.5, torch.ones(3))


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
    return torch.equal(a, b)


@pytest.mark.parametrize("family", ["flux", "sana", "wan2.2", "ltx2"])
def test_every_family_guides_between_its_reference_and_its_lora(family):
    """w = 0 / 1 are the family's own base and LoRA samplers bit for bit (Wan 2.2: both experts carry a LoRA; LTX-2:
    audio-video media)."""
    from diffrl.adapters import load_adapter_class
    from tiny_families import tiny_flux_pipeline, tiny_sana_pipeline, tiny_wan_pipeline
    from tiny_ltx2 import tiny_ltx2_pipeline

    build = {"flux": (tiny_flux_pipeline, {}), "sana": (tiny_sana_pipeline, {}),
             "wan2.2": (lambda: tiny_wan_pipeline(two_experts=True), {"num_frames": 9}),
             "ltx2": (tiny_ltx2_pipeline, {"num_frames": 9, "resolution": 64})}
    make, kw = build[family]
    name = {"wan2.2": "wan"}.get(family, family)
    ad = load_adapter_class(name)(make(), max_sequence_length=16, **{"resolution": 32, **kw})
    ad.add_lora(4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ad.trainable_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    prompts = ["a red circle", "two blue squares"]
    base, tuned = sample(ad, prompts, 5, 3, 3.0, reference=True), sample(ad, prompts, 5, 3, 3.0)
    assert not _equal(base, tuned)
    assert _equal(guided_sample(ad, prompts, 5, 3, 3.0, torch.zeros(3)), base)
    assert _equal(guided_sample(ad, prompts, 5, 3, 3.0, torch.ones(3)), tuned)


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_a_missing_or_empty_lora_folder_is_one_sentence(command, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    extra = ["--n", "1"] if command == "eval" else ["--prompt", "a red circle", "--out", str(tmp_path / "g.png")]
    assert main([command, "--model", MODEL, "--lora", str(tmp_path / "missing"), *extra]) == 2
    assert "does not exist or is not a folder" in capsys.readouterr().err
    assert main([command, "--model", MODEL, "--lora", str(empty), *extra]) == 2
    err = capsys.readouterr().err
    assert "cannot load the LoRA in" in err and "Traceback" not in err
