"""Checkpoints are atomic, keep the newest two, and load without unpickling arbitrary objects."""
import random

import torch

from diffrl import checkpoint


def test_save_load_round_trip_and_rng(tmp_path):
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    random.seed(5)
    torch.manual_seed(5)
    checkpoint.save(tmp_path, 3, {"lora": {"w": p.detach()}}, opt.state_dict(), {"history": [{"step": 3}]})
    expected = (random.random(), torch.rand(1))
    random.seed(0)
    torch.manual_seed(0)
    tensors, opt_state, state = checkpoint.load(checkpoint.latest(tmp_path))
    assert (random.random(), torch.rand(1)) == expected
    assert torch.equal(tensors["lora"]["w"], p.detach()) and state["step"] == 3
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    fresh.load_state_dict(opt_state)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_keeps_newest_and_ignores_half_written(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, {"lora": {"w": torch.zeros(1)}}, {}, {})
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*"))] == ["checkpoint-000002", "checkpoint-000003"]
    (tmp_path / "checkpoint-000009").mkdir()  # a crash before state.json was written
    assert checkpoint.latest(tmp_path).name == "checkpoint-000003"
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_save_cleans_up_what_a_killed_save_left(tmp_path):
    stale = tmp_path / ".tmp-checkpoint-abc123"  # a save killed after mkdtemp, before the rename
    stale.mkdir()
    (stale / "lora.safetensors").write_bytes(b"half")
    checkpoint.save(tmp_path, 4, {"lora": {"w": torch.zeros(1)}}, {}, {})
    assert not stale.exists() and checkpoint.latest(tmp_path).name == "checkpoint-000004"
