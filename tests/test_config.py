"""Config loading: every file under configs/ loads; bad keys, types and values fail naming file and key."""
from pathlib import Path

import pytest

from diffrl.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_file_loads():
    files = sorted(ROOT.glob("configs/**/*.yaml"))
    assert len(files) == 9, [f.name for f in files]  # a config lost or added without this test knowing fails here
    for f in files:
        assert isinstance(load_config(str(f)), Config)


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return str(p)


def test_unknown_and_misspelt_keys_name_the_file_and_suggest(tmp_path):
    p = write(tmp_path, "train:\n  lrr: 0.1\nsampler:\n  num_stepz: 3\nbogus: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"{p}: unknown key 'train.lrr' (did you mean 'train.lr'?)" in msg
    assert "'sampler.num_stepz' (did you mean 'sampler.num_steps'?)" in msg
    assert "unknown key 'bogus'" in msg


def test_wrong_types_and_impossible_values(tmp_path):
    p = write(tmp_path, "train:\n  steps: ten\nsampler:\n  num_steps: 10\n  split_steps: [2, 10]\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "'train.steps' must be int, got 'ten'" in str(e.value)
    assert "'sampler.split_steps' [10] lie past the last step 9" in str(e.value)


def test_group_size_of_one_is_an_error(tmp_path):
    p = write(tmp_path, "sampler:\n  split_steps: []\ntrain:\n  trees_per_prompt: 1\n")
    with pytest.raises(ConfigError, match="group size of 1"):
        load_config(p)


def test_overrides_and_yaml_exponent_floats(tmp_path):
    p = write(tmp_path, "train:\n  lr: 3e-4\n")
    cfg = load_config(p, ["train.steps=7", "sampler.kind=dance", "rewards.shapes=2"])
    assert cfg.train.lr == 3e-4 and cfg.train.steps == 7 and cfg.sampler.kind == "dance"
    assert cfg.rewards == {"shapes": 2.0}
    with pytest.raises(ConfigError, match="override 'train.nope=1': unknown key 'train.nope'"):
        load_config(p, ["train.nope=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(p, ["train.steps"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [1, 2\n"))


def test_reward_options_go_with_a_named_reward(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("rewards: {ocr: 1.0, jpeg_compressibility: 0.1}\nreward_options: {ocr: {engine: tesseract}}\n")
    assert load_config(str(good)).reward_options == {"ocr": {"engine": "tesseract"}}
    bad = tmp_path / "bad.yaml"
    bad.write_text("rewards: {ocr: 1.0}\nreward_options: {aesthetic: {weights: head.pth}}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: 'reward_options.aesthetic' names no reward in 'rewards'"):
        load_config(str(bad))


def test_nft_objective_needs_a_positive_a_max_and_a_known_estimator(tmp_path):
    p = write(tmp_path, "train:\n  objective: nft\n  advantage: tree\n  adv_clip: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "'train.adv_clip' must be a finite number in (0, inf), got 0" in str(e.value)
    with pytest.raises(ConfigError, match="'train.objective' must be one of"):
        load_config(p, ["train.objective=dpo"])
    with pytest.raises(ConfigError, match=r"'train.advantage' must be one of \['grpo', 'rloo', 'tree'\], got 'ppo'"):
        load_config(p, ["train.advantage=ppo", "train.adv_clip=5"])
    aggregations = r"'train.reward_aggregation' must be one of \['sum', 'mean', 'min', 'gdpo'\]"
    with pytest.raises(ConfigError, match=aggregations):
        load_config(p, ["train.reward_aggregation=max", "train.adv_clip=5"])


def test_reward_routing_must_route_every_reward_and_train_log_probs(tmp_path):
    p = write(tmp_path, "rewards: {aesthetic: 1.0, av_sync: 0.5}\n"
                        "train:\n  objective: nft\n  reward_routing: {av_sync: [video, audio], clip: [video]}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "'train.reward_routing' routes no stream for rewards ['aesthetic']" in msg
    assert "'train.reward_routing.clip' names no reward in 'rewards'" in msg
    assert "'train.reward_routing' trains each stream's log-probs with its own advantage: it needs 'train.objective' " \
           "ppo (nft's loss is one velocity error for the whole latent)" in msg


def test_public_api_loads_the_main_job_config_and_exposes_train():
    import diffrl

    cfg = diffrl.load_config(str(ROOT / "configs/tiny_shapes.yaml"), ["train.steps=3"])
    assert cfg.train.steps == 3 and cfg.model.path == "assets/tiny-sd3-shapes"
    assert callable(diffrl.train) and "train" in diffrl.__all__


def test_named_overrides_keep_bracketed_values_whole_and_name_a_bad_item():
    from diffrl.config import named_overrides

    assert named_overrides("flat") == ("flat", [])
    assert named_overrides("t:sampler.split_steps=[0,1,2],rewards={a: 1, b: 2},train.lr=1e-3") == (
        "t", ["sampler.split_steps=[0,1,2]", "rewards={a: 1, b: 2}", "train.lr=1e-3"])
    with pytest.raises(ConfigError, match="'train.lr' is not key=value"):
        named_overrides("x:train.steps=1,train.lr")
