"""What happens when things go wrong: a run that goes non-finite stops and exports nothing
non-finite; a run directory is owned by one run; a hung reward cannot keep a run alive; a resume checks its config;
bad input is one sentence with exit code 2. (The reward server's limits: test_remote_limits.py; LoRAs that do not
fit: test_lora_mismatch.py.)"""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffrl import checkpoint, cli, rundir
from diffrl.config import RANGES, Config, ConfigError, load_config
from diffrl.finite import NonFiniteError, check_finite
from diffrl.scoring import submit
from tests_helpers import MODEL, ROOT, SUBPROCESS_ENV

CONFIG = str(ROOT / "configs" / "tiny_shapes.yaml")
SMALL = [f"model.path={MODEL}", "train.steps=2", "train.prompts_per_step=2", "train.trees_per_prompt=2",
         "data.eval_size=2", "data.eval_seeds=1", "sampler.eval_steps=2", "log.sample_every=0",
         "log.checkpoint_every=1", "log.tensorboard=false"]
"""The issue's SMALL settings: a run of the shipped model in seconds."""


def run_cli(capsys, *argv):
    """``diffrl ARGV`` in this process: (exit code, stderr)."""
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step run (EMA on, so a resume that turns it off has something to drop)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", CONFIG, "--out", str(out), *SMALL, "train.ema_decay=0.5"]) == 0
    return out


# 1. non-finite runs stop


def test_check_finite_names_the_quantity_and_the_first_bad_value():
    check_finite("ok", {"a": torch.ones(3), "b": 2.0})
    with pytest.raises(NonFiniteError, match=r"the advantages \['b'\] holds 1 non-finite of 3 values \(e.g. inf\)"):
        check_finite("the advantages", {"a": torch.ones(3), "b": torch.tensor([0.0, float("inf"), 1.0])})
    with pytest.raises(NonFiniteError, match="the gradient norm is nan"):
        check_finite("the gradient norm", torch.tensor(float("nan")))


def test_a_run_that_goes_nan_stops_non_zero_and_exports_nothing_non_finite(tmp_path, capsys):
    """The contract: ``train.lr=10`` exits non-zero and ``lora/`` holds no non-finite value (or does not exist)."""
    out = tmp_path / "x"
    code, err = run_cli(capsys, "train", CONFIG, "--out", str(out), *SMALL, "train.lr=10", "train.steps=3")
    assert code == 3
    last = err.strip().splitlines()[-1]  # the progress bars come before it
    assert last.startswith("diffrl: stopped at step") and "nothing was exported" in last
    if (out / "lora").exists():
        for f in (out / "lora").rglob("*.safetensors"):
            assert all(torch.isfinite(v).all() for v in load_file(str(f)).values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped_nonfinite" and summary["stopped_at_step"] >= 1
    for ckpt in out.glob("checkpoint-*"):  # whatever was checkpointed before the stop is finite
        assert all(torch.isfinite(v).all() for v in load_file(str(ckpt / "lora.safetensors")).values())


def huge(media, prompts):
    """A reward whose weighted sum overflows float32: 3e38 per sample (times the weight 10)."""
    return {"huge": torch.full((len(prompts),), 3e38)}


def test_an_infinite_weighted_reward_stops_the_first_step(tmp_path, capsys):
    code, err = run_cli(capsys, "train", CONFIG, "--out", str(tmp_path / "r"), *SMALL,
                        "rewards={'test_failures:huge': 10.0}")
    assert code == 3 and "stopped at step 1: the weighted reward holds" in err
    assert not (tmp_path / "r" / "lora").exists()
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["last_checkpoint"] is None


def test_a_base_model_holding_nan_weights_is_refused_before_training(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(MODEL, model)
    weights = next((model / "transformer").glob("*.safetensors"))
    sd = load_file(str(weights))
    key = sorted(sd)[0]
    sd[key] = torch.full_like(sd[key], float("nan"))
    save_file(sd, str(weights))
    code, err = run_cli(capsys, "train", CONFIG, "--out", str(tmp_path / "r"), *SMALL, f"model.path={model}")
    assert code == 3 and f"the weights of {model}" in err
    assert not (tmp_path / "r" / "lora").exists()


# 2. run-directory ownership


def test_a_finished_run_is_never_overwritten_without_asking(finished, capsys):
    """The contract: no --resume or --overwrite into a finished run's directory -> exit 2, its files unchanged."""
    before = snapshot(finished)
    code, err = run_cli(capsys, "train", CONFIG, "--out", str(finished), *SMALL)
    assert code == 2 and "holds another run" in err and "--overwrite" in err
    assert snapshot(finished) == before


def test_overwrite_replaces_the_run_and_keeps_other_files(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-000009").mkdir()  # a later checkpoint of the old run: must not survive into the new one
    code, _ = run_cli(capsys, "train", CONFIG, "--out", str(out), *SMALL, "train.steps=1", "--overwrite")
    assert code == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000001"]
    assert (out / "notes.txt").read_text() == "mine"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_live_run_locks_its_directory(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = rundir.RunLock(out)
    lock.acquire()  # this process is alive: the lock is live
    code, err = run_cli(capsys, "train", CONFIG, "--out", str(out), *SMALL)
    assert code == 2 and "is in use by a live run" in err and f"process {os.getpid()}" in err
    lock.release()
    assert not (out / "run.lock").exists()


def test_a_dead_process_s_lock_is_stale_and_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "start": "1"}))
    lock = rundir.RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (7, 8):  # an older run's later checkpoints
        (tmp_path / f"checkpoint-{step:06d}").mkdir()
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, {"lora": {"w": torch.ones(1)}}, {}, {})
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000003"]
    assert checkpoint.latest(tmp_path).name == "checkpoint-000003"


# 3. hung rewards


def test_reward_threads_never_keep_the_process_alive():
    seen = []
    future = submit(lambda: seen.append(threading.current_thread().daemon) or 7)
    assert future.result(timeout=5) == 7 and seen == [True]


HANG = ("import time\n_calls = []\n"
        "def forever(media, prompts):\n    while True:\n        time.sleep(1)\n"
        "def first_call(media, prompts):\n    _calls.append(1)\n"
        "    if len(_calls) == 1:\n        while True:\n            time.sleep(1)\n"
        "    return {'score': media.float().flatten(1).mean(1)}\n")


@pytest.mark.parametrize("reward, extra, code", [("forever", [], 2), ("first_call", ["train.rollout_chunks=2"], 0)],
                         ids=["always", "one chunk"])
def test_a_hung_reward_cannot_keep_the_run_alive(tmp_path, reward, extra, code):
    """The contract: a reward that sleeps forever with ``train.reward_timeout_s=5`` ends the run (non-zero) within
    120 s; a reward that hangs on one chunk only leaves the run to finish and exit (its thread is a daemon)."""
    (tmp_path / "hangs.py").write_text(HANG)
    env = {**SUBPROCESS_ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{SUBPROCESS_ENV['PYTHONPATH']}"}
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "diffrl", "train", CONFIG, "--out", str(tmp_path / "r"), *SMALL,
                           "train.steps=1", f"rewards={{'hangs:{reward}': 1.0}}", "train.reward_timeout_s=5", *extra],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == code, done.stderr[-2000:]
    assert time.monotonic() - t0 < 120
    if code:
        assert "ran past 'train.reward_timeout_s'" in done.stderr.splitlines()[-1]


# 4 and 9. values that are wrong, odd or absurd are refused before any model loads


@pytest.mark.parametrize("override, message", [
    ("train.max_grad_norm=-1", "'train.max_grad_norm' must be a finite number in (0, inf), got -1.0"),
    ("train.lr=.nan", "'train.lr' must be a finite number in (0, inf), got nan"),
    ("train.lr=.inf", "'train.lr' must be a finite number in (0, inf), got inf"),
    ("rewards={shapes_dense: .nan}", "'rewards.shapes_dense' weight must be a finite number, got nan"),
    ("sampler.noise_level=1.5", "'sampler.noise_level' must be a finite number in [0, 1], got 1.5"),
    ("sampler.noise_level=-0.1", "'sampler.noise_level' must be a finite number in [0, 1]"),
    ("model.lora_alpha=0", "'model.lora_alpha' must be a finite number in (0, inf), got 0"),
    ("train.kl_weight=-1", "'train.kl_weight' must be a finite number in [0, inf)"),
    ("log.eval_every=-1", "'log.eval_every' must be a finite number in [0, inf), got -1"),
    ("log.sample_every=-1", "'log.sample_every' must be a finite number in [0, inf), got -1"),
    ("train.clip_range=.nan", "'train.clip_range' must be a finite number in (0, inf), got nan"),
    ("train.prompts_per_step=100000000000000000000", "is more than 1000000: far beyond any run"),
    ("model.family=sd33", "unknown 'model.family' 'sd33'; choose one of"),
    ("rewards={shapez: 1}", "unknown reward 'rewards.shapez'"),
    ("train.lr=[1,", "the value is not valid YAML"),
])
def test_bad_values_exit_2_in_one_sentence_before_any_model_loads(override, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("diffrl.trainer.build", lambda *a: pytest.fail("the model started loading"))
    code, err = run_cli(capsys, "train", CONFIG, "--out", str(tmp_path / "r"), *SMALL, override)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_ppo_without_sde_noise_is_refused():
    with pytest.raises(ConfigError, match="'sampler.noise_level' 0 makes the rollouts deterministic"):
        load_config(CONFIG, ["train.objective=ppo", "train.advantage=tree", "sampler.noise_level=0"])
    load_config(CONFIG, ["sampler.noise_level=0"])  # DiffusionNFT trains on ODE rollouts


def test_every_range_is_stated_in_its_field_docstring():
    import ast

    tree = ast.parse((ROOT / "diffrl" / "config.py").read_text())
    docs = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr):
                docs[(cls.name, node.target.id)] = after.value.value
    for key, spec in RANGES.items():
        *path, name = key.split(".")
        owner = Config()
        for part in path:  # the dataclass holding the field, nested ones (train.pruning) too
            owner = getattr(owner, part)
        assert f"Range: {spec}." in docs.get((type(owner).__name__, name), ""), key


def test_a_huge_config_file_is_refused_unread(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("train:\n  lr: 0.1\n" + "# padding\n" * 200_000)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="a config is a few KB"):
        load_config(str(big))
    assert time.monotonic() - t0 < 1


# 5. resume checks its config


def test_resume_refuses_a_changed_config_and_lists_the_changes(finished, capsys):
    before = snapshot(finished)
    code, err = run_cli(capsys, "train", CONFIG, "--out", str(finished), *SMALL, "train.ema_decay=0.5", "--resume",
                        "train.lr=0.01", "train.objective=ppo", "train.advantage=tree", "train.steps=3")
    assert code == 2 and "--resume with a changed config" in err and "train.lr: 0.002 -> 0.01" in err
    assert "train.objective: 'nft' -> 'ppo'" in err and "train.steps" not in err  # steps may change
    code, err = run_cli(capsys, "train", CONFIG, "--out", str(finished), *SMALL, "--resume", "model.lora_rank=4",
                        "--allow-config-change")
    assert code == 2 and "--resume cannot change model.lora_rank: 8 -> 4" in err
    assert snapshot(finished) == before


def test_allowed_changes_are_written_and_logged_and_ema_off_exports_the_live_weights(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    code, _ = run_cli(capsys, "train", CONFIG, "--out", str(out), *SMALL, "train.steps=3", "train.lr=0.001",
                      "train.ema_decay=0", "--resume", "--allow-config-change")
    assert code == 0
    change = json.loads((out / "config_changes.jsonl").read_text())
    assert change == {"step": 2, "changes": {"train.ema_decay": [0.5, 0.0], "train.lr": [0.002, 0.001]}}
    assert load_config(str(out / "config.yaml")).train.lr == 0.001
    live = load_file(str(out / "checkpoint-000003" / "lora.safetensors"))
    exported = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert not (out / "checkpoint-000003" / "ema.safetensors").exists()
    sums = [sorted(v.sum().item() for v in sd.values()) for sd in (live, exported)]
    assert sums[0] == pytest.approx(sums[1])


def test_config_changes_compare_nested_keys_and_whole_reward_maps():
    saved = {"train": {"lr": 1.0, "steps": 2}, "rewards": {"a": 1.0}}
    new = {"train": {"lr": 2.0, "steps": 2}, "rewards": {"a": 1.0, "b": 1.0}}
    assert rundir.config_changes(saved, new) == {"rewards": ({"a": 1.0}, {"a": 1.0, "b": 1.0}), "train.lr": (1.0, 2.0)}


# 8. tracebacks that are one sentence now


def non_utf8(tmp_path: Path) -> Path:
    p = tmp_path / "latin1.txt"
    p.write_bytes("un carré rouge\n".encode("latin-1"))
    return p


@pytest.mark.parametrize("case", ["yaml", "prompts", "lora_targets", "cuda", "resolution", "out_file"])
def test_bad_input_that_needed_the_model_is_one_sentence(case, tmp_path, capsys):
    config, extra = CONFIG, []
    if case == "yaml":
        config = str(non_utf8(tmp_path))
    elif case == "prompts":
        extra = [f"data.prompts={non_utf8(tmp_path)}"]
    elif case == "lora_targets":
        extra = ["model.lora_targets=[no_such_layer]"]
    elif case == "cuda":
        extra = ["model.device=cuda:7"]
    elif case == "resolution":
        extra = ["model.resolution=30"]
    out = tmp_path / "r"
    if case == "out_file":
        out.write_text("")
    code, err = run_cli(capsys, "train", config, "--out", str(out), *SMALL, *extra)
    expected = {"yaml": "is not UTF-8 text", "prompts": "is not UTF-8 text", "lora_targets": "'model.lora_targets'",
                "cuda": "'model.device' is 'cuda:7' but no CUDA GPU", "resolution": "must be a multiple of 4 pixels",
                "out_file": "is a file, not a directory"}[case]
    assert code == 2 and expected in err.strip().splitlines()[-1].removeprefix("diffrl: ") and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["eval", "--n", "0"], "--n must be >= 1, got 0"),
    (["eval", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["sample", "--prompt", "a", "--num", "0"], "--num must be >= 1, got 0"),
    (["sample", "--prompt", "a", "--steps", "-2"], "--steps must be >= 1, got -2"),
    (["serve-reward", "shapes", "--port", "99999"], "cannot listen on 127.0.0.1:99999"),
])
def test_inference_and_server_arguments_are_checked(argv, message, capsys):
    code, err = run_cli(capsys, *argv)
    assert code == 2 and message in err


def test_serve_reward_on_a_busy_port_is_one_sentence(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, err = run_cli(capsys, "serve-reward", "shapes", "--port", str(busy.getsockname()[1]))
    assert code == 2 and "cannot listen on 127.0.0.1:" in err


def test_a_full_disk_during_a_checkpoint_is_one_sentence_and_the_previous_stays(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, {"lora": {"w": torch.ones(1)}}, {}, {})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot write checkpoint-000002 in .*No space left on "
                                                         r"device.*checkpoint-000001 is intact"):
        checkpoint.save(tmp_path, 2, {"lora": {"w": torch.ones(1)}}, {}, {})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-000001"]
    assert checkpoint.latest(tmp_path).name == "checkpoint-000001"


def test_the_guide_s_table_covers_every_exit_code():
    text = (ROOT / "docs" / "getting-started.md").read_text()
    table = text[text.index("## What happens when things go wrong"):]
    table = table[: table.index("\n## ", 10)]
    for code in cli.EXIT_CODES:
        if code != 1:  # a traceback is a bug, not a documented outcome
            assert f"| {code} |" in table, code
    assert "RESUME_MAY_CHANGE" in table and all(hasattr(rundir, n) for n in ("RESUME_MAY_CHANGE", "RESUME_NEVER"))


def test_a_zombie_s_lock_is_stale(tmp_path):
    """A process killed with SIGKILL whose parent has not reaped it yet (a launcher's worker) still answers
    ``kill(pid, 0)``; its lock is stale all the same."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (tmp_path / "run.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": child.pid,
                                                   "start": rundir._process_start(child.pid)}))
    with pytest.raises(rundir.RunDirError, match="in use by a live run"):
        rundir.RunLock(tmp_path).acquire()
    child.kill()
    time.sleep(0.5)  # a zombie now: not reaped until wait()
    lock = rundir.RunLock(tmp_path)
    lock.acquire()
    lock.release()
    child.wait()
