"""Guard rewards in a run (``train.guard_rewards``, ``train.guard``): scored on every step's rollouts and every
evaluation's samples, never trained on, and watched by the reward-hacking alarm (``diffrl.hacking``). This module
turns scores into the guards' values and metrics, and holds what a rollback changes (the learning rate and KL weight
multipliers, the number of rollbacks); ``diffrl.trainer`` acts on an alarm."""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

from torch import Tensor

from diffrl.config import GuardConfig
from diffrl.hacking import HackingAlarm
from diffrl.scoring import score_samples

SEED_STRIDE = 1_000_003


class Guards:
    """The loaded guard rewards with their weights, the alarm, and the rollback multipliers."""

    def __init__(self, rewards: Mapping[str, Callable], weights: Mapping[str, float], cfg: GuardConfig,
                 lr: float, kl_weight: float, seed: int):
        self.rewards, self.weights, self.cfg = dict(rewards), dict(weights), cfg
        self.alarm = HackingAlarm(cfg.thresholds, cfg.units, cfg.window, cfg.patience)
        self.base_lr, self.base_kl, self.base_seed = lr, kl_weight, seed
        self.rollbacks, self.lr_scale, self.kl_scale = 0, 1.0, 1.0

    def values(self, scores: Mapping[str, Tensor], valid: Tensor) -> dict[str, tuple[float, float]]:
        """``{name: (mean, standard error)}`` of weight x score over the valid samples (``scores`` ``{name: [B]}``,
        ``valid`` ``[B]`` bool); a guard with fewer than 2 valid samples has standard error 0."""
        out = {}
        for name, s in scores.items():
            v = self.weights[name] * s[valid].double()
            se = float(v.std(unbiased=True)) / math.sqrt(len(v)) if len(v) > 1 else 0.0
            out[name] = (float(v.mean()) if len(v) else math.nan, se)
        return out

    @staticmethod
    def metrics(values: Mapping[str, tuple[float, float]], prefix: str = "guard_") -> dict[str, float]:
        """``{guard_<name>: mean, guard_<name>_se: standard error}``."""
        out = {}
        for name, (mean, se) in values.items():
            out[f"{prefix}{name}"], out[f"{prefix}{name}_se"] = mean, se
        return out

    def score(self, media, prompts: Sequence[str], timeout: Optional[float]) -> dict[str, tuple[float, float]]:
        """The guards' values on ``media`` (an evaluation's samples)."""
        scores, valid = score_samples(self.rewards, media, prompts, timeout)
        return self.values(scores, valid)

    def rolled_back(self) -> tuple[float, float]:
        """Count a rollback and apply its multipliers; returns the new (learning rate, KL weight)."""
        self.rollbacks += 1
        self.lr_scale *= self.cfg.lr_factor
        self.kl_scale *= self.cfg.kl_factor
        return self.lr, self.kl_weight

    @property
    def lr(self) -> float:
        return self.base_lr * self.lr_scale

    @property
    def kl_weight(self) -> float:
        return self.base_kl * self.kl_scale

    @property
    def seed(self) -> int:
        """The run's seed after the rollbacks: each rollback draws new prompts and noises for the steps it repeats
        (a replay of the same samples would replay the same evidence)."""
        return self.base_seed + SEED_STRIDE * self.rollbacks

    def state_dict(self) -> dict:
        return {"alarm": self.alarm.state_dict(), "rollbacks": self.rollbacks, "lr_scale": self.lr_scale,
                "kl_scale": self.kl_scale}

    def load_state_dict(self, state: Mapping) -> None:
        self.alarm.load_state_dict(state["alarm"])
        self.rollbacks, self.lr_scale, self.kl_scale = state["rollbacks"], state["lr_scale"], state["kl_scale"]


def apply(guards: Guards, train_cfg) -> None:
    """Set ``train.lr``, ``train.kl_weight`` and ``train.seed`` to the guards' current (rolled-back) values."""
    train_cfg.lr, train_cfg.kl_weight, train_cfg.seed = guards.lr, guards.kl_weight, guards.seed
