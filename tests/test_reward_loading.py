"""diffrl.load_reward: built-in names, dotted paths and entry-point plug-ins (the contract checks outside call)."""
import subprocess
import sys
import textwrap

import pytest
import torch

import diffrl


def test_builtin_name_and_dotted_path():
    images = torch.zeros(2, 3, 32, 32)
    out = diffrl.load_reward("shapes")(images, ["a red circle", "two blue squares"])
    assert set(out) == {"strict", "partial"} and out["strict"].shape == (2,) and out["strict"].dtype == torch.float32
    path = diffrl.load_reward("rewards.jpeg:build_compressibility", quality=50)
    assert path(images, ["", ""])["jpeg_compressibility"].shape == (2,)


def test_unknown_names_say_what_exists():
    with pytest.raises(ValueError, match="unknown reward 'aesthetik'.*built-in rewards are"):
        diffrl.load_reward("aesthetik")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        diffrl.load_reward("no_such_pkg.mod:fn")


def test_an_installed_plugin_registers_by_entry_point(tmp_path):
    (tmp_path / "my_reward_pkg.py").write_text(textwrap.dedent("""
        import torch
        def build(scale=1.0):
            return lambda media, prompts: {"mine": torch.full((len(prompts),), scale)}
    """))
    dist = tmp_path / "my_reward_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-reward-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[diffrl.rewards]\nmine = my_reward_pkg:build\n")
    code = "import diffrl; print(diffrl.load_reward('mine', scale=2.5)(None, ['a', 'b'])['mine'].tolist())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(tmp_path)}, check=True)
    assert out.stdout.strip() == "[2.5, 2.5]"


def test_rewards_declare_modalities_and_differentiability():
    import rewards

    assert rewards.modalities(diffrl.load_reward("av_sync")) == ("video", "audio")
    assert rewards.modalities(diffrl.load_reward("shapes")) == ("image",)
    assert not rewards.is_differentiable(diffrl.load_reward("jpeg_compressibility"))
    video = diffrl.load_reward("video:jpeg_compressibility")
    assert rewards.modalities(video) == ("video",) and not rewards.is_differentiable(video)

    def custom(media, prompts):
        return {"x": torch.zeros(len(prompts))}

    assert rewards.modalities(custom) == ("image",)
    described = rewards.describe(custom, ("audio",), differentiable=True)
    assert rewards.modalities(described) == ("audio",) and rewards.is_differentiable(described)


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_examples_custom_rewards_load_three_ways(tmp_path):
    images = torch.zeros(2, 3, 8, 8)
    images[0, 0] = 1.0
    red = diffrl.load_reward("examples.custom_reward:redness")(images, ["a", "b"])["redness"]
    assert red.tolist() == [1.0, 0.0]
    sat = diffrl.load_reward("examples.custom_reward:Saturation", power=2.0)
    assert sat(images, ["a", "b"])["saturation"].tolist() == [1.0, 0.0]
    # the plug-in package: its entry point names its build function
    meta = (ROOT / "examples/reward_plugin/pyproject.toml").read_text()
    assert '[project.entry-points."diffrl.rewards"]\nredness = "redness_reward:build"' in meta
    code = ("import sys; sys.path.insert(0, 'examples/reward_plugin/src'); import torch, redness_reward; "
            "x = torch.zeros(1, 3, 4, 4); x[:, 0] = 1; "
            "print(redness_reward.build(scale=2)(x, ['a'])['redness'].item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "2.0"
    # the CLI resolves dotted paths from the current directory, and serves them
    proc = subprocess.Popen([sys.executable, "-m", "diffrl", "serve-reward", "examples.custom_reward:redness",
                             "--port", "0"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        url = proc.stdout.readline().split()[4]
        remote = diffrl.load_reward("remote", url=url)(images, ["a", "b"])["redness"]
        assert remote.tolist() == [1.0, 0.0]
    finally:
        proc.terminate()
        proc.wait(10)
