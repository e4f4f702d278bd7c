"""The inference CLIs' options: weights dtype, the families' own guidance scales, reward options for ``guide``; and
the families' own guidance scales from a training config."""
import pytest
import torch

from diffrl import cli
from diffrl.config import ConfigError, load_config
from diffrl.trainer import train
from tests_helpers import MODEL, ROOT, TINY


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    return code, capsys.readouterr()


def test_eval_in_bfloat16_loads_bfloat16_weights(capsys, monkeypatch):
    import diffrl.inference as inference

    seen = {}
    real = inference.load_for_inference

    def spy(*args, **kwargs):
        adapter = real(*args, **kwargs)
        seen["dtype"] = next(adapter.transformer.parameters()).dtype
        return adapter

    monkeypatch.setattr(inference, "load_for_inference", spy)
    code, out = run_cli(capsys, "eval", "--model", MODEL, "--n", "2", "--steps", "2", "--dtype", "bfloat16")
    assert code == 0 and seen["dtype"] == torch.bfloat16 and '"accuracy"' in out.out


def test_a_guidance_scale_the_family_lacks_is_one_sentence(capsys):
    code, out = run_cli(capsys, "sample", "--model", MODEL, "--prompt", "a red circle", "--num", "1", "--steps", "1",
                        "--guidance-2", "3.0")
    assert code == 2 and "SD3Adapter has no guidance scale ['guidance_scale_2']" in out.err.splitlines()[-1]


def test_wan22_s_second_expert_takes_its_own_guidance_scale():
    from diffrl.adapters.wan import WanAdapter
    from tiny_families import tiny_wan_pipeline

    adapter = WanAdapter(tiny_wan_pipeline(two_experts=True), resolution=32, num_frames=9, max_sequence_length=16)
    x = torch.randn(2, *adapter.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.95, 0.3])  # one row per expert (boundary at 0.875)
    cond = adapter.encode(["a red circle", "a red circle"])
    before = adapter.velocity(x, sigma, cond, 4.5)
    adapter.set_family_guidance({"guidance_scale_2": 1.0})
    after = adapter.velocity(x, sigma, cond, 4.5)
    assert torch.equal(before[0], after[0]) and not torch.allclose(before[1], after[1])


def test_family_guidance_from_a_config_reaches_the_adapter_or_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"'sampler.family_guidance': SD3Adapter has no guidance scale"):
        train(load_config(str(ROOT / "configs" / "tiny_shapes_tree.yaml"),
                          [*TINY, "train.steps=1", "sampler.family_guidance={guidance_scale_2: 3.0}"]),
              out=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="'sampler.family_guidance.guidance_scale_2' must be a finite number"):
        load_config(None, ["sampler.family_guidance={guidance_scale_2: .nan}"])


def test_guide_passes_reward_options_and_reports_bad_ones_in_one_sentence(tmp_path, capsys, monkeypatch):
    import rewards

    code, out = run_cli(capsys, "guide", "--model", MODEL, "--lora", str(tmp_path), "--reward", "jpeg_compressibility",
                        "--reward-option", "jpeg_compressibility.qualty=50")
    assert code == 2 and "diffrl: --reward:" in out.err and "qualty" in out.err and "Traceback" not in out.err
    code, out = run_cli(capsys, "guide", "--model", MODEL, "--lora", str(tmp_path), "--reward", "jpeg_compressibility",
                        "--reward-option", "aesthetic.weights=x")
    assert code == 2 and "names 'aesthetic', which is not a --reward" in out.err
    seen = {}
    real = rewards.load
    monkeypatch.setattr(rewards, "load", lambda name, **kw: seen.setdefault(name, kw) and real(name, **kw))
    run_cli(capsys, "guide", "--model", MODEL, "--lora", str(tmp_path), "--reward", "jpeg_compressibility",
            "--reward-option", "jpeg_compressibility.quality=50")  # the empty --lora folder then ends it
    assert seen == {"jpeg_compressibility": {"quality": 50}}
