"""scripts/research/gradient_agreement.py (the signal share of a policy gradient) against synthetic gradients of
known signal share, and one tiny run of scripts/research/probe_gradient_snr.py."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from gradient_agreement import gradient_agreement
from research_helpers import probe_path

from tests_helpers import ROOT, SUBPROCESS_ENV, TINY


def _grads(n: int, dim: int, signal: float, noise: float, seed: int,
           s=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` gradients ``s + noise`` with ``|s| = signal`` (a random direction unless given) and
    ``E|noise|^2 = noise^2``."""
    g = torch.Generator().manual_seed(seed)
    if s is None:
        s = torch.randn(dim, generator=g, dtype=torch.float64)
        s = s / s.norm() * signal
    noises = torch.randn(n, dim, generator=g, dtype=torch.float64) * noise / math.sqrt(dim)
    return s, s + noises


@pytest.mark.parametrize("signal,noise", [(1.0, 1.0), (1.0, 4.0), (0.0, 1.0)])
def test_rho_estimates_the_signal_share_of_one_batch(signal, noise):
    _, grads = _grads(40, 20000, signal, noise, seed=1)
    out = gradient_agreement(grads)
    expected = signal**2 / (signal**2 + noise**2)  # 0.5, 1/17, 0
    assert out["rho"] == pytest.approx(expected, abs=0.01)
    assert out["pairwise_cos"] == pytest.approx(expected, abs=0.01)


def test_the_jackknife_standard_error_matches_the_spread_of_rho_over_fresh_draws():
    draws = [gradient_agreement(_grads(12, 4000, 1.0, 3.0, seed=100 + k)[1]) for k in range(30)]
    rhos = torch.tensor([d["rho"] for d in draws])
    se = torch.tensor([d["rho_se"] for d in draws]).mean()
    assert 0.6 < float(se / rhos.std()) < 1.6


def test_the_mean_of_batches_for_45deg_gradients_is_at_45_degrees():
    """Independent check of batches_for_45deg: average that many fresh batches and measure the angle to s."""
    s, grads = _grads(40, 20000, 1.0, 4.0, seed=2)
    n = round(gradient_agreement(grads)["batches_for_45deg"])
    assert 14 <= n <= 18  # (1 - 1/17) / (1/17) = 16
    cosines = [float(F.cosine_similarity(_grads(n, 20000, 1.0, 4.0, seed=10 + k, s=s)[1].mean(0), s, dim=0))
               for k in range(8)]
    assert sum(cosines) / len(cosines) == pytest.approx(math.cos(math.pi / 4), abs=0.03)


def test_pure_noise_needs_infinitely_many_batches_and_bad_shapes_raise():
    grads = torch.eye(4)  # orthogonal: no shared direction at all
    out = gradient_agreement(grads)
    assert out["rho"] == 0 and out["batches_for_45deg"] == math.inf
    with pytest.raises(ValueError, match="N >= 2"):
        gradient_agreement(torch.ones(1, 5))


def test_gradient_snr_probe_ends_with_its_json():
    vs = "train.objective=nft train.advantage=grpo"
    done = subprocess.run([sys.executable, probe_path("probe_gradient_snr"), "--batches", "3", "--toy",
                           "--config", "configs/tiny_shapes_tree.yaml", "--by-module", "--vs", vs, *TINY],
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])["rows"]
    assert len(rows) == 3 and "diffrl toy (tree GRPO)" in rows
    first, nft = [r for name, r in rows.items() if name.startswith("configs/")]
    assert nft["parameters"] == first["parameters"]  # the same LoRA, another objective
    assert list(rows)[1].endswith(vs)  # the --vs row: the common overrides, then its own
    for r in rows.values():
        assert -1 <= r["rho"] <= 1 and r["batches"] == 3 and r["parameters"] > 0
        if first["rho"] > 0:
            assert r["rho_vs_first"] == pytest.approx(r["rho"] / first["rho"])
        else:
            assert r["rho_vs_first"] is None
    assert rows["diffrl toy (tree GRPO)"]["samples_per_batch"] == 64
    groups = first["by_module"]  # every LoRA tensor sits in one block and on one projection: each split is a partition
    for kind in ("block ", "proj "):
        part = [g for key, g in groups.items() if key.startswith(kind)]
        assert len(part) >= 2 and sum(g["parameters"] for g in part) == first["parameters"]
        assert sum(g["grad_share"] for g in part) == pytest.approx(1.0)
    assert {"proj attn.to_q", "proj attn.to_out.0"} <= set(groups)
    bad = subprocess.run([sys.executable, probe_path("probe_gradient_snr"), "--batches", "1"],
                         capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=60, cwd=ROOT)
    assert bad.returncode != 0 and "--batches must be at least 2" in bad.stderr
