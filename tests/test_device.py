"""Device discipline without a GPU: the trainer's collect / score / advantage / optimize phases run with
``model.device: cuda`` under ``PretendCuda`` (tests/pretend_cuda.py), which raises wherever real CUDA would on
mixed devices; each process takes the GPU its LOCAL_RANK names; collectives use GPU tensors under NCCL."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffrl import distributed, trainer, update
from diffrl.config import ConfigError, load_config
from diffrl.distributed import resolve_device
from pretend_cuda import DeviceMismatch, PretendCuda
from tests_helpers import BRIGHT, ROOT, TINY


@pytest.fixture
def one_gpu(monkeypatch):
    """torch.cuda answers as on a one-GPU Hopper machine (the tensors themselves come from PretendCuda)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))


# --- the checker itself -------------------------------------------------------------------------------------------

def test_pretend_cuda_raises_where_cuda_raises_and_allows_what_cuda_allows():
    with PretendCuda():
        x = torch.arange(4.0, device="cuda")
        cpu = torch.ones(4)
        idx = torch.tensor([0, 2], device="cuda")
        assert x.device == torch.device("cuda", 0) and x.is_cuda and not cpu.is_cuda
        for bad in (lambda: x + cpu, lambda: cpu[idx], lambda: torch.zeros(4).index_add_(0, idx, x[:2]),
                    lambda: torch.cat([x, cpu]), lambda: torch.where(x > 0, x, cpu),
                    lambda: torch.randn(2, generator=torch.Generator(), device="cuda"),
                    lambda: torch.nn.Linear(4, 2).to("cuda")(cpu)):
            with pytest.raises(DeviceMismatch):
                bad()
        # What CUDA accepts: CPU scalars, CPU indices into a CUDA tensor, moves in both directions.
        assert (x * torch.tensor(2.0))[torch.tensor([1])].tolist() == [2.0]
        back = x.cpu()
        assert back.device.type == "cpu" and x.is_cuda  # the move copied: the CUDA tensor keeps its label
        assert torch.equal(back + cpu, torch.tensor([1.0, 2.0, 3.0, 4.0]))


# --- which device each process takes ------------------------------------------------------------------------------

def test_each_process_takes_the_gpu_its_local_rank_names():
    assert resolve_device("cuda", local_rank=3, world=8, gpus=8) == torch.device("cuda", 3)
    assert resolve_device("cuda", local_rank=0, world=2, gpus=8) == torch.device("cuda", 0)
    assert resolve_device("cuda:5", local_rank=0, world=1, gpus=8) == torch.device("cuda", 5)
    assert resolve_device("auto", local_rank=1, world=2, gpus=2) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=1, world=2, gpus=0) == torch.device("cpu")
    assert resolve_device("cpu", local_rank=1, world=2, gpus=8) == torch.device("cpu")


@pytest.mark.parametrize("device,local_rank,world,gpus,message", [
    ("cuda", 0, 1, 0, "no CUDA GPU is visible"),
    ("cuda", 2, 4, 2, r"wants cuda:2 \(LOCAL_RANK 2.*only 2 GPU"),
    ("cuda:1", 0, 2, 2, "names one GPU, but 2 processes"),
    ("tpu", 0, 1, 0, "must be cpu, cuda, cuda:N or auto"),
])
def test_impossible_devices_are_one_sentence(device, local_rank, world, gpus, message):
    with pytest.raises(ConfigError, match=message):
        resolve_device(device, local_rank, world, gpus)


def test_setup_makes_the_local_rank_gpu_current(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    place = distributed.setup("cuda", env={"WORLD_SIZE": "1", "LOCAL_RANK": "2"})
    assert place.device == torch.device("cuda", 2) and chosen == [torch.device("cuda", 2)]
    assert (place.rank, place.world, place.local_rank) == (0, 1, 2)


# --- collectives run on the device the backend needs ----------------------------------------------------------------

@pytest.mark.parametrize("backend,expected", [("nccl", "cuda:0"), ("gloo", "cpu")])
def test_collectives_use_device_tensors_under_nccl_and_cpu_tensors_under_gloo(monkeypatch, one_gpu, backend, expected):
    seen = []
    mode = PretendCuda()

    def all_gather(parts, t):
        seen.append(mode.label(t))
        for i, p in enumerate(parts):
            p.copy_(t + i)

    def all_reduce(t, op=None):
        seen.append(mode.label(t))

    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: backend)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "all_gather", all_gather)
    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    with mode:
        rows = distributed.gather_rows(torch.tensor([1.0, 2.0]))  # a CPU tensor (rewards are scored on the CPU)
        assert rows.device.type == "cpu" and rows.tolist() == [1.0, 2.0, 2.0, 3.0]
        on_gpu = distributed.gather_rows(torch.tensor([1.0], device="cuda"))
        assert on_gpu.is_cuda
        distributed.max_over_processes(3)
        p = torch.nn.Parameter(torch.ones(2, device="cuda"))
        distributed.average_gradients([p])
        distributed.mean_over_processes({"kl": 1.0}, ("kl", "clip_frac"))
    assert seen and all(s == expected for s in seen), seen


# --- the trainer's phases on a pretended GPU, against the same step on the CPU --------------------------------------

MODES = {
    "clipped-ratio tree": ("tiny_shapes_tree.yaml", []),
    "DiffusionNFT": ("tiny_shapes.yaml", []),
    "rloo gdpo off-policy epochs": ("tiny_shapes_tree.yaml", ["train.advantage=rloo", "train.reward_aggregation=gdpo",
                                    "train.inner_epochs=2", "train.updates_per_epoch=2",
                                    "sampler.timestep_fraction=0.5", "train.kl_weight=0.1"]),
    "grpo on tree leaves": ("tiny_shapes_tree.yaml", ["train.advantage=grpo"]),
    "NFT full fine-tuning, EMA, snapshot": ("tiny_shapes.yaml", ["model.lora_rank=0", "train.inner_epochs=2",
                                           "train.ema_decay=0.9", "train.lr=1e-5"]),
    "reward routing": ("tiny_shapes_tree.yaml", ["model.family=tests_helpers:TwoStreamSD3", "train.advantage=grpo",
                       "train.reward_routing={'tests_helpers:brightness': [video]}"]),
    "exploration": ("tiny_shapes_explore.yaml", ["explore.candidates=2"]),
}


def _cfg(name: str, extra: list[str], device: str):
    config, overrides = MODES[name]
    return load_config(str(ROOT / "configs" / config), [*TINY, BRIGHT, *overrides, *extra, f"model.device={device}"])


def _one_step(cfg, out: Path) -> tuple[dict, list[torch.Tensor]]:
    from diffrl.state import TrainState

    run = trainer.build(cfg, out)
    metrics = trainer.train_step(run, TrainState(), 0)
    return metrics, [p.detach().clone() for p in run.adapter.trainable_parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODES))
def test_a_training_step_on_cuda_mixes_no_devices_and_computes_what_the_cpu_computes(tmp_path, one_gpu, name):
    expected, cpu_weights = _one_step(_cfg(name, [], "cpu"), tmp_path / "cpu")
    with PretendCuda() as mode:
        got, cuda_weights = _one_step(_cfg(name, [], "cuda"), tmp_path / "cuda")
        assert all(mode.label(w) == "cuda:0" for w in cuda_weights)
    assert mode.calls > 1000  # the mode saw the step, not a short cut
    for key in ("reward_mean", "reward_std", "kl", "trained_edges", "clip_frac"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    for a, b in zip(cpu_weights, cuda_weights):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _old_prompt_groups(prompts, device):
    """The release's ``_prompt_groups``: ids on the CPU whatever the rollout's device."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(p, len(ids)) for p in prompts])


def _old_step_groups(tr, mask, k):
    """The release's ``_step_groups``: a CPU ``arange`` scattered with the rollout's device indices."""
    e = (mask & (tr.step == k)).nonzero().flatten()
    keys = tr.tree[e] * (int(tr.parent.max()) + 1) + tr.parent[e]
    uniq, inverse = torch.unique(keys, return_inverse=True)
    first = torch.zeros(len(uniq), dtype=torch.long).scatter_reduce_(0, inverse, torch.arange(len(e)), "amin",
                                                                     include_self=False)
    return e, e[first], inverse


def _old_nft_points(original):
    def points(run, batch, mask, step):
        return tuple(t.cpu() for t in original(run, batch, mask, step))
    return points


@pytest.mark.slow
@pytest.mark.parametrize("name,module,attr,replacement", [
    ("clipped-ratio tree", trainer, "_prompt_groups", lambda: _old_prompt_groups),
    ("clipped-ratio tree", update, "_step_groups", lambda: _old_step_groups),
    ("DiffusionNFT", update, "nft_points", lambda: _old_nft_points(update.nft_points)),
])
def test_reintroducing_a_known_device_mix_fails(tmp_path, monkeypatch, one_gpu, name, module, attr, replacement):
    monkeypatch.setattr(module, attr, replacement())
    with PretendCuda(), pytest.raises(DeviceMismatch):
        _one_step(_cfg(name, [], "cuda"), tmp_path)
