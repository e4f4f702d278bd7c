"""viz: the trailing mean of the reward curve against hand-worked values, and the curves file it draws."""
import pytest
from PIL import Image

from diffrl.viz import running_mean, training_curves


def test_running_mean_is_the_trailing_window_average():
    assert running_mean([1.0, 3.0, 5.0, 7.0, 9.0], 3) == [1.0, 2.0, 3.0, 5.0, 7.0]
    assert running_mean([2.0, 4.0], 1) == [2.0, 4.0]
    assert running_mean([], 5) == []
    with pytest.raises(ValueError, match="window must be >= 1"):
        running_mean([1.0], 0)


def test_training_curves_draws_reward_its_mean_and_accuracy(tmp_path):
    history = [{"step": i + 1, "reward_mean": 0.3 + 0.01 * (i % 4)} for i in range(12)]
    evals = [{"step": 0, "accuracy": 0.1}, {"step": 12, "accuracy": 0.2}]
    training_curves(history, evals, tmp_path / "curves.png")
    img = Image.open(tmp_path / "curves.png").convert("RGB")
    colours = {c for _, c in img.getcolors(maxcolors=img.width * img.height)}
    assert {(30, 60, 200), (220, 60, 40), (40, 160, 60)} <= colours  # one line colour per series
