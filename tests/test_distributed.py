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


def _first_process_in(rank: int, store_path: str, out_path: str) -> None:
    import json as json_

    import torch.distributed as dist

    from diffrl.distributed import FirstProcessError, first_process_runs, from_first_process

    def bad_reward():
        raise ValueError("reward 'x' returned NaN\nsecond line")

    dist.init_process_group("gloo", rank=rank, world_size=2, store=dist.FileStore(store_path, 2))
    got = {"sent": from_first_process({"accuracy": 0.25, "guard_x": float("nan"), "kind": "é"} if rank == 0
                                      else {"no": 1}),
           "ran": first_process_runs(lambda: {"scored_by": rank})}
    try:
        first_process_runs(bad_reward)
    except (ValueError, FirstProcessError) as e:
        got["raised"] = [type(e).__name__, str(e)]
    Path(f"{out_path}.{rank}").write_text(json_.dumps(got))
    dist.destroy_process_group()


def test_the_first_processs_work_and_its_failure_reach_every_process(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_first_process_in, args=(str(tmp_path / "store"), str(tmp_path / "got")), nprocs=2,
                       start_method="spawn")
    got = [json.loads((tmp_path / f"got.{rank}").read_text()) for rank in (0, 1)]
    for g in got:  # the first process's dict, JSON over a broadcast
        sent = g["sent"]
        assert sent["accuracy"] == 0.25 and sent["kind"] == "é" and sent["guard_x"] != sent["guard_x"]
        assert "no" not in sent
    assert got[0]["ran"] == {"scored_by": 0} and got[1]["ran"] is None  # only the first process ran it
    assert got[0]["raised"] == ["ValueError", "reward 'x' returned NaN\nsecond line"]
    assert got[1]["raised"] == ["FirstProcessError", "the first process failed: reward 'x' returned NaN"]


@pytest.mark.parametrize("rank, first, mine", [(0, 0, ["a", "b", "c"]), (1, 3, ["d", "e", "e"])])
def test_each_ddp_process_samples_its_share_of_the_evaluation(monkeypatch, rank, first, mine):
    from types import SimpleNamespace

    from diffrl import inference, trainer

    calls = []

    def sample(adapter, prompts, seed, steps, scale, max_batch, reference, first=0):
        calls.append((prompts, first))
        return torch.arange(first, first + len(prompts)).float()[:, None]

    monkeypatch.setattr(inference, "sample", sample)
    run = SimpleNamespace(world=2, rank=rank, adapter=SimpleNamespace(sharded=False), minibatch=8,
                          cfg=SimpleNamespace(sampler=SimpleNamespace(eval_steps=4, guidance_scale=1.0)))
    trainer.sample_images(run, list("abcde"), seed=0)
    assert calls == [(mine, first)]
