"""Two CPU processes under ``accelerate launch`` shard the prompts and compute the same advantages as one, and
share each evaluation's sampling."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests_helpers import LAUNCH, launch_train

pytestmark = pytest.mark.slow


def run(out: Path, launcher: list[str]) -> str:
    return launch_train(launcher, out, ["train.steps=2", "log.save_advantages=true", "log.eval_every=1",
                                        "data.eval_size=5", "data.eval_seeds=1"])


def test_two_processes_give_the_advantages_and_evaluations_of_one(tmp_path):
    run(tmp_path / "one", [sys.executable])
    log = run(tmp_path / "two", LAUNCH)
    assert "process 0 of 2 processes" in log and "process 1 of 2 processes" in log
    # Each process sampled 3 of the 5 held-out prompts (the last one padded): the base model's evaluation is what
    # one process measures; later ones follow the (equal up to rounding) training.
    evals = [json.loads((tmp_path / r / "summary.json").read_text())["evals"] for r in ("one", "two")]
    assert [e["step"] for e in evals[1]] == [e["step"] for e in evals[0]] == [0, 1, 2]
    assert evals[1][0] == pytest.approx(evals[0][0], abs=1e-9)
    for step in (1, 2):
        name = f"advantages_step{step:05d}.safetensors"
        one = load_file(str(tmp_path / "one" / name))["node_advantages"]
        two = load_file(str(tmp_path / "two" / name))["node_advantages"]
        assert one.shape == (4, 1 + 1 + 2 + 2 + 2) and one.abs().sum() > 0
        torch.testing.assert_close(one, two, atol=1e-5, rtol=0)


def _broadcast_in(rank: int, store_path: str, out_path: str) -> None:
    import json as json_

    import torch.distributed as dist

    from diffrl.distributed import from_first_process

    dist.init_process_group("gloo", rank=rank, world_size=2, store=dist.FileStore(store_path, 2))
    got = from_first_process({"accuracy": 0.25, "guard_x": float("nan"), "kind": "é"} if rank == 0 else {"no": 1})
    Path(f"{out_path}.{rank}").write_text(json_.dumps(got))
    dist.destroy_process_group()


def test_every_process_gets_the_first_processs_dict(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_broadcast_in, args=(str(tmp_path / "store"), str(tmp_path / "got")), nprocs=2,
                       start_method="spawn")
    for rank in (0, 1):
        got = json.loads((tmp_path / f"got.{rank}").read_text())
        assert got["accuracy"] == 0.25 and got["kind"] == "é" and got["guard_x"] != got["guard_x"] and "no" not in got


@pytest.mark.parametrize("rank, first, mine", [(0, 0, ["a", "b", "c"]), (1, 3, ["d", "e", "e"])])
def test_each_ddp_process_samples_its_share_of_the_evaluation(monkeypatch, rank, first, mine):
    from types import SimpleNamespace

    from diffrl import trainer

    calls = []

    def sample(adapter, prompts, seed, steps, scale, minibatch, reference, first=0):
        calls.append((prompts, first))
        return torch.arange(first, first + len(prompts)).float()[:, None]

    monkeypatch.setattr(trainer, "sample", sample)
    run = SimpleNamespace(world=2, rank=rank, adapter=SimpleNamespace(sharded=False), minibatch=8,
                          cfg=SimpleNamespace(sampler=SimpleNamespace(eval_steps=4, guidance_scale=1.0)))
    trainer.sample_images(run, list("abcde"), seed=0)
    assert calls == [(mine, first)]


def test_other_processes_stop_in_one_sentence_when_the_first_ones_evaluation_raises(monkeypatch):
    from types import SimpleNamespace

    from diffrl import trainer
    from diffrl.scoring import RewardError

    monkeypatch.setattr(trainer, "sample_images", lambda run, prompts, seed, reference=False: None)
    monkeypatch.setattr(trainer, "from_first_process", lambda obj=None: {trainer._EVAL_FAILED: "reward 'x' raised"})
    run = SimpleNamespace(rank=1, eval_prompts=["a"], cfg=SimpleNamespace(data=SimpleNamespace(eval_seeds=1)))
    with pytest.raises(RewardError, match="first process's evaluation failed: reward 'x' raised"):
        trainer.evaluate(run)
