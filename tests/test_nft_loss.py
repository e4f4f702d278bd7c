"""DiffusionNFT objective (arXiv 2509.16117) against a hand-worked example and its closed-form gradient."""
import pytest
import torch

from diffrl.loss import nft_loss


def test_hand_worked_single_element():
    """D = 1: x0 = 0, x_t = 1, sigma = 0.5, v_old = 1, v = 2, beta = 0.5, A = A_max (r = 1).

    v+ = 0.5 * 1 + 0.5 * 2 = 1.5, x0+ = 1 - 0.75 = 0.25, w+ = 0.25, positive term 0.0625 / 0.25 = 0.25;
    loss = (A_max / beta) * 0.25 = (2 / 0.5) * 0.25 = 1.0 (the negative term has weight 1 - r = 0).
    """
    one = torch.ones(1, 1)
    loss, stats = nft_loss(2 * one, one, one, 0 * one, torch.tensor([0.5]), torch.tensor([2.0]), beta=0.5, adv_max=2.0)
    torch.testing.assert_close(loss, torch.tensor(1.0))
    assert stats.clip_frac == 0 and stats.old_dev == pytest.approx(1.0)
    # r = 0: v- = 1.5 * 1 - 0.5 * 2 = 0.5, x0- = 0.75, term 0.5625 / 0.75 = 0.75, loss 4 * 0.75 = 3.
    loss, _ = nft_loss(2 * one, one, one, 0 * one, torch.tensor([0.5]), torch.tensor([-2.0]), beta=0.5, adv_max=2.0)
    torch.testing.assert_close(loss, torch.tensor(3.0))


@pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
def test_gradient_at_the_old_policy_is_advantage_weighted_flow_matching(beta):
    """At v = v_old: dL/dv = -A (2 sigma / w) (x0_hat - x0) / (B D), for any beta (|A| <= A_max)."""
    g = torch.Generator().manual_seed(0)
    b, d = 5, 12
    x0, eps = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    sigma = torch.rand(b, generator=g) * 0.8 + 0.1
    x_t = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
    v_old = torch.randn(b, d, generator=g)
    adv = torch.tensor([1.5, -0.5, 0.0, 3.0, -2.9])
    v = v_old.clone().requires_grad_(True)
    loss, _ = nft_loss(v, v_old, x_t, x0, sigma, adv, beta=beta, adv_max=3.0)
    loss.backward()
    err = x_t - sigma[:, None] * v_old - x0
    w = err.abs().mean(1, keepdim=True)
    expected = -adv[:, None] * 2 * sigma[:, None] / w * err / (b * d)
    torch.testing.assert_close(v.grad, expected, rtol=1e-4, atol=1e-7)


def test_clipped_advantages_saturate_and_are_counted():
    one = torch.ones(2, 3)
    l_big, s = nft_loss(2 * one, one, one, 0 * one, torch.full((2,), 0.5), torch.tensor([10.0, 7.0]), beta=1, adv_max=5)
    l_max, _ = nft_loss(2 * one, one, one, 0 * one, torch.full((2,), 0.5), torch.tensor([5.0, 5.0]), beta=1, adv_max=5)
    torch.testing.assert_close(l_big, l_max)
    assert s.clip_frac == 1.0


def test_kl_term_is_mean_squared_velocity_gap():
    v, v_old, ref = torch.zeros(2, 4), torch.zeros(2, 4), torch.full((2, 4), 3.0)
    args = (v, v_old, torch.ones(2, 4), torch.zeros(2, 4), torch.full((2,), 0.5), torch.zeros(2))
    base, _ = nft_loss(*args, beta=1, adv_max=1)
    with_kl, stats = nft_loss(*args, beta=1, adv_max=1, kl_weight=0.1, v_ref=ref)
    assert stats.kl == pytest.approx(9.0)
    torch.testing.assert_close(with_kl - base, torch.tensor(0.9))
    with pytest.raises(ValueError, match="v_ref"):
        nft_loss(*args, beta=1, adv_max=1, kl_weight=0.1)
