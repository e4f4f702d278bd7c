"""Experiment trackers: where a run's progress goes besides ``metrics.jsonl``.

A tracker gets the resolved config when it starts (its constructor), every step's scalars (``log_scalars``), every
sample grid (``log_image``) and the summary at the end (``finish``). ``TRACKERS`` names the ones ``log.trackers``
may list; each imports its package only when it starts, and ``check_installed`` says in one sentence, before any
model loads, which listed tracker is missing. Only the first process logs (``diffrl.trainer.build``).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Optional, Protocol

import yaml

from diffrl.config import ConfigError, LogConfig


class Tracker(Protocol):
    """One tracker of a run; it is started with ``(out, config, log_cfg)``: the run directory, the resolved config
    as plain data, and ``log`` (names and projects)."""

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Record the scalars of RL step ``step`` (``metrics.jsonl``'s numbers)."""

    def log_image(self, name: str, path: Path, step: int) -> None:
        """Record the PNG at ``path`` (a sample grid) as image ``name`` at step ``step``."""

    def finish(self, summary: dict) -> None:
        """Record the run's summary (``summary.json``) and close."""


def _code_block(text: str) -> str:
    """``text`` as a markdown code block by indentation (TensorBoard renders text summaries as markdown)."""
    return "\n".join("    " + line for line in text.splitlines())


def _scalar_summary(summary: dict) -> dict[str, Any]:
    """The summary's top-level numbers and strings (its list of evaluations left out), with the last evaluation's
    scores as ``final_<name>``."""
    flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    last = (summary.get("evals") or [{}])[-1]
    flat.update({f"final_{k}": v for k, v in last.items() if k != "step" and isinstance(v, (int, float))})
    return flat


class TensorBoardTracker:
    """TensorBoard event files in ``RUN/tensorboard``: the config and the summary as text, scalars, grids."""

    requires = "tensorboard"
    install = "pip install tensorboard"

    def __init__(self, out: Path, config: dict, log_cfg: LogConfig):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"))
        self.writer.add_text("config", _code_block(yaml.safe_dump(config, sort_keys=False)), 0)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_image(self, name: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            self.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def finish(self, summary: dict) -> None:
        self.writer.add_text("summary", _code_block(json.dumps(summary, indent=2)), summary.get("steps", 0))
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run (``wandb.init(project, entity, name, dir=RUN, config)``); ``WANDB_MODE=offline``
    writes it to ``RUN/wandb/offline-run-*`` without an account (``wandb sync`` uploads it later)."""

    requires = "wandb"
    install = 'pip install "diffrl[wandb]"'

    def __init__(self, out: Path, config: dict, log_cfg: LogConfig):
        import wandb

        self.wandb = wandb
        try:
            self.run = wandb.init(project=log_cfg.wandb_project, entity=log_cfg.wandb_entity,
                                  name=log_cfg.run_name or out.resolve().name, dir=str(out), config=config)
        except wandb.errors.Error as e:
            raise ConfigError(f"'log.trackers' wandb cannot start a run ({str(e).splitlines()[0]}); log in with "
                              "`wandb login` or set WANDB_MODE=offline") from None

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        self.run.log({name: self.wandb.Image(str(path), caption=f"step {step}")}, step=step)

    def finish(self, summary: dict) -> None:
        self.run.summary.update(_scalar_summary(summary))
        self.run.finish(exit_code=0 if summary.get("status") == "finished" else 1)


TRACKERS: dict[str, type] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}
"""Tracker name (``log.trackers``) -> its class: constructed with ``(out, config, log_cfg)``, it implements
``Tracker``, and ``requires`` / ``install`` name its package and how to install it."""


def active(log_cfg: LogConfig) -> list[str]:
    """The trackers a run starts: ``log.trackers`` in order without repeats, less tensorboard when
    ``log.tensorboard`` is false."""
    return [name for name in dict.fromkeys(log_cfg.trackers) if name != "tensorboard" or log_cfg.tensorboard]


def check_installed(names: list[str]) -> None:
    """``ConfigError`` in one sentence naming every tracker in ``names`` whose package is not installed."""
    missing = [name for name in names if importlib.util.find_spec(TRACKERS[name].requires) is None]
    if missing:
        hints = "; ".join(TRACKERS[name].install for name in missing)
        raise ConfigError(f"'log.trackers' lists {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                          f"not installed ({hints})")


class Trackers:
    """Every started tracker behind the one ``Tracker`` interface (none: every call does nothing)."""

    def __init__(self, trackers: Optional[list[Tracker]] = None):
        self.trackers = list(trackers or [])

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_scalars(scalars, step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        for tracker in self.trackers:
            tracker.log_image(name, path, step)

    def finish(self, summary: dict) -> None:
        for tracker in self.trackers:
            tracker.finish(summary)
        self.trackers = []


def start(log_cfg: LogConfig, out: Path, config: dict) -> Trackers:
    """The trackers ``log_cfg`` names (``active``), started in run directory ``out`` with the resolved ``config``."""
    return Trackers([TRACKERS[name](out, config, log_cfg) for name in active(log_cfg)])
