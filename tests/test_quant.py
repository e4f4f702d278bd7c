"""diffrl.quant against the FP8/FP4 grids, hand-worked selections and closed-form rank correlations."""
import itertools

import pytest
import torch

from diffrl.quant import (
    FP4_GRID,
    EmulatedLowPrecisionLinear,
    choose_path,
    emulate_low_precision,
    fp4_round,
    fp8_round_trip,
    mxfp4_round_trip,
    nvfp4_round_trip,
    round_trip,
)
from diffrl.selection import mean_spearman, select_candidates, spearman


def e4m3_values() -> torch.Tensor:
    """Every finite float8 e4m3fn value, from its 256 bit patterns."""
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return v[torch.isfinite(v)]


def test_fp8_round_trip_is_exact_on_every_representable_value():
    v = e4m3_values()
    assert v.abs().max() == 448 and len(v) == 254  # 256 codes minus the two NaNs
    for scale in (1.0, 2.0 ** -7, 2.0 ** 5):
        x = (v * scale).reshape(2, -1)  # each row reaches +-448 * scale: the per-row scale is exactly `scale`
        assert torch.equal(fp8_round_trip(x), x)


def test_fp8_round_trip_error_is_within_half_an_ulp_of_e4m3():
    torch.manual_seed(0)
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]
    q = fp8_round_trip(x)
    scale = x.abs().amax(1, keepdim=True) / 448
    y = x / scale
    normal = y.abs() >= 2 ** -6
    assert ((q - x).abs() <= 2 ** -4 * x.abs() * 1.0001)[normal].all()  # 3 mantissa bits
    assert ((q - x).abs() <= 2 ** -10 * scale * 1.0001)[~normal].all()  # subnormal spacing 2^-9
    per_tensor = fp8_round_trip(x, per_row=False)
    assert (per_tensor - x).abs().max() <= 2 ** -4 * x.abs().max()
    assert torch.equal(round_trip(x, "fp8_tensor"), per_tensor) and torch.equal(round_trip(x, "fp8"), q)


def test_fp4_rounds_to_nearest_with_ties_to_even_and_saturates():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, 0.3, 2.9, 0.1, -0.75, -5.5, 0.0])
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 0.5, 3.0, 0.0, -1.0, -6.0, 0.0])
    assert torch.equal(fp4_round(x), want)
    grid = torch.tensor(FP4_GRID)
    assert torch.equal(fp4_round(grid), grid) and torch.equal(fp4_round(-grid), -grid)
    # Brute force on a fine sweep: the nearest grid value, a tie going to the even code (index in FP4_GRID).
    sweep = torch.linspace(-8, 8, 6401)
    dist = (sweep.abs()[:, None].clamp(max=6) - grid[None, :]).abs()
    best = dist.min(1, keepdim=True).values
    ties = (dist == best).float() * (1 + (torch.arange(8) % 2 == 0).float())  # prefer even codes on ties
    assert torch.equal(fp4_round(sweep), torch.copysign(grid[ties.argmax(1)], sweep))


@pytest.mark.parametrize("fn, block", [(nvfp4_round_trip, 16), (mxfp4_round_trip, 32)])
def test_fp4_block_round_trips_keep_grid_values_and_bound_the_error(fn, block):
    grid = torch.tensor(FP4_GRID)
    x = torch.cat([grid, -grid]).repeat(block // 16 * 4).reshape(-1, block) * 0.5  # amax 3: power-of-two scales
    assert torch.allclose(fn(x), x, rtol=1e-6, atol=0)
    torch.manual_seed(1)
    r = torch.randn(32, 8 * block) * 3
    q = fn(r)
    blocks, qb = r.reshape(32, -1, block), q.reshape(32, -1, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    # e2m1 keeps 1 mantissa bit (half-spacing <= |x| / 4 above 1 x scale); below, the spacing is 0.5 x scale.
    # The scale is amax / 6 rounded (e4m3 for NVFP4: +-1/16; MXFP4: down to a power of two, up to 2x smaller).
    scale = amax / 6 * (2 if fn is mxfp4_round_trip else 17 / 16)
    assert ((qb - blocks).abs() <= blocks.abs() / 4 + scale / 4 + 1e-6).all()
    assert not torch.equal(q, r) and q.shape == r.shape
    assert torch.equal(fn(torch.zeros(2, block)), torch.zeros(2, block))


def test_round_trip_pads_ragged_rows_and_rejects_unknown_formats():
    x = torch.randn(3, 21)
    assert round_trip(x, "nvfp4").shape == (3, 21) and round_trip(x, "mxfp4").shape == (3, 21)
    with pytest.raises(ValueError, match="unknown low-precision format 'int3'"):
        round_trip(x, "int3")


def test_emulated_linear_computes_on_the_grid_and_filters_choose_the_layers():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    x = torch.randn(5, 64)
    ref = model(x)
    names = emulate_low_precision(model, "fp8", skip=(), min_dim=8)
    assert names == ["0", "2"]
    layer = model[0]
    assert isinstance(layer, EmulatedLowPrecisionLinear)
    assert torch.equal(layer.weight, fp8_round_trip(layer.weight))  # stored on the grid
    out = model(x)
    assert not torch.equal(out, ref) and torch.allclose(out, ref, rtol=0.1, atol=0.05)
    small = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    assert emulate_low_precision(small, "nvfp4", skip=("1",), min_dim=32) == ["0"]
    assert type(small[1]) is torch.nn.Linear
    new = torch.randn(64, 64)
    small[0].set_weight(new)
    assert torch.equal(small[0].weight, nvfp4_round_trip(new))


def test_choose_path_says_which_path_runs_and_why():
    assert choose_path("fp8", "auto", "cpu", None, True)[0] == "emulated"
    assert "no CUDA device" in choose_path("fp8", "auto", "cpu", None, True)[1]
    assert choose_path("fp8", "auto", "cuda:0", (9, 0), True) == ("native", "torchao fp8 on compute capability 9.0")
    path, why = choose_path("nvfp4", "auto", "cuda", (9, 0), True)
    assert path == "emulated" and "10.0+" in why
    assert choose_path("fp8", "auto", "cuda", (8, 0), True)[0] == "emulated"
    assert "torchao is not installed" in choose_path("fp8", "auto", "cuda", (9, 0), False)[1]
    assert choose_path("mxfp4", "auto", "cuda", (10, 0), True)[0] == "native"
    assert choose_path("fp8", "emulated", "cuda", (9, 0), True)[0] == "emulated"
    path, why = choose_path("fp8", "auto", "cuda", (9, 0), True, torch.float32)  # the default model.dtype
    assert path == "emulated" and "take bfloat16 models and model.dtype is float32" in why
    with pytest.raises(ValueError, match="explore.backend native cannot run here: torchao's fp8 GEMMs take bfloat16"):
        choose_path("fp8", "native", "cuda", (9, 0), True, torch.float32)
    with pytest.raises(ValueError, match="explore.backend native cannot run here: no CUDA device"):
        choose_path("fp8", "native", "cpu", None, True)


def test_selection_strategies_on_hand_worked_examples():
    r = torch.tensor([[0.5, 0.9, 0.1, 0.4, 0.8, 0.3]])
    assert select_candidates(r, 2, "best_worst").tolist() == [[1, 2]]
    assert select_candidates(r, 3, "best_worst").tolist() == [[1, 2, 5]]  # one best, two worst (K - floor(K/2))
    # mean 0.5: deviations 0, .4, .4, .1, .3, .2 -> the ties .4 keep both, then .3
    assert select_candidates(r, 3, "mean_deviation").tolist() == [[1, 2, 4]]
    assert select_candidates(r, 2, "max_variance").tolist() == [[1, 2]]
    skew = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 0.9]])
    # {0, 0, 1} has variance .2222, more than {0, 1, .9} (.2022): two lowest and one highest, not one and two
    assert select_candidates(skew, 3, "max_variance").tolist() == [[0, 1, 4]]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = select_candidates(r.repeat(4, 1), 3, "random", g1), select_candidates(r.repeat(4, 1), 3, "random", g2)
    assert torch.equal(a, b) and all(len(set(row.tolist())) == 3 for row in a)
    with pytest.raises(ValueError, match="cannot keep 7 of 6"):
        select_candidates(r, 7)
    with pytest.raises(ValueError, match="unknown selection strategy 'top'"):
        select_candidates(r, 2, "top")


def test_max_variance_matches_brute_force_over_all_subsets():
    torch.manual_seed(3)
    for _ in range(20):
        r = torch.rand(1, 7)
        for k in (2, 3, 4, 5):
            got = select_candidates(r, k, "max_variance")[0]
            best = max(float(r[0, list(c)].double().var(unbiased=False)) for c in itertools.combinations(range(7), k))
            assert float(r[0, got].double().var(unbiased=False)) == pytest.approx(best, abs=1e-12)


def test_spearman_against_the_closed_form_and_a_tied_example():
    torch.manual_seed(4)
    a, b = torch.randn(12), torch.randn(12)
    d = (a.argsort().argsort() - b.argsort().argsort()).double()
    closed = 1 - 6 * float((d ** 2).sum()) / (12 * (12 ** 2 - 1))
    assert spearman(a, b) == pytest.approx(closed, abs=1e-12)
    assert spearman(a, 2 * a + 1) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    # ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]; of [1, 3, 2, 4] are [1, 3, 2, 4]: Pearson = 4.5 / sqrt(4.5 * 5)
    assert spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 3, 2, 4])) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert spearman(torch.ones(4), a[:4]) != spearman(torch.ones(4), a[:4])  # NaN for a constant vector
    assert mean_spearman(torch.stack([a[:4], torch.ones(4)]), torch.stack([a[:4], a[4:8]])) == pytest.approx(1.0)
