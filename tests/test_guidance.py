"""RL guidance and CFG combines."""
import torch

from diffrl.guidance import classifier_free_guidance, guidance_schedule, rl_guidance


def test_endpoints_are_exact():
    g = torch.Generator().manual_seed(0)
    ref, rl = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    assert torch.equal(rl_guidance(ref, rl, 0.0), ref)
    assert torch.equal(rl_guidance(ref, rl, 1.0), rl)


def test_linear_in_scale_and_per_sample_scales():
    ref, rl = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for w in (0.5, 1.5, 2.0, -0.5):
        torch.testing.assert_close(rl_guidance(ref, rl, w) - ref, w * (rl - ref))
    per = rl_guidance(ref, rl, torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(per[0], ref[0])
    torch.testing.assert_close(per[1], ref[1] + 2 * (rl[1] - ref[1]))


def test_cfg_per_model_then_rlg_matches_the_formula():
    g = torch.Generator().manual_seed(1)
    ru, rc, pu, pc = (torch.randn(2, 6, generator=g) for _ in range(4))
    v = rl_guidance(classifier_free_guidance(ru, rc, 4.5), classifier_free_guidance(pu, pc, 4.5), 1.5)
    ref = ru + 4.5 * (rc - ru)
    pol = pu + 4.5 * (pc - pu)
    torch.testing.assert_close(v, ref + 1.5 * (pol - ref))


def test_dict_streams():
    ref = {"video": torch.zeros(1, 2, 3), "audio": torch.zeros(1, 4)}
    rl = {"video": torch.ones(1, 2, 3), "audio": torch.ones(1, 4)}
    out = rl_guidance(ref, rl, 0.25)
    assert torch.all(out["video"] == 0.25) and torch.all(out["audio"] == 0.25)


def test_schedules():
    assert guidance_schedule(4, 2.0).tolist() == [2.0] * 4
    torch.testing.assert_close(guidance_schedule(5, 3.0, kind="ramp"), torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0]))
    assert guidance_schedule(4, 2.0, rl_only_steps=2).tolist() == [1.0, 1.0, 2.0, 2.0]
