"""SDE and DDIM steps against closed forms and independent computations."""
import math

import pytest
import torch
from torch.distributions import Normal

from diffrl.sde import SDE_KINDS, ddim_step, gaussian_log_prob, sde_coefficients, sde_step

SHAPES = [(3, 4, 5, 6), (2, 3, 4, 5, 6)]  # image [B, C, H, W] and video [B, C, F, H, W]


@pytest.mark.parametrize("shape", SHAPES)
def test_gaussian_log_prob_matches_torch_normal(shape):
    g = torch.Generator().manual_seed(0)
    x, mu = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    std = torch.rand(shape[0], generator=g) + 0.1
    expected = Normal(mu, std.reshape(-1, *[1] * (len(shape) - 1))).log_prob(x)
    dims = tuple(range(1, len(shape)))
    torch.testing.assert_close(gaussian_log_prob(x, mu, std), expected.mean(dims))
    torch.testing.assert_close(gaussian_log_prob(x, mu, std, reduction="sum"), expected.sum(dims), rtol=1e-5, atol=1e-3)


def test_gaussian_log_prob_is_fp32_for_bf16_inputs():
    x = torch.randn(2, 8).bfloat16()
    lp = gaussian_log_prob(x, torch.zeros_like(x), 0.5)
    assert lp.dtype == torch.float32 and lp.shape == (2,)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["flow", "dance", "cps"])
def test_log_prob_of_sampled_step_matches_normal(shape, kind):
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    out = sde_step(x, v, 0.6, 0.5, kind=kind, noise_level=0.7, generator=g)
    assert out.log_prob.shape == (shape[0],) and out.std.shape == (shape[0],)
    expected = Normal(out.mean, out.std.reshape(-1, *[1] * (len(shape) - 1))).log_prob(out.x_next)
    torch.testing.assert_close(out.log_prob, expected.mean(tuple(range(1, len(shape)))))


def _flow_reference(x, v, s, s_next, a):
    """Flow-GRPO's expanded form (arXiv 2505.05470): x (1 + st^2 dt / 2s) + v (1 + st^2 (1 - s) / 2s) dt."""
    dt = s_next - s
    st = a * math.sqrt(s / (1 - (s_next if s == 1 else s)))
    mean = x * (1 + st**2 / (2 * s) * dt) + v * (1 + st**2 * (1 - s) / (2 * s)) * dt
    return mean, st * math.sqrt(-dt)


@pytest.mark.parametrize("s,s_next", [(1.0, 0.9), (0.6, 0.5), (0.1, 0.0)])
def test_flow_mean_and_std_match_expanded_form(s, s_next):
    x, v = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    out = sde_step(x, v, s, s_next, kind="flow", noise_level=0.7, noise=torch.zeros_like(x))
    mean, std = _flow_reference(x, v, s, s_next, 0.7)
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std, torch.full((4,), std))
    torch.testing.assert_close(out.x_next, mean)  # zero noise: x_next = mean


def test_dance_std_is_eta_sqrt_dt_and_drift_matches_flow_with_constant_sigma_t():
    x, v = torch.randn(2, 5), torch.randn(2, 5)
    out = sde_step(x, v, 0.8, 0.7, kind="dance", noise_level=0.3, noise=torch.zeros_like(x))
    torch.testing.assert_close(out.std, torch.full((2,), 0.3 * math.sqrt(0.1)))
    x0_hat = x - 0.8 * v
    score = -(x - 0.2 * x0_hat) / 0.8**2  # DanceGRPO's score estimate (arXiv 2505.07818)
    torch.testing.assert_close(out.mean, x + (0.7 - 0.8) * (v - 0.3**2 / 2 * score))


@pytest.mark.parametrize("kind", ["flow", "dance", "cps"])
def test_samples_have_the_reported_mean_and_std(kind):
    """Empirical mean and std of 20000 draws from one state (fixed seed, 6-sigma tolerances: cannot flake)."""
    n = 20000
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 6, generator=g).expand(n, 6).contiguous()
    v = torch.randn(1, 6, generator=g).expand(n, 6).contiguous()
    out = sde_step(x, v, 0.7, 0.55, kind=kind, noise_level=0.8, generator=g)
    std = out.std[0]
    assert torch.all(out.std == std)
    emp_mean, emp_std = out.x_next.mean(0), out.x_next.std(0)
    assert torch.all((emp_mean - out.mean[0]).abs() < 6 * std / math.sqrt(n))
    assert torch.all((emp_std / std - 1).abs() < 6 / math.sqrt(2 * n))


@pytest.mark.parametrize("kind,noise_level", [("flow", 0.7), ("dance", 0.7)])
def test_small_sde_steps_keep_the_flow_marginals(kind, noise_level):
    """Data at a point c, exact velocity v = (x - c) / sigma: x_sigma ~ N((1 - sigma) c, sigma^2) is preserved."""
    n, c, s, s_next = 200000, 2.0, 0.5, 0.495
    g = torch.Generator().manual_seed(3)
    x = (1 - s) * c + s * torch.randn(n, 1, generator=g)
    out = sde_step(x, (x - c) / s, s, s_next, kind=kind, noise_level=noise_level, generator=g)
    assert abs(out.x_next.mean().item() - (1 - s_next) * c) < 6 * s_next / math.sqrt(n)
    assert abs(out.x_next.var().item() / s_next**2 - 1) < 0.02


def test_cps_preserves_the_marginals_exactly_even_for_large_steps():
    n, c, s, s_next = 200000, -1.0, 0.9, 0.3
    g = torch.Generator().manual_seed(4)
    x = (1 - s) * c + s * torch.randn(n, 1, generator=g)
    out = sde_step(x, (x - c) / s, s, s_next, kind="cps", noise_level=0.8, generator=g)
    torch.testing.assert_close(out.std, torch.full((n,), s_next * math.sin(0.8 * math.pi / 2)))
    assert abs(out.x_next.mean().item() - (1 - s_next) * c) < 6 * s_next / math.sqrt(n)
    assert abs(out.x_next.var().item() / s_next**2 - 1) < 0.02


def test_ode_equals_the_euler_step_and_has_no_log_prob():
    x, v = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    out = sde_step(x, v, 0.4, 0.25, kind="ode")
    torch.testing.assert_close(out.x_next, x + (0.25 - 0.4) * v)
    assert out.log_prob is None and torch.all(out.std == 0)


def test_last_cps_step_is_deterministic_and_scores_zero():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    out = sde_step(x, v, 0.1, 0.0, kind="cps", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.x_next, x - 0.1 * v)  # x0_hat
    assert torch.all(out.log_prob == 0) and torch.all(out.std == 0)


def test_per_sample_sigmas_match_scalar_calls():
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    noise = torch.randn(2, 3, 4)
    sig, sig_next = torch.tensor([0.9, 0.4]), torch.tensor([0.8, 0.3])
    batched = sde_step(x, v, sig, sig_next, noise=noise)
    for i in range(2):
        single = sde_step(x[i : i + 1], v[i : i + 1], float(sig[i]), float(sig_next[i]), noise=noise[i : i + 1])
        torch.testing.assert_close(batched.x_next[i : i + 1], single.x_next)
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob)


def test_rescoring_the_stored_sample_gives_the_same_log_prob_exactly():
    x, v = torch.randn(4, 3, 8, 8).bfloat16(), torch.randn(4, 3, 8, 8).bfloat16()
    out = sde_step(x, v, 0.7, 0.6, generator=torch.Generator().manual_seed(0))
    assert out.x_next.dtype == torch.bfloat16
    again = sde_step(x, v, 0.7, 0.6, x_next=out.x_next)
    assert torch.equal(again.log_prob, out.log_prob)


def test_split_noise_scale_is_used_for_the_log_prob():
    x, v, noise = torch.randn(2, 16), torch.randn(2, 16), torch.randn(2, 16)
    base = sde_step(x, v, 0.5, 0.45, kind="dance", noise_level=0.3, noise=noise)
    scaled = sde_step(x, v, 0.5, 0.45, kind="dance", noise_level=0.3, noise=noise, noise_scale=4.0)
    torch.testing.assert_close(scaled.std, 4 * base.std)
    torch.testing.assert_close(scaled.x_next, base.mean + 4 * base.std[:, None] * noise)
    expected = Normal(scaled.mean, scaled.std[:, None]).log_prob(scaled.x_next).mean(1)
    torch.testing.assert_close(scaled.log_prob, expected)


def test_two_stream_dict_matches_per_stream_calls():
    g = torch.Generator().manual_seed(5)
    x = {"video": torch.randn(2, 4, 3, 4, 4, generator=g), "audio": torch.randn(2, 8, 16, generator=g)}
    v = {k: torch.randn(t.shape, generator=g) for k, t in x.items()}
    noise = {k: torch.randn(t.shape, generator=g) for k, t in x.items()}
    out = sde_step(x, v, 0.5, 0.4, noise=noise)
    assert set(out.log_prob) == {"video", "audio"}
    for k in x:
        single = sde_step(x[k], v[k], 0.5, 0.4, noise=noise[k])
        torch.testing.assert_close(out.x_next[k], single.x_next)
        torch.testing.assert_close(out.log_prob[k], single.log_prob)


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="not both"):
        sde_step(x, x, 0.5, 0.4, noise=x, x_next=x)
    with pytest.raises(ValueError, match="unknown SDE kind"):
        sde_step(x, x, 0.5, 0.4, kind="heun")
    with pytest.raises(ValueError, match="noise has shape"):
        sde_step(x, x, 0.5, 0.4, noise=torch.randn(3, 3))
    assert set(SDE_KINDS) == {"flow", "dance", "cps", "ode"}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers_ddim_scheduler(prediction_type, eta):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=prediction_type,
                          clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(50)
    t, t_prev = int(sched.timesteps[10]), int(sched.timesteps[11])
    g = torch.Generator().manual_seed(6)
    x, out_model, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    expected = sched.step(out_model, t, x, eta=eta, variance_noise=noise).prev_sample
    ab, ab_prev = sched.alphas_cumprod[t].item(), sched.alphas_cumprod[t_prev].item()
    ours = ddim_step(x, out_model, ab, ab_prev, eta=eta, prediction_type=prediction_type, noise=noise)
    torch.testing.assert_close(ours.x_next, expected, rtol=1e-4, atol=1e-5)
    if eta > 0:
        ref = Normal(ours.mean, ours.std[:, None, None, None]).log_prob(ours.x_next).mean((1, 2, 3))
        torch.testing.assert_close(ours.log_prob, ref)
    else:
        assert torch.all(ours.log_prob == 0)


def test_coefficients_reject_unknown_kind():
    with pytest.raises(ValueError):
        sde_coefficients(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.zeros(1), "nope", 0.7)
