"""The embedded model's card is generated whole by scripts/pretrain_tiny.py, RL-evaluation scores included, and
those scores are what the command the card names prints."""
import json
import subprocess
import sys

from tests_helpers import MODEL, ROOT, SUBPROCESS_ENV, load_script


def test_rl_eval_scores_match_diffrl_eval():
    scores = load_script("pretrain_tiny").rl_eval_scores(ROOT / "assets" / "tiny-sd3-shapes", n=8)
    done = subprocess.run([sys.executable, "-m", "diffrl", "eval", "--model", MODEL, "--n", "8"], capture_output=True,
                          text=True, env=SUBPROCESS_ENV, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed.pop("evaluator") == "shapes verifier (strict)" and printed == scores


def test_card_is_rebuilt_whole_from_training_json(tmp_path):
    """The scores the card states come from training.json: change them there and the rebuilt card states the new
    ones (the card's wording is not tested)."""
    card = json.loads((ROOT / "assets" / "tiny-sd3-shapes" / "training.json").read_text())
    card["rl_eval"] = {"accuracy": 0.4321, "accuracy_count": 0.1234, "accuracy_relation": 0.7654}
    card["rl_eval_n"] = 16
    card["rl_eval_cfg_free"] = {"accuracy": 0.2468, "accuracy_count": 0.1357, "accuracy_relation": 0.3579}
    card["base_scores"] = {**card["base_scores"], "count_strict": 0.1111, "relation_partial": 0.9876}
    load_script("pretrain_tiny").write_card(tmp_path, card)
    text = (tmp_path / "README.md").read_text()
    for score in ("0.432", "0.123", "0.765", "0.247", "0.136", "0.358", "0.11", "0.99"):
        assert score in text, score
    assert "--n 16" in text


def test_shipped_card_is_what_the_script_writes(tmp_path):
    card = json.loads((ROOT / "assets" / "tiny-sd3-shapes" / "training.json").read_text())
    load_script("pretrain_tiny").write_card(tmp_path, card)
    assert (tmp_path / "README.md").read_text() == (ROOT / "assets" / "tiny-sd3-shapes" / "README.md").read_text()


def test_rewrite_card_needs_a_saved_model(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_tiny.py"), "--out", str(tmp_path),
                           "--rewrite-card"], capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120)
    assert done.returncode != 0
    assert "training.json does not exist: --rewrite-card needs a model this script saved" in done.stderr


def test_kind_weights_parse_and_reach_the_card():
    module = load_script("pretrain_tiny")
    assert module.parse_kind_weights(None) is None
    assert module.parse_kind_weights("count=2,relation=4") == {"single": 0.0, "count": 2.0, "pair": 0.0,
                                                                "relation": 4.0}
    for bad in ("colour=1", "relation=x", "relation", "relation=0", "count=2,pair=-1"):
        try:
            module.parse_kind_weights(bad)
        except SystemExit as e:
            assert "--kind-weights" in str(e)
        else:
            raise AssertionError(f"{bad!r} was accepted")
    run = {"args": {"init": "x", "steps": 10, "lr": 8e-4, "batch": 64, "cosine": True, "kind_weights": "relation=4"},
           "train_s": 60.0, "weights": "ema"}
    assert module._command(run, "OUT") == ("python scripts/pretrain_tiny.py --out OUT --init OUT --steps 10 "
                                           "--lr 0.0008 --cosine --kind-weights relation=4")
    assert "prompt kinds weighted relation=4" in module._run_line(1, run)
    assert "shifted" not in module._run_line(1, run)
    run["args"]["shift"] = 3.0
    assert module._command(run, "OUT").endswith("--kind-weights relation=4 --shift 3")
    assert "prompt kinds weighted relation=4, noise levels shifted by 3)" in module._run_line(1, run)


def test_shifted_levels_follow_their_distribution():
    """``shifted_levels(u, k)`` for uniform ``u`` has CDF P(s <= x) = x / (k - (k - 1) x), inverted by hand from
    s = k u / (1 + (k - 1) u); shift 1 is the identity."""
    import torch

    shifted_levels = load_script("pretrain_tiny").shifted_levels
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(shifted_levels(u, 1.0), u)
    s = shifted_levels(u, 3.0)
    for x in (0.1, 0.3, 0.5, 0.75, 0.9):
        assert abs((s <= x).float().mean().item() - x / (3 - 2 * x)) < 0.005
    assert abs(s.median().item() - 0.75) < 0.005
    assert s.min() >= 0 and s.max() <= 1


def test_nonpositive_shift_is_refused(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_tiny.py"), "--out", str(tmp_path),
                           "--shift", "0"], capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120)
    assert done.returncode != 0
    assert "--shift 0: the noise-level shift must be positive" in done.stderr


def test_weighted_batches_draw_only_weighted_kinds():
    import random

    from diffrl.shapes import parse_prompt

    weights = {"single": 0.0, "count": 0.0, "pair": 0.0, "relation": 1.0}
    prompts, images = load_script("pretrain_tiny").batch(random.Random(0), 40, weights)
    assert images.shape == (40, 3, 32, 32)
    assert {parse_prompt(p).kind for p in prompts} == {"relation"}
