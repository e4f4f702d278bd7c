"""The learning-rate schedule: hand-worked values and its config errors."""
import math

import pytest

from diffrl.config import ConfigError, load_config
from diffrl.update import lr_at


def test_warmup_then_cosine_and_linear_decay_by_hand():
    # 5 steps, 1 warm-up step: step 0 at lr / 2, then u = (k - 1) / 4 for k = 1..4
    assert [lr_at(k, 2.0, "cosine", 5, 1) for k in range(5)] == pytest.approx(
        [1.0, 2.0, 1.0 + math.cos(math.pi / 4), 1.0, 1.0 + math.cos(3 * math.pi / 4)])
    assert [lr_at(k, 2.0, "linear", 5, 1) for k in range(5)] == pytest.approx([1.0, 2.0, 1.5, 1.0, 0.5])
    assert [lr_at(k, 2.0, "constant", 5, 0) for k in range(5)] == [2.0] * 5
    assert lr_at(0, 2.0, "cosine", 5) == 2.0  # no warm-up: the schedule starts at the full rate


def test_unknown_schedule_and_warmup_past_the_run_name_the_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  steps: 4\n  lr_schedule: cos\n  warmup_steps: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "'train.lr_schedule' must be one of ['constant', 'cosine', 'linear'], got 'cos'" in str(e.value)
    assert "'train.warmup_steps' must be less than 'train.steps' (4), got 4" in str(e.value)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_at(0, 1.0, "cos", 4)
