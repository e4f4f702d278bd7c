"""A custom reward in your own file: any function ``(media, prompts) -> {name: float tensor (batch,)}``.

Use it by dotted path, from the directory that holds ``examples/`` (the diffrl CLI puts the current directory on
the import path):

    diffrl train configs/tiny_shapes.yaml 'rewards={"examples.custom_reward:redness": 1.0}'
    diffrl serve-reward examples.custom_reward:redness            # or serve it over HTTP (127.0.0.1:8765)

A class works too (it is instantiated with the config's ``reward_options``), see ``Saturation``.
"""
import numpy as np
import torch


def redness(media, prompts):
    """Mean red minus mean green and blue, in [-1, 1]; media are PIL images or a [B, 3, H, W] tensor in [0, 1]."""
    if isinstance(media, torch.Tensor):
        x = media.float()
    else:
        x = torch.stack([torch.from_numpy(np.array(m.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                         for m in media])
    red = x[:, 0].mean((1, 2)) - 0.5 * (x[:, 1] + x[:, 2]).mean((1, 2))
    return {"redness": red}


class Saturation:
    """A reward with options: ``reward_options: {"examples.custom_reward:Saturation": {power: 2}}``."""

    modalities = ("image",)
    differentiable = True

    def __init__(self, power: float = 1.0):
        self.power = power

    def __call__(self, media, prompts):
        x = media.float()
        return {"saturation": (x.max(1).values - x.min(1).values).mean((1, 2)) ** self.power}
