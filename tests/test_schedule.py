"""Sigma grids, SDE windows and timestep subsampling."""
import pytest
import torch

from diffrl.schedule import flow_sigmas, mix_window_start, subsample_steps, window_mask


def test_flow_sigmas_linear_and_shifted():
    torch.testing.assert_close(flow_sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    s = flow_sigmas(4, shift=3.0)
    torch.testing.assert_close(s, torch.tensor([1.0, 2.25 / 2.5, 1.5 / 2.0, 0.75 / 1.5, 0.0]))


def test_window_mask_and_errors():
    assert window_mask(6, 2, 3).tolist() == [False, False, True, True, True, False]
    with pytest.raises(ValueError, match="does not fit"):
        window_mask(6, 4, 3)


def test_progressive_window_moves_and_rolls_back():
    starts = [mix_window_start(i, 8, 4, strategy="progressive", iters_per_move=2) for i in range(12)]
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 0, 0]


def test_decay_window_dwell_shrinks_with_position():
    """tau(l) = max(1, floor(10 (1 - l / 21) + l / 21)) for 25 steps, window 4: 10, 9, 9, 8, 8 iterations."""
    starts = [mix_window_start(i, 25, 4, strategy="decay", iters_per_move=10, min_iters=1) for i in range(44)]
    assert [starts.count(l) for l in range(5)] == [10, 9, 9, 8, 8]


def test_random_and_fixed_windows():
    g = torch.Generator().manual_seed(0)
    starts = {mix_window_start(0, 10, 3, strategy="random", generator=g) for _ in range(200)}
    assert starts == set(range(8))
    assert mix_window_start(99, 10, 3, strategy="fixed") == 0
    with pytest.raises(ValueError, match="unknown window strategy"):
        mix_window_start(0, 10, 3, strategy="sideways")


def test_subsample_steps_keeps_a_fraction_of_the_window():
    mask = window_mask(20, 0, 20)
    sub = subsample_steps(mask, 0.6, torch.Generator().manual_seed(0))
    assert int(sub.sum()) == 12
    sub = subsample_steps(window_mask(20, 5, 4), 0.5)
    assert int(sub.sum()) == 2 and not sub[:5].any() and not sub[9:].any()
