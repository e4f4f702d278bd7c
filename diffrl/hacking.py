"""The reward-hacking alarm: guard rewards are scored beside training and never trained on; when a guard's smoothed
value falls too far below its running best, the alarm fires and the trainer warns, stops or rolls back.

The rule, per guard g with a threshold: m_t is the guard's mean over step t's samples and s_t its standard error;
the smoothed value is the mean of the last ``window`` steps, M_t = mean(m_{t-w+1..t}) with standard error
S_t = sqrt(sum s_i^2) / w; the running best is B = max M (from the first full window on). The alarm fires at the
``patience``-th consecutive step with B - M_t > threshold (``units: absolute``, in the guard's own units) or
B - M_t > threshold * sqrt(S_B^2 + S_t^2) (``units: stderr``, in standard errors of the difference). A guard's
best step b is the last step of its best window (the latest, on a tie). Step t's values score the policy that
step t started from (checkpoint t - 1), so the best window scored the policies of checkpoints b - w .. b - 1; its
return step, where a rollback or a stop goes back to, is the middle one, b - ceil(w / 2), and never before the
``floor``: the step a rollback returned to (a rollback rewinds the running best to the checkpoint's, whose return
step may lie before checkpoints that were pruned since; the checkpoint rolled back to was judged good and is kept).
A guard fires once per running best.

What a stop exports, when evaluations scored the guards on the held-out prompts (the same prompts and noises at
every evaluation, so the values compare checkpoints rather than draws): the newest evaluated checkpoint, at or
before the alarm and not before the floor, whose guard value is within the threshold (same units) of the best
evaluated one, i.e. the most-trained checkpoint the held-out guard does not call worse than its best
(``export_step``). Without such evaluations, the return step above. Plain Python, no torch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence

UNITS = ("absolute", "stderr")


def smoothed(means: Sequence[float], ses: Sequence[float], window: int) -> tuple[float, float]:
    """(mean of the last ``window`` means, its standard error sqrt(sum se^2) / window); needs ``window`` values."""
    m, s = means[-window:], ses[-window:]
    return sum(m) / window, math.sqrt(sum(x * x for x in s)) / window


def drop_exceeds(best: float, best_se: float, current: float, current_se: float, threshold: float,
                 units: str) -> bool:
    """Whether ``best - current`` is past ``threshold`` (absolute units, or standard errors of the difference)."""
    drop = best - current
    if units == "absolute":
        return drop > threshold
    return drop > threshold * math.hypot(best_se, current_se)


def export_step(evals: Sequence[Mapping[str, float]], guard: str, threshold: float, units: str, upto: int,
                since: int = 0) -> Optional[int]:
    """The step a stop exports: of the evaluations ``evals`` (``{"step", "guard_<guard>", "guard_<guard>_se"}``) at
    steps ``since`` .. ``upto``, the newest whose guard value is within ``threshold`` (``units``, as the alarm's) of
    the best one's; None when none of them scored the guard."""
    scored = [e for e in evals if since <= e["step"] <= upto and f"guard_{guard}" in e
              and math.isfinite(e[f"guard_{guard}"])]
    if not scored:
        return None
    best = max(scored, key=lambda e: e[f"guard_{guard}"])
    close = [e for e in scored if not drop_exceeds(best[f"guard_{guard}"], best.get(f"guard_{guard}_se", 0.0),
                                                   e[f"guard_{guard}"], e.get(f"guard_{guard}_se", 0.0),
                                                   threshold, units)]
    return max(e["step"] for e in close)


@dataclass
class GuardTrack:
    """One guard's history and running best (what a checkpoint saves)."""

    means: list[float] = field(default_factory=list)
    ses: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    best: Optional[float] = None
    best_se: float = 0.0
    best_step: Optional[int] = None
    beyond: int = 0
    fired_at_best: Optional[int] = None


@dataclass(frozen=True)
class Alarm:
    """Evidence of a drop: the guard, the step it fired at, its running best (value and step), its smoothed value now,
    the threshold and units, and the guard's last per-step means."""

    guard: str
    step: int
    best: float
    best_step: int
    return_step: int
    current: float
    threshold: float
    units: str
    recent: dict

    def sentence(self) -> str:
        unit = "" if self.units == "absolute" else " standard errors"
        return (f"guard {self.guard!r} fell from its best {self.best:.4f} (step {self.best_step}) to {self.current:.4f}"
                f" at step {self.step}, a drop past its threshold of {self.threshold:g}{unit}")


class HackingAlarm:
    """The alarm over several guards: ``observe`` each step's guard means and standard errors; it returns an
    ``Alarm`` for the first guard whose rule fires (guards without a threshold are tracked, never fire)."""

    def __init__(self, thresholds: Mapping[str, float], units: str = "absolute", window: int = 5,
                 patience: int = 1):
        if units not in UNITS:
            raise ValueError(f"units must be one of {UNITS}, got {units!r}")
        if window < 1 or patience < 1:
            raise ValueError("window and patience must be at least 1")
        self.thresholds, self.units, self.window, self.patience = dict(thresholds), units, window, patience
        self.tracks: dict[str, GuardTrack] = {}
        self.floor = 0

    def observe(self, step: int, values: Mapping[str, tuple[float, float]]) -> Optional[Alarm]:
        """Record step ``step``'s ``{guard: (mean, standard error)}``; the first alarm that fires, or None."""
        fired = None
        for name, (mean, se) in values.items():
            t = self.tracks.setdefault(name, GuardTrack())
            t.means.append(float(mean))
            t.ses.append(float(se))
            t.steps.append(step)
            if len(t.means) < self.window:
                continue
            current, current_se = smoothed(t.means, t.ses, self.window)
            if t.best is None or current >= t.best:  # a tie moves the best later: the drop begins after it
                t.best, t.best_se, t.best_step, t.beyond = current, current_se, step, 0
                continue
            threshold = self.thresholds.get(name)
            if threshold is None:
                continue
            t.beyond = t.beyond + 1 if drop_exceeds(t.best, t.best_se, current, current_se, threshold,
                                                    self.units) else 0
            if t.beyond >= self.patience and t.fired_at_best != t.best_step and fired is None:
                t.fired_at_best = t.best_step  # once per running best: a lasting drop is one alarm, not one a step
                fired = Alarm(name, step, t.best, t.best_step, self._return_step(t.best_step), current, threshold,
                              self.units,
                              dict(zip(t.steps[-2 * self.window:], t.means[-2 * self.window:])))
        return fired

    def _return_step(self, best_step: int) -> int:
        return max(self.floor, best_step - (self.window + 1) // 2)

    def export_steps(self, evals: Sequence[Mapping[str, float]], upto: int) -> list[int]:
        """``export_step`` of each guard with a threshold, from the floor on: the checkpoints a stop could export now
        (a later evaluation that becomes the choice is newer, so keeping these is enough)."""
        steps = [export_step(evals, n, th, self.units, upto, self.floor) for n, th in self.thresholds.items()]
        return [s for s in steps if s is not None]

    def return_step(self) -> int:
        """The earliest step an alarm could return to now: the earliest return step of the guards with a threshold
        (the floor before any has a full window). The newest checkpoint at or before it is the one a rollback or a
        stop would go back to, so it must be kept."""
        steps = [self._return_step(t.best_step) for n, t in self.tracks.items()
                 if n in self.thresholds and t.best_step is not None]
        return min(steps) if steps else self.floor

    def state_dict(self) -> dict:
        return {"tracks": {name: asdict(t) for name, t in self.tracks.items()}, "floor": self.floor}

    def load_state_dict(self, state: Mapping) -> None:
        self.tracks = {name: GuardTrack(**t) for name, t in state["tracks"].items()}
        self.floor = state["floor"]
