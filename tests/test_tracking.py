"""Trackers (``diffrl.tracking``): a real ``diffrl train`` of the tiny model logs its scalars, sample grids, config
and summary to an offline Weights & Biases run and to TensorBoard, read back with each tool's own reader; a tracker
that is not installed or not known stops the run before any model loads."""
import json
import struct
import subprocess
import sys

import pytest
from PIL import Image

from diffrl import cli, tracking, trainer
from diffrl.config import ConfigError, LogConfig, load_config
from tests_helpers import BRIGHT, MODEL, ROOT, SUBPROCESS_ENV, TINY

TREE = str(ROOT / "configs" / "tiny_shapes_tree.yaml")
TWO_STEPS = [*TINY, BRIGHT, "train.steps=2", "log.sample_every=1"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


BLOCK, HEADER = 32768, 7
"""The ``.wandb`` file is a LevelDB log (github.com/google/leveldb doc/log_format.md): a 7-byte file header (``:W&B``,
magic, version), then 32 KiB blocks of records, each a 7-byte header (checksum, length, type: 1 full, 2 first,
3 middle, 4 last) and data; a block's tail shorter than a header is padding."""


def wandb_records(path):
    """``(history rows by step, the run's config, its summary)`` of a ``.wandb`` file: the log read here, each record
    parsed with wandb's own protobuf schema (``wandb.proto.wandb_internal_pb2.Record``)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, parts, records = HEADER, b"", []
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        parts = (b"" if kind in (1, 2) else parts) + data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            records.append(Record.FromString(parts))

    def items(updates):
        return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in updates}

    history, config, summary = {}, {}, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = items(record.history.item)
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "run":
            config.update(items(record.run.config.update))
        elif kind == "summary":
            summary.update(items(record.summary.update))
    return history, config, summary


def test_an_offline_wandb_run_holds_the_scalars_grids_config_and_summary(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = {**SUBPROCESS_ENV, "WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "diffrl", "train", TREE, *TWO_STEPS, "log.trackers=[wandb]",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (out / "tensorboard").exists()  # log.trackers lists wandb alone
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (log_file,) = run_dir.glob("run-*.wandb")
    logged, config, wandb_summary = wandb_records(log_file)
    recorded = metrics(out)
    assert [m["step"] for m in recorded] == [1, 2]
    for m in recorded:
        assert logged[m["step"]]["reward_mean"] == pytest.approx(m["reward_mean"], rel=1e-6)
        assert logged[m["step"]]["kl"] == pytest.approx(m["kl"], rel=1e-6, abs=1e-12)
    assert sorted(step for step, row in logged.items() if "samples.path" in row) == [0, 1, 2]
    for step in (0, 1, 2):  # the base model's grid, then one after each step
        grid = Image.open(out / f"samples_step{step:05d}.png")
        assert logged[step]["samples._type"] == "image-file"
        assert (logged[step]["samples.width"], logged[step]["samples.height"]) == grid.size
        logged_grid = Image.open(run_dir / "files" / logged[step]["samples.path"])
        assert logged_grid.convert("RGB").tobytes() == grid.convert("RGB").tobytes()
    assert config["model"]["path"] == MODEL and config["train"]["steps"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert wandb_summary["status"] == "finished" and wandb_summary["steps"] == 2
    assert wandb_summary["final_accuracy"] == pytest.approx(summary["final_accuracy"])
    assert wandb_summary["base_accuracy"] == pytest.approx(summary["base_accuracy"])


def test_tensorboard_holds_the_scalars_grids_config_and_summary(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = trainer.train(load_config(TREE, [*TWO_STEPS, "train.steps=1", "log.tensorboard=true"]),
                            out=str(tmp_path))
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    for m in metrics(tmp_path):
        (scalar,) = [e for e in events.Scalars("reward_mean") if e.step == m["step"]]
        assert scalar.value == pytest.approx(m["reward_mean"], rel=1e-6)
    images = events.Images("samples")
    assert [e.step for e in images] == [0, 1, 1]  # the base model, after step 1, and the final grid (after step 1)
    assert (images[-1].width, images[-1].height) == Image.open(tmp_path / "samples_step00001.png").size
    texts = {tag: events.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()
             for tag in ("config", "summary")}
    assert f"path: {MODEL}" in texts["config"]
    assert json.loads(texts["summary"])["final_accuracy"] == pytest.approx(summary["final_accuracy"])


def test_a_tracker_that_is_not_installed_stops_the_run_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, as where it is not installed

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(trainer, "load_adapter_class", no_model)
    code = cli.main(["train", TREE, *TINY, "log.trackers=[tensorboard, wandb]", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "'log.trackers' lists wandb, which is not installed" in err and "diffrl[wandb]" in err


def test_an_unknown_tracker_is_a_config_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown tracker 'wandbb' in 'log.trackers'.*did you mean 'wandb'"):
        load_config(None, ["log.trackers=[tensorboard, wandbb]"])


@pytest.mark.parametrize("trackers, tensorboard, started", [
    (["tensorboard"], True, ["tensorboard"]),
    (["tensorboard"], False, []),  # configs of before log.trackers: log.tensorboard false still means no TensorBoard
    (["wandb", "tensorboard", "wandb"], True, ["wandb", "tensorboard"]),
    (["wandb", "tensorboard"], False, ["wandb"]),
    ([], True, []),
])
def test_log_tensorboard_false_leaves_tensorboard_out(trackers, tensorboard, started):
    assert tracking.active(LogConfig(trackers=trackers, tensorboard=tensorboard)) == started
