"""Evaluators, the seam shared by the trainer's held-out evaluations and ``diffrl eval``."""
import json
import math

import pytest
import torch

from diffrl import cli
from diffrl.config import ConfigError, load_config
from diffrl.evaluation import RewardEvaluator, ShapesEvaluator, evaluator_for
from diffrl.trainer import train
from tests_helpers import BRIGHT, MODEL, ROOT, TINY

SHAPES = ["a red circle", "two blue squares"]


def half_nan(media, prompts):
    """1, 2, 3, ... with the second sample NaN (a reward that fails on it)."""
    out = torch.arange(1.0, len(prompts) + 1)
    out[1] = math.nan
    return {"score": out}


def test_auto_picks_the_verifier_for_the_grammar_and_the_first_reward_otherwise():
    assert isinstance(evaluator_for(SHAPES, {"r": half_nan}), ShapesEvaluator)
    picked = evaluator_for(["a cat on a mat"], {"r": half_nan, "s": half_nan})
    assert isinstance(picked, RewardEvaluator) and picked.name == "reward r"
    with pytest.raises(ValueError, match="the shapes verifier scores only prompts of the shapes grammar"):
        evaluator_for(["a cat on a mat"], {"r": half_nan}, "shapes")
    with pytest.raises(ValueError, match="must be auto, shapes or reward:NAME with NAME one of"):
        evaluator_for(SHAPES, {"r": half_nan}, "reward:q")


def test_the_reward_evaluator_averages_the_valid_samples():
    """Scores 1, NaN, 3, 4: the NaN sample is left out, the mean is (1 + 3 + 4) / 3."""
    result = RewardEvaluator("r", half_nan)(torch.zeros(4, 3, 8, 8), ["a", "b", "c", "d"])
    assert result == {"accuracy": pytest.approx(8 / 3)}


def test_a_run_can_be_evaluated_by_a_reward_on_shapes_prompts(tmp_path):
    summary = train(load_config(str(ROOT / "configs" / "tiny_shapes_tree.yaml"),
                                [*TINY, BRIGHT, "train.steps=1", "data.evaluator=reward:tests_helpers:brightness"]),
                    out=str(tmp_path))
    assert set(summary["evals"][0]) == {"step", "accuracy"}  # no per-kind verifier scores
    assert 0 < summary["base_accuracy"] < 1  # a mean brightness, not a 0/1 accuracy
    with pytest.raises(ConfigError, match="'data.evaluator': evaluator 'reward:ocr' must be"):
        train(load_config(str(ROOT / "configs" / "tiny_shapes_tree.yaml"),
                          [*TINY, "train.steps=1", "data.evaluator=reward:ocr"]), out=str(tmp_path / "b"))


def test_diffrl_eval_scores_any_prompt_file_with_a_reward(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat on a mat\na lighthouse at dusk\n")
    code = cli.main(["eval", "--model", MODEL, "--n", "2", "--steps", "2", "--prompts", str(prompts),
                     "--reward", "jpeg_compressibility"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["evaluator"] == "reward jpeg_compressibility" and result["accuracy"] < 0
    code = cli.main(["eval", "--model", MODEL, "--n", "2", "--steps", "2", "--prompts", str(prompts)])
    assert code == 2 and "diffrl eval --reward NAME" in capsys.readouterr().err
