"""Policy loss against closed forms, and its gradient on a toy Gaussian policy."""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffrl.loss import effective_clip_range, gaussian_kl, policy_loss, ratio_norm_log_ratio
from diffrl.sde import gaussian_log_prob


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, mu_ref = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    std = torch.rand(3, generator=g) + 0.2
    s = std[:, None, None]
    expected = kl_divergence(Normal(mu, s), Normal(mu_ref, s)).mean((1, 2))
    torch.testing.assert_close(gaussian_kl(mu, mu_ref, std), expected)


def test_on_policy_loss_is_minus_mean_advantage_with_no_clipping():
    lp = torch.randn(6)
    adv = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0])
    loss, stats = policy_loss(lp, lp.clone(), adv, clip_range=0.2, num_elements=1)
    torch.testing.assert_close(loss, -adv.mean())
    assert stats.clip_frac == 0 and stats.ratio_mean == 1 and stats.approx_kl == 0


def test_clipping_hand_worked():
    """rho = 1.5, c = 0.2: A > 0 is clipped at 1.2 (no gradient); A < 0 keeps the unclipped, pessimistic term."""
    old = torch.zeros(2)
    lp = torch.full((2,), math.log(1.5), requires_grad=True)
    loss, stats = policy_loss(lp, old, torch.tensor([1.0, -1.0]), clip_range=0.2, num_elements=1)
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 1.5) / 2))
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([0.0, 1.5 / 2]))
    assert stats.clip_frac == 1.0


def test_effective_clip_range_conversion():
    assert effective_clip_range(0.2, 1) == 0.2
    assert effective_clip_range(0.0256, 65536) == pytest.approx(1e-4)  # Flow-GRPO's 1e-4 at SD3.5 512 px latents
    assert effective_clip_range(0.1, 100, "sum") == pytest.approx(1.0)


def _clip_fraction(dims: int, clip_range: float, num_elements: int, n: int = 4000, delta: float = 0.01) -> float:
    """Old policy N(0, 1) per element, new policy shifted by delta: clip fraction of mean-reduced log-ratios."""
    g = torch.Generator().manual_seed(dims)
    x = torch.randn(n, dims, generator=g)
    old = gaussian_log_prob(x, torch.zeros_like(x), 1.0)
    new = gaussian_log_prob(x, torch.full_like(x, delta), 1.0)
    _, stats = policy_loss(new, old, torch.ones(n), clip_range=clip_range, num_elements=num_elements)
    return stats.clip_frac


def test_clip_range_means_the_same_thing_at_every_resolution():
    """Per-element log-ratio ~ N(0, delta^2): the normalised clip fraction is P(|N(0, 1)| > 1) ~ 0.317 at any D."""
    small, large = _clip_fraction(16, 0.01, 16), _clip_fraction(4096, 0.01, 4096)
    assert abs(small - 0.317) < 0.04 and abs(large - 0.317) < 0.04
    # The anchors' fixed epsilon, tuned at D = 16, clips almost nothing at D = 4096.
    assert _clip_fraction(4096, 0.01 / 4, 1) < 0.01


def test_kl_term_is_added_with_its_weight():
    lp = torch.zeros(2)
    mu, ref = torch.ones(2, 3), torch.zeros(2, 3)
    std = torch.tensor([0.5, 1.0])
    loss, stats = policy_loss(lp, lp, torch.zeros(2), clip_range=0.2, num_elements=3, kl_weight=0.1, mean=mu,
                              ref_mean=ref, std=std)
    kl = (1 / (2 * 0.25) + 1 / 2) / 2
    assert stats.kl == pytest.approx(kl)
    torch.testing.assert_close(loss, torch.tensor(0.1 * kl))
    with pytest.raises(ValueError, match="kl_weight"):
        policy_loss(lp, lp, torch.zeros(2), clip_range=0.2, num_elements=3, kl_weight=0.1)


def test_positive_advantage_sample_becomes_more_likely_after_one_step():
    """Toy Gaussian policy N(theta, 0.5^2) over 8-D actions; one SGD step on the loss."""
    torch.manual_seed(0)
    theta = torch.zeros(8, requires_grad=True)
    std = torch.tensor(0.5)
    actions = theta.detach() + 0.5 * torch.randn(4, 8)
    old = gaussian_log_prob(actions, theta.detach().expand(4, 8), std)
    adv = torch.tensor([2.0, -1.0, 0.0, -1.0])
    new = gaussian_log_prob(actions, theta.expand(4, 8), std)
    loss, _ = policy_loss(new, old, adv, clip_range=0.2, num_elements=8)
    loss.backward()
    with torch.no_grad():
        theta -= 0.1 * theta.grad
        after = gaussian_log_prob(actions, theta.expand(4, 8), std)
    assert after[0] > old[0]  # the positive-advantage sample
    assert after[1] < old[1] and after[3] < old[3]


def test_ratio_norm_removes_the_mean_shift_bias():
    """x ~ old policy; new mean shifted by delta: E[log ratio] = -delta^2 / 2s^2 (mean-reduced); RatioNorm -> 0."""
    g = torch.Generator().manual_seed(1)
    n, d, s, delta = 20000, 16, 0.5, 0.2
    old_mean, new_mean = torch.zeros(n, d), torch.full((n, d), delta)
    x = old_mean + s * torch.randn(n, d, generator=g)
    lr = gaussian_log_prob(x, new_mean, s) - gaussian_log_prob(x, old_mean, s)
    assert lr.mean().item() == pytest.approx(-(delta**2) / (2 * s**2), abs=0.005)
    normed = ratio_norm_log_ratio(lr, new_mean, old_mean, torch.full((n,), s), d)
    assert abs(normed.mean().item()) < 0.002
    torch.testing.assert_close(normed, s * (lr + delta**2 / (2 * s**2)))


def test_flow_grpo_kl_convention_is_the_exact_kl_times_dsigma_by_hand():
    """Hand-worked: mu - mu_ref = 0.3 in every element, the flow SDE's std 0.1 at a step with dsigma 0.05, so
    sigma_t^2 = std^2 / dsigma = 0.2. Exact KL per element 0.09 / (2 * 0.01) = 4.5; Flow-GRPO's 0.09 / (2 * 0.2)
    = 0.225."""
    from diffrl.loss import kl_convention_scale

    mean, ref = torch.full((1, 4), 0.3), torch.zeros(1, 4)
    std, sigma, sigma_next = torch.tensor([0.1]), torch.tensor([0.55]), torch.tensor([0.5])
    lp = torch.zeros(1)
    for convention, expected in (("exact", 4.5), ("flow_grpo", 0.225)):
        _, stats = policy_loss(lp, lp, torch.zeros(1), clip_range=0.2, num_elements=4, kl_weight=1.0, mean=mean,
                               ref_mean=ref, std=std, kl_scale=kl_convention_scale(sigma, sigma_next, convention))
        assert stats.kl == pytest.approx(expected, rel=1e-5)
