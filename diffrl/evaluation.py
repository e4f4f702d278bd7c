"""Evaluators: how held-out samples are scored, the seam shared by the trainer's evaluations and ``diffrl eval``.

An evaluator is called with the decoded media of the held-out samples and their prompts and returns metrics, with
``accuracy`` the headline number (``summary.json``'s ``base_accuracy`` / ``final_accuracy``). Two ship:
``ShapesEvaluator`` (the shapes verifier's strict accuracy, overall and per prompt kind) and ``RewardEvaluator``
(any reward's mean over the valid samples, for any prompt file). ``evaluator_for`` picks one.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Sequence

from diffrl.scoring import score_batch
from diffrl.shapes import in_grammar


class Evaluator(Protocol):
    """``evaluator(media, prompts) -> {"accuracy": float, ...}``; ``name`` says what it measures."""

    name: str

    def __call__(self, media: Any, prompts: Sequence[str]) -> dict[str, float]: ...


class ShapesEvaluator:
    """The shapes verifier's strict accuracy, overall and per prompt kind (prompts of the shapes grammar)."""

    name = "shapes verifier (strict)"

    def __call__(self, media: Any, prompts: Sequence[str]) -> dict[str, float]:
        from diffrl.inference import shapes_accuracy
        from diffrl.viz import stills

        return shapes_accuracy(stills(media), prompts)


class RewardEvaluator:
    """A reward's mean over the samples it scores validly (``accuracy``), for prompts of any kind."""

    def __init__(self, name: str, reward: Callable, timeout: Optional[float] = None):
        self.name, self.reward, self.timeout = f"reward {name}", reward, timeout
        self._key = name

    def __call__(self, media: Any, prompts: Sequence[str]) -> dict[str, float]:
        scores, valid = score_batch({self._key: self.reward}, media, list(prompts), self.timeout)
        return {"accuracy": float(scores[self._key][valid].mean())}


def evaluator_for(prompts: Sequence[str], rewards: dict[str, Callable], choice: str = "auto",
                  timeout: Optional[float] = None) -> Evaluator:
    """The evaluator ``choice`` names: ``shapes``, ``reward:NAME`` (one of ``rewards``), or ``auto``: the shapes
    verifier when every prompt is in the shapes grammar, else the first reward. ValueError in one sentence for a
    choice that cannot work."""
    if choice == "auto":
        choice = "shapes" if in_grammar(prompts) else f"reward:{next(iter(rewards))}"
    if choice == "shapes":
        if not in_grammar(prompts):
            raise ValueError("the shapes verifier scores only prompts of the shapes grammar; score them with a reward "
                             "(diffrl eval --reward NAME, or data.evaluator: reward:NAME)")
        return ShapesEvaluator()
    name = choice.removeprefix("reward:")
    if not choice.startswith("reward:") or name not in rewards:
        raise ValueError(f"evaluator {choice!r} must be auto, shapes or reward:NAME with NAME one of {list(rewards)}")
    return RewardEvaluator(name, rewards[name], timeout)
