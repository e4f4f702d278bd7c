"""diffrl: reinforcement-learning alignment of diffusion and flow-matching generators.

The math lives in small pure-torch modules: ``sde`` (steps with log-probs), ``schedule`` (sigmas, SDE windows),
``tree`` (branching trees), ``rollout`` (the batched tree rollout engine), ``advantages``, ``loss``, ``guidance``
(the RL-guidance and CFG combines), ``quant`` (FP8/FP4 grids) and ``selection`` (which previewed candidates to
regenerate); ``explore`` and ``guided_sampling`` run them through a model.
"""
from diffrl.advantages import depthwise_advantages, gdpo_advantages, group_advantages, rloo_advantages
from diffrl.guidance import rl_guidance
from diffrl.guided_sampling import guided_sample
from diffrl.loss import policy_loss
from diffrl.rollout import tree_rollout
from diffrl.sde import ddim_step, gaussian_log_prob, sde_step
from diffrl.selection import select_candidates
from diffrl.tree import TreeSchedule
from diffrl.types import StepOut, Transitions, TreeRollout

__version__ = "0.1.0"


def load_reward(name_or_path: str, **options):
    """A reward ``reward(media, prompts) -> {name: float tensor (batch,)}`` by built-in name (``shapes``, ``av_sync``,
    ...), by the name an installed package registers under the ``diffrl.rewards`` entry-point group, or by a
    ``"pkg.module:attr"`` path to a function, class or factory (called with ``options``)."""
    import rewards

    return rewards.load(name_or_path, **options)


def train(cfg, out: str | None = None, resume: bool = False, on_step=None) -> dict:
    """Run RL fine-tuning from a ``Config`` (``load_config``); returns the summary also written to summary.json.
    Imported on first use, so ``import diffrl`` stays free of the model libraries."""
    from diffrl.trainer import train as _train

    return _train(cfg, out=out, resume=resume, on_step=on_step)


def load_config(path: str | None = None, overrides=()):
    """A validated ``Config`` from a YAML file of overrides and ``key=value`` strings (``diffrl.config``)."""
    from diffrl.config import load_config as _load

    return _load(path, overrides)


__all__ = [
    "StepOut", "Transitions", "TreeRollout", "TreeSchedule", "ddim_step", "depthwise_advantages", "gaussian_log_prob",
    "gdpo_advantages", "group_advantages", "guided_sample", "load_config", "load_reward", "policy_loss", "rl_guidance",
    "rloo_advantages", "sde_step", "select_candidates", "train", "tree_rollout",
]
