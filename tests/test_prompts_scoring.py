"""Prompt sources and robust reward scoring."""
import json
import math

import pytest
import torch

from diffrl.prompts import PromptError, PromptStream, eval_prompts, read_prompt_file
from diffrl.scoring import RewardError, score_batch


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\nfour blue squares\n")
    assert read_prompt_file(str(tmp_path / "p.txt")) == ["a red circle", "four blue squares"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    assert read_prompt_file(str(tmp_path / "p.jsonl")) == ["x"]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(PromptError, match="empty.txt is empty"):
        read_prompt_file(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(PromptError, match="line 1"):
        read_prompt_file(str(tmp_path / "bad.jsonl"))
    with pytest.raises(PromptError, match="does not exist"):
        read_prompt_file(str(tmp_path / "missing.txt"))


def test_prompt_stream_is_reproducible_and_excludes_held_out():
    held = eval_prompts("shapes:relation", 50)
    s = PromptStream("shapes:relation", seed=1, exclude=held)
    assert s.at(3, 16) == PromptStream("shapes:relation", seed=1, exclude=held).at(3, 16)
    assert s.at(3, 16) != s.at(4, 16)
    assert not set(s.at(3, 200)) & set(held)
    with pytest.raises(PromptError, match="unknown shapes kinds"):
        eval_prompts("shapes:rainbows", 4)


def flaky_reward(media, prompts):
    if any("bad" in p for p in prompts):
        raise RuntimeError("boom")
    return {"r": torch.tensor([math.nan if "nan" in p else 1.0 for p in prompts])}


def test_a_raising_or_nan_sample_is_dropped_with_a_warning(caplog):
    prompts = ["ok 1", "bad one", "ok 2", "a nan"]
    scores, valid = score_batch({"flaky": flaky_reward}, [None] * 4, prompts)
    assert valid.tolist() == [True, False, True, False]
    assert scores["flaky"].tolist() == [1.0, 0.0, 1.0, 0.0]
    text = caplog.text
    assert "reward 'flaky' raised on prompt 'bad one'" in text and "for prompt 'a nan'" in text


def test_a_reward_failing_everywhere_stops_the_run():
    with pytest.raises(RewardError, match="every sample"):
        score_batch({"flaky": flaky_reward}, [None] * 2, ["bad", "bad too"])


def test_rewards_run_concurrently_and_a_slow_one_times_out(caplog):
    import time

    def slow(media, prompts):
        time.sleep(1.0)
        return {"s": torch.ones(len(prompts))}

    def fast(media, prompts):
        return {"f": torch.full((len(prompts),), 2.0)}

    t0 = time.monotonic()
    scores, valid = score_batch({"slow": slow, "slow too": slow}, [None] * 2, ["a", "b"])
    assert time.monotonic() - t0 < 1.8 and valid.all()  # both slept at once
    t0 = time.monotonic()
    with pytest.raises(RewardError, match="every sample"):
        score_batch({"slow": slow, "fast": fast}, [None] * 2, ["a", "b"], timeout=0.2)
    assert time.monotonic() - t0 < 0.9
    assert "reward 'slow' took longer than 0.2 s on a batch of 2" in caplog.text
