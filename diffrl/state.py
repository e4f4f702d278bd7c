"""What a training run is made of: the objects built once from the config (``Run``), what a checkpoint restores
(``TrainState``), one step's rollouts (``Batch``), and a context manager that swaps other trained weights in."""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Union

import torch
from torch import Tensor

from diffrl.adapters.interface import Adapter
from diffrl.config import Config
from diffrl.explore import LowPrecisionPolicy
from diffrl.prompts import PromptStream
from diffrl.tracking import Trackers
from diffrl.tree import TreeSchedule
from diffrl.types import TreeRollout


class Collector(Protocol):
    """The seam between the loop and how its rollouts are made: plain SDE rollouts, or low-precision exploration
    followed by full-precision regeneration, wrap the same loop."""

    def collect(self, run: Run, step: int) -> Batch:
        """This process's rollouts (and their media) for RL step ``step``."""

    def expected_leaves(self, run: Run, valid: Tensor) -> int:
        """Leaves rolled out and scored this step over all processes (``valid`` ``[trees, leaves]``)."""

    def after_update(self, run: Run, batch: Batch, leaf_r: Tensor) -> dict:
        """Called after the optimizer step (copies that follow the policy refresh here); returns metrics."""

    def after_restore(self, run: Run) -> None:
        """Called after a checkpoint's weights were loaded on resume."""


@dataclass
class Run:
    """Everything built once from the config."""

    cfg: Config
    out: Path
    adapter: Adapter
    rewards: dict[str, Callable]
    schedule: TreeSchedule
    sigmas: Tensor
    optimizer: torch.optim.Optimizer
    prompts: PromptStream
    eval_prompts: list[str]
    minibatch: int = 1
    """Samples per forward: ``train.minibatch``, capped by ``train.tokens_per_batch``."""
    tracker: Trackers = field(default_factory=Trackers)
    """The experiment trackers the run logs to (``log.trackers``; none but on the first process)."""
    command: Optional[str] = None
    """The command line that started the run, for its model card (None: started from Python)."""
    rank: int = 0
    world: int = 1
    explorer: Optional[LowPrecisionPolicy] = None
    """The low-precision exploration copy of the policy (``explore.enabled``)."""
    collector: Optional[Collector] = None
    """How the step's rollouts are made (``trainer.Rollouts``, or ``trainer.Exploration`` with ``explore.enabled``)."""
    evaluator: Optional[Callable] = None
    """How held-out samples are scored (``diffrl.evaluation``; ``data.evaluator``)."""
    guards: Optional[Any] = None
    """The guard rewards and the reward-hacking alarm (``diffrl.guards.Guards``; ``train.guard_rewards``)."""


@dataclass
class TrainState:
    """What a checkpoint restores."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    base_accuracy: Optional[float] = None
    ema: Optional[dict[str, Tensor]] = None


@dataclass
class Batch:
    prompts: list[str]  # one per tree of this process
    all_prompts: list[str]  # one per tree of every process, in rank order
    first_tree: int  # global index of this process's first tree
    rollout: TreeRollout
    # decoded media of every leaf (of the kept ones, rollout.kept): [n, 3, H, W], videos, AV dicts
    images: Union[Tensor, dict]
    rollout_s: float
    pending_scores: list[Future] = field(default_factory=list)  # background scoring of rollout chunks
    preview_rewards: Optional[Tensor] = None  # exploration: [prompts, keep] preview rewards of the kept leaves
    explore_s: float = 0.0  # exploration: preview rollouts and their rewards
    num_previewed: int = 0  # exploration: candidate leaves previewed


class Swap:
    """Temporarily load other LoRA weights (the EMA, or NFT's sampling policy); a no-op for None."""

    def __init__(self, adapter: Any, weights: Optional[dict[str, Tensor]]):
        self.adapter, self.weights, self.saved = adapter, weights, None

    def __enter__(self):
        if self.weights is not None:
            self.saved = self.adapter.trained_state_dict()
            self.adapter.load_trained_state_dict(self.weights)

    def __exit__(self, *exc):
        if self.saved is not None:
            self.adapter.load_trained_state_dict(self.saved)
