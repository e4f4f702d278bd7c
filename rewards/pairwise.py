"""Pairwise win rates within a group, Pref-GRPO's reward signal (arXiv 2508.20751): each sample of a prompt is
compared with every other sample of the same prompt, and its reward is the share of comparisons it wins. Pref-GRPO
compares with a pairwise preference model; ``pairwise`` compares by a pointwise reward's scores, a stand-in that
keeps the same shape of signal (ranks in [0, 1], insensitive to the reward's scale, so tiny score gaps are not
amplified into large advantages by the group normalisation). A real preference model is a groupwise reward too:
decorate ``reward(media_of_the_group, prompt)`` with ``rewards.groupwise``."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rewards import groupwise


def win_rates(scores: Tensor) -> Tensor:
    """``[G]`` scores -> ``[G]`` win rates: (1 / (G - 1)) sum_{j != i} (1[s_i > s_j] + 0.5 1[s_i = s_j]), the mean
    of the pairwise preferences P(i beats j); 0.5 for a group of one."""
    g = scores.numel()
    if g == 1:
        return torch.full((1,), 0.5)
    s = scores.double().flatten()
    wins = (s[:, None] > s[None, :]).double() + 0.5 * (s[:, None] == s[None, :]).double()
    return ((wins.sum(1) - 0.5) / (g - 1)).float()  # the diagonal (i against itself) counted 0.5 above


def build(base: str = "shapes_partial", **base_options: Any) -> "callable":
    """The groupwise reward ``{"win_rate": [G]}`` over the scores of reward ``base`` (any name ``rewards.load``
    takes, with ``base_options``)."""
    from rewards import load

    inner = load(base, **base_options)

    @groupwise
    def reward(media, prompt: str) -> dict[str, Tensor]:
        out = inner(media, [prompt] * len(media if not isinstance(media, dict) else media["video"]))
        return {"win_rate": win_rates(torch.as_tensor(next(iter(out.values())), dtype=torch.float32))}

    return reward
