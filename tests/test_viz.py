"""viz: the trailing mean against hand-worked values, and each plot read back twice: from the Figure it returns (the
data drawn, point for point, the axis labels, the legend) and from the PNG it writes (its size, and the pixels of a
data line's own colour, so an empty plot fails)."""
import pytest
import torch
from matplotlib.colors import to_rgb
from PIL import Image

from diffrl.viz import line_plot, running_mean, scatter_pair, training_curves


def _pixels_of(path, color) -> int:
    """How many pixels of the PNG at ``path`` are exactly ``color`` (a matplotlib colour)."""
    rgb = tuple(round(255 * v) for v in to_rgb(color))
    img = Image.open(path).convert("RGB")
    return dict((c, n) for n, c in img.getcolors(maxcolors=img.width * img.height)).get(rgb, 0)


def _legend(legend) -> list[str]:
    return [t.get_text() for t in legend.get_texts()]


def test_running_mean_is_the_trailing_window_average():
    assert running_mean([1.0, 3.0, 5.0, 7.0, 9.0], 3) == [1.0, 2.0, 3.0, 5.0, 7.0]
    assert running_mean([2.0, 4.0], 1) == [2.0, 4.0]
    assert running_mean([], 5) == []
    with pytest.raises(ValueError, match="window must be >= 1"):
        running_mean([1.0], 0)


def test_training_curves_draws_each_step_its_trailing_mean_and_every_evaluation(tmp_path):
    history = [{"step": i + 1, "reward_mean": 0.3 + 0.01 * (i % 4)} for i in range(12)]
    evals = [{"step": 0, "accuracy": 0.1, "accuracy_count": 0.05},
             {"step": 12, "accuracy": 0.2, "accuracy_count": 0.15}]
    fig = training_curves(history, evals, tmp_path / "curves.png")
    assert Image.open(tmp_path / "curves.png").size == (800, 600)
    top, bottom = fig.axes
    reward, mean = top.get_lines()
    assert list(reward.get_xdata()) == list(range(1, 13))
    assert list(reward.get_ydata()) == [m["reward_mean"] for m in history]
    assert list(mean.get_ydata()) == running_mean([m["reward_mean"] for m in history], 5)
    accuracy = {line.get_label(): line for line in bottom.get_lines()}
    assert list(accuracy["all prompts"].get_xdata()) == [0, 12]
    assert list(accuracy["all prompts"].get_ydata()) == [0.1, 0.2]
    assert list(accuracy["count prompts"].get_ydata()) == [0.05, 0.15]
    assert [t.get_text() for t in bottom.texts] == ["0.100", "0.200"]  # each evaluation's value at its point
    assert (top.get_ylabel(), bottom.get_ylabel(), bottom.get_xlabel()) == (
        "training reward", "held-out accuracy", "RL step")
    assert bottom.get_ylim() == (0.0, 1.0)  # accuracy is a fraction: on its whole scale
    assert _legend(top.get_legend()) == ["each step (mean over its batch)", "trailing mean of 5 steps"]
    assert _legend(bottom.get_legend()) == ["count prompts", "all prompts"]
    assert _pixels_of(tmp_path / "curves.png", mean.get_color()) > 800  # the legend key alone: about 75


def test_training_curves_of_a_run_without_steps(tmp_path):
    fig = training_curves([], [{"step": 0, "accuracy": 0.5}], tmp_path / "curves.png")
    assert Image.open(tmp_path / "curves.png").size == (800, 600)
    assert list(fig.axes[1].get_lines()[0].get_ydata()) == [0.5]


def test_line_plot_draws_every_series_point_for_point(tmp_path):
    series = {"shapes": ([0.0, 0.5, 1.0, 3.0], [0.17, 0.17, 0.19, 0.08]),
              "shapes_partial": ([0.0, 0.5, 1.0, 3.0], [0.47, 0.51, 0.52, 0.43])}
    fig = line_plot(series, tmp_path / "sweep.png", "reward against w", x_label="RL-guidance scale w",
                    y_label="mean reward")
    assert Image.open(tmp_path / "sweep.png").size == (700, 420)
    (ax,) = fig.axes
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()] == [
        (list(xs), list(ys)) for xs, ys in series.values()]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == (
        "reward against w", "RL-guidance scale w", "mean reward")
    assert _legend(ax.get_legend()) == ["shapes", "shapes_partial"]
    assert _pixels_of(tmp_path / "sweep.png", ax.get_lines()[0].get_color()) > 300  # the legend key alone: about 70


def test_scatter_pair_draws_every_sample_and_the_mode_centres(tmp_path):
    g = torch.Generator().manual_seed(0)
    before, after, centers = torch.randn(300, 2, generator=g), torch.randn(200, 2, generator=g), torch.eye(2)
    fig = scatter_pair(before, after, centers, tmp_path / "samples.png", ("pretrained", "after RL"))
    assert Image.open(tmp_path / "samples.png").size == (1000, 600)
    for ax, points, title in zip(fig.axes, (before, after), ("pretrained (300 samples)", "after RL (200 samples)")):
        samples, others, target = ax.collections
        assert samples.get_offsets().tolist() == points.tolist()
        assert others.get_offsets().tolist() == [[0.0, 1.0]] and target.get_offsets().tolist() == [[1.0, 0.0]]
        assert ax.get_title() == title and ax.get_xlabel() == "first coordinate"
    assert fig.axes[0].get_ylabel() == "second coordinate"
    assert _legend(fig.legends[0]) == ["sample", "mode centre", "target mode (rewarded)"]
