"""A finished run's export carries a model card the Hub reads (``diffrl.model_card``), and ``diffrl push``
(``diffrl.hub``) uploads exactly that folder, refusing in one sentence a run with nothing to push."""
import json
import re
import shutil

import pytest
import yaml

from diffrl import cli
from diffrl.config import load_config, to_dict
from diffrl.hub import push, upload_plan
from diffrl.model_card import card_text
from tests_helpers import BRIGHT, MODEL, ROOT, TINY

TREE = str(ROOT / "configs" / "tiny_shapes_tree.yaml")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real one-step ``diffrl train`` of the tiny model (LoRA), through the command line."""
    out = tmp_path_factory.mktemp("card") / "shapes-run"
    assert cli.main(["train", TREE, *TINY, BRIGHT, "train.steps=1", "--out", str(out)]) == 0
    return out


def split_card(text):
    """``(front matter as data, body)`` of a card that opens with ``---`` YAML ``---``."""
    assert text.startswith("---\n")
    meta, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(meta), body


def test_the_lora_card_names_base_model_tags_rewards_scores_grid_command_and_config(run):
    meta, body = split_card((run / "lora" / "README.md").read_text())
    assert meta["base_model"] == MODEL and meta["library_name"] == "diffusers"
    assert {"diffrl", "lora", "text-to-image", "reinforcement-learning", "sd3"} <= set(meta["tags"])
    assert "| `tests_helpers:brightness` | 1 |" in body  # the reward and its weight
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['base_accuracy']:.3f} -> {summary['final_accuracy']:.3f}" in body
    assert "`ppo`" in body  # tiny_shapes_tree.yaml's objective: the default
    (grid,) = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", body)
    assert (run / "lora" / grid).read_bytes() == (run / "samples_step00001.png").read_bytes()
    blocks = re.findall(r"```(\w+)\n(.*?)```", body, re.S)
    (command,) = [code for lang, code in blocks if lang == "bash"]
    assert command.startswith("diffrl train ") and f"--out {run}" in command and "train.steps=1" in command
    (config,) = [code for lang, code in blocks if lang == "yaml"]
    assert yaml.safe_load(config) == yaml.safe_load((run / "config.yaml").read_text())
    assert body.splitlines()[1] == "# shapes-run"  # titled after the run directory


def test_a_full_fine_tune_card_says_so():
    """Hand-made summary of a full fine-tune of a video family: no LoRA tag, the video task, the scores."""
    config = to_dict(load_config(None, ["model.lora_rank=0", "model.family=wan", "model.path=org/wan-base"]))
    summary = {"status": "finished", "steps": 3, "wall_s": 12.5, "base_accuracy": 0.25, "final_accuracy": 0.5,
               "evals": [{"step": 0, "accuracy": 0.25, "accuracy_count": 0.125},
                         {"step": 3, "accuracy": 0.5, "accuracy_count": 0.375}]}
    meta, body = split_card(card_text(config, summary, title="wan-run", evaluator="reward x", full=True))
    assert meta["base_model"] == "org/wan-base" and meta["base_model_relation"] == "finetune"
    assert "lora" not in meta["tags"] and {"text-to-video", "wan", "full-fine-tune"} <= set(meta["tags"])
    assert "**0.250 -> 0.500**" in body and "| accuracy_count | 0.125 | 0.375 |" in body
    assert "AutoModel.from_pretrained" in body and "![" not in body  # no grid given: no image


class FakeApi:
    """Records what ``HfApi`` would have been asked to do."""

    def __init__(self):
        self.repos, self.uploads = [], []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))
        return f"https://hub.example/{repo_id}"

    def upload_folder(self, **kwargs):
        self.uploads.append(kwargs)


def test_push_uploads_the_lora_folder_with_its_card_weights_and_grid(run):
    api = FakeApi()
    assert push(run, "me/shapes-lora", private=True, api=api) == "https://hub.example/me/shapes-lora"
    assert api.repos == [("me/shapes-lora", {"private": True, "exist_ok": True})]
    (upload,) = api.uploads
    assert upload["repo_id"] == "me/shapes-lora" and upload["path_in_repo"] is None
    folder = run / "lora"
    assert upload["folder_path"] == str(folder)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["README.md", "pytorch_lora_weights.safetensors", "samples_step00001.png"]


def test_a_full_fine_tune_with_two_experts_pushes_both(tmp_path):
    for name in ("transformer", "transformer_2"):
        (tmp_path / name).mkdir()
    (tmp_path / "transformer" / "README.md").write_text("---\nbase_model: org/base\n---\n")
    assert upload_plan(tmp_path) == [(tmp_path / "transformer", ""), (tmp_path / "transformer_2", "transformer_2")]
    api = FakeApi()
    push(tmp_path, "me/full", kind="full", api=api)
    assert [(u["folder_path"], u["path_in_repo"]) for u in api.uploads] == [
        (str(tmp_path / "transformer"), None), (str(tmp_path / "transformer_2"), "transformer_2")]


@pytest.mark.parametrize("layout, flags, message", [
    ({}, [], "holds no lora/ or transformer/ export"),
    ({"lora/pytorch_lora_weights.safetensors": ""}, [], "README.md is missing or has no Hub front matter"),
    ({"lora/README.md": "# a card without front matter\n"}, [], "README.md is missing or has no Hub front matter"),
    ({"lora/README.md": "---\nbase_model: x\n---\n"}, ["--full"], "holds no transformer/ export"),
])
def test_push_without_an_export_or_a_card_is_one_sentence(tmp_path, capsys, layout, flags, message):
    for name, text in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cli.main(["push", str(tmp_path), "me/repo", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("diffrl: push ") and message in err


def test_push_refuses_a_run_stopped_before_its_export(run, tmp_path, capsys):
    stopped = tmp_path / "stopped"
    shutil.copytree(run, stopped, ignore=shutil.ignore_patterns("lora"))
    assert cli.main(["push", str(stopped), "me/repo", "--lora"]) == 2
    assert "holds no lora/ export" in capsys.readouterr().err
