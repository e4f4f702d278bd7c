"""Score rollouts with the configured rewards, robustly: a sample whose reward raises or is not finite is marked
invalid (with a warning naming the reward and the prompt) instead of stopping or corrupting the run.

A groupwise reward (attribute ``groupwise`` true, e.g. ``rewards.groupwise``) scores the samples of one prompt
together, as Pref-GRPO's (arXiv 2508.20751) pairwise preferences do: it is called once per group of samples with
equal prompts, ``reward(media_of_the_group, prompt) -> {name: [group size]}``. The groups are the ones the
advantages normalise over: the leaves of a prompt's trees, or its flat chains."""
from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

log = logging.getLogger("diffrl")


class RewardError(RuntimeError):
    """A reward failed on every sample of a batch: the run cannot continue."""


def _first_score(name: str, out: Mapping[str, Tensor], n: int) -> Tensor:
    if not isinstance(out, Mapping) or not out:
        raise TypeError(f"reward {name!r} must return a dict of name -> tensor (batch,), got {type(out).__name__}")
    value = torch.as_tensor(next(iter(out.values())), dtype=torch.float32).flatten()
    if value.shape != (n,):
        raise ValueError(f"reward {name!r} returned shape {tuple(value.shape)} for a batch of {n}")
    return value


def prompt_groups(prompts: Sequence[str]) -> list[list[int]]:
    """The indices of each distinct prompt, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    return list(groups.values())


def _call_groups(name: str, fn: Callable, media: Sequence, prompts: Sequence[str]) -> Tensor:
    """``[B]`` scores of a groupwise reward, called once per prompt group; NaN for a group whose call raised."""
    out = torch.full((len(prompts),), math.nan)
    for idx in prompt_groups(prompts):
        try:
            out[idx] = _first_score(name, fn(take_media(media, idx), prompts[idx[0]]), len(idx))
        except Exception as e:  # noqa: BLE001 - the group is left out, the others go on
            log.warning("groupwise reward %r raised on the %d samples of prompt %r: %s", name, len(idx),
                        prompts[idx[0]], e)
    return out


def take_media(media, idx: Sequence[int]):
    """The samples ``idx`` of a media batch: a tensor, a list, or an audio-video dict (its tensor fields indexed)."""
    if isinstance(media, Tensor):
        return media[torch.as_tensor(idx, device=media.device)]
    if isinstance(media, dict):
        return {k: take_media(v, idx) if isinstance(v, (Tensor, list)) else v for k, v in media.items()}
    return [media[i] for i in idx]


def _call(name: str, fn: Callable, media: Sequence, prompts: Sequence[str]) -> Tensor:
    """``[B]`` scores; NaN for samples whose reward raised (found by re-running sample by sample)."""
    if getattr(fn, "groupwise", False):
        return _call_groups(name, fn, media, prompts)
    try:
        return _first_score(name, fn(media, list(prompts)), len(prompts))
    except Exception as batch_error:  # noqa: BLE001 - isolate the failing samples, then report them
        if len(prompts) == 1:
            log.warning("reward %r raised on prompt %r: %s", name, prompts[0], batch_error)
            return torch.tensor([math.nan])
        return torch.cat([_call(name, fn, media[i : i + 1], prompts[i : i + 1]) for i in range(len(prompts))])


def submit(fn: Callable, *args) -> Future:
    """Run ``fn(*args)`` in a new daemon thread; its result or exception arrives in the returned future. A daemon
    thread never keeps the process alive: a reward that hangs past its timeout cannot stop a run from exiting
    (a ``ThreadPoolExecutor``'s workers are joined at exit)."""
    future: Future = Future()

    def work() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(e)

    threading.Thread(target=work, daemon=True, name="diffrl-reward").start()
    return future


def score_batch(rewards: Mapping[str, Callable], media: Sequence, prompts: Sequence[str],
                timeout: Optional[float] = None) -> tuple[dict[str, Tensor], Tensor]:
    """Every reward on a batch, the rewards concurrently (threads): ``({name: [B]}, valid [B] bool)``; invalid samples
    hold 0 and are logged. A reward still running after ``timeout`` seconds fails the batch's samples (its thread
    cannot be stopped and finishes in the background). Raises ``RewardError`` when no sample is valid."""
    scores, valid = score_samples(rewards, media, prompts, timeout)
    return scores, check_valid(valid, rewards)


def score_samples(rewards: Mapping[str, Callable], media: Sequence, prompts: Sequence[str],
                  timeout: Optional[float] = None) -> tuple[dict[str, Tensor], Tensor]:
    """``score_batch`` without the all-invalid check (for a part of a batch)."""
    futures = {name: submit(_call, name, fn, media, prompts) for name, fn in rewards.items()}
    deadline = None if timeout is None else time.monotonic() + timeout
    scores, valid = {}, torch.ones(len(prompts), dtype=torch.bool)
    for name, future in futures.items():
        try:
            s = future.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            log.warning("reward %r took longer than %.3g s on a batch of %d: its samples are left out", name,
                        timeout, len(prompts))
            s = torch.full((len(prompts),), math.nan)
        bad = ~torch.isfinite(s)
        for i in bad.nonzero().flatten().tolist():
            log.warning("reward %r gave %s for prompt %r: the sample is left out of the update", name, s[i].item(),
                        prompts[i])
        valid &= ~bad
        scores[name] = torch.where(bad, torch.zeros_like(s), s)
    return scores, valid


def check_valid(valid: Tensor, rewards: Mapping[str, Callable]) -> Tensor:
    """``valid`` unchanged, or ``RewardError`` when every sample failed."""
    if not valid.any():
        raise RewardError(f"every sample of the batch failed a reward ({', '.join(rewards)}): it raised, returned a "
                          "non-finite score or ran past 'train.reward_timeout_s'; see the warnings above")
    return valid
