"""An example diffrl reward plug-in: ``build(**options)`` returns the reward; the entry point names it ``redness``."""


def build(scale: float = 1.0):
    def reward(media, prompts):
        x = media.float()  # [B, 3, H, W] in [0, 1]
        return {"redness": scale * (x[:, 0] - 0.5 * (x[:, 1] + x[:, 2])).mean((1, 2))}

    reward.modalities = ("image",)
    reward.differentiable = True
    return reward
