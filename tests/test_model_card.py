"""The embedded model's card is generated whole by scripts/pretrain_tiny.py, RL-evaluation scores included, and
those scores are what the command the card names prints."""
import importlib.util
import json
import subprocess
import sys

from tests_helpers import MODEL, ROOT, SUBPROCESS_ENV


def _pretrain_module():
    spec = importlib.util.spec_from_file_location("pretrain_tiny", ROOT / "scripts" / "pretrain_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rl_eval_scores_match_diffrl_eval():
    scores = _pretrain_module().rl_eval_scores(ROOT / "assets" / "tiny-sd3-shapes", n=8)
    done = subprocess.run([sys.executable, "-m", "diffrl", "eval", "--model", MODEL, "--n", "8"], capture_output=True,
                          text=True, env=SUBPROCESS_ENV, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == scores


def test_card_is_rebuilt_whole_from_training_json(tmp_path):
    card = json.loads((ROOT / "assets" / "tiny-sd3-shapes" / "training.json").read_text())
    card["rl_eval"] = {"accuracy": 0.4375, "accuracy_count": 0.5, "accuracy_relation": 0.375}
    card["rl_eval_n"] = 16
    _pretrain_module().write_card(tmp_path, card)
    text = (tmp_path / "README.md").read_text()
    assert "`diffrl eval --model assets/tiny-sd3-shapes --n 16`): strict\n0.438 on 16 prompts (count 0.500, relation " \
        "0.375)" in text
    assert "**Status.**" in text
    assert f"| count | {card['base_scores']['count_strict']:.2f} |" in text


def test_shipped_card_is_what_the_script_writes(tmp_path):
    card = json.loads((ROOT / "assets" / "tiny-sd3-shapes" / "training.json").read_text())
    _pretrain_module().write_card(tmp_path, card)
    assert (tmp_path / "README.md").read_text() == (ROOT / "assets" / "tiny-sd3-shapes" / "README.md").read_text()


def test_rewrite_card_needs_a_saved_model(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_tiny.py"), "--out", str(tmp_path),
                           "--rewrite-card"], capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120)
    assert done.returncode != 0
    assert "training.json does not exist: --rewrite-card needs a model this script saved" in done.stderr
