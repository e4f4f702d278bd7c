"""Typed run configuration: dataclass defaults, a short YAML file of overrides, and ``a.b=c`` overrides.

``load_config(path, overrides)`` reads the YAML, applies the overrides and validates everything before any model
loads. Every problem is collected and reported at once, each naming the file and the key ("did you mean ...").
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml


class ConfigError(ValueError):
    """A config file or override is wrong; the message lists every problem with its file and key."""


@dataclass
class ModelConfig:
    family: str = "sd3"
    """Adapter name (``diffrl.adapters.ADAPTERS``) or ``pkg.module:Class``."""
    path: str = "assets/tiny-sd3-shapes"
    """Local diffusers pipeline folder or hub id (hub ids need network unless cached)."""
    device: str = "cpu"
    """Where the model runs: cpu, cuda (this process's GPU, ``cuda:LOCAL_RANK`` under torchrun/accelerate), cuda:N,
    or auto (a GPU when one is visible, else the CPU)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16 (log-prob math is fp32 whatever this is)."""
    resolution: Optional[int] = None
    """Image side in pixels (square); None: the model's default (SD3: the transformer's sample size).
    Range: [8, 16384]."""
    num_frames: Optional[int] = None
    """Video families: frames per clip (Wan: 4k + 1); None: the family's default. Range: [1, 10000]."""
    attention: str = "sdpa"
    """Attention backend: sdpa (default) or xformers (CUDA only, ``diffrl[gpu]``)."""
    fsdp: bool = False
    """Under several processes (``accelerate launch``, ``torchrun``): shard the denoisers with FSDP2, so each process
    holds 1/N of the weights, gradients and optimizer state. LoRA: the frozen base is sharded with its adapters;
    full fine-tuning (``lora_rank: 0``): the frozen reference copy too. Each process reads only its shard of the
    checkpoint, and checkpoints are sharded (``torch.distributed.checkpoint``)."""
    fsdp_cpu_offload: bool = False
    """With ``fsdp``: keep the shards, gradients and optimizer state in CPU memory (slower; for models whose shards
    do not fit the GPUs)."""
    offload: bool = False
    """Keep the text encoders and the VAE on the CPU, on the device only while they encode or decode."""
    gradient_checkpointing: bool = False
    """Recompute denoiser activations in the backward pass (large models; same gradients, less memory)."""
    compile: bool = False
    """Regional compilation: ``torch.compile`` each denoiser block in place (rollouts and updates run the same
    compiled forward, so the first ratio stays exactly 1). Compiling costs time at the first steps (cached across
    runs); ``scripts/bench_throughput.py`` measures what it pays on your machine."""
    lora_rank: int = 8
    """LoRA rank; 0: full fine-tuning of the denoisers (the reference is a frozen copy: twice their memory; the run
    exports ``transformer/`` with ``save_pretrained`` instead of ``lora/``). Range: [0, 4096]."""
    lora_alpha: float = 8.0
    """LoRA scale alpha (the update is scaled by alpha / rank). Range: (0, inf)."""
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Module names (suffixes) the LoRA adapts in every denoiser, e.g. ``[to_q, to_v]``; a name that matches no
    module is an error."""


@dataclass
class SamplerConfig:
    num_steps: int = 10
    """Denoising steps of training rollouts. Range: [1, 1000]."""
    kind: str = "flow"
    """SDE kind: flow, dance or cps (see diffrl.sde)."""
    noise_level: float = 0.7
    """SDE noise: Flow-GRPO's ``a`` / DanceGRPO's ``eta``; 0 is the ODE (nft only: ppo needs noise). Range: [0, 1]."""
    guidance_scale: float = 4.5
    """Classifier-free guidance during rollouts and training (1 disables it and halves the cost). Range: [0, 100]."""
    family_guidance: dict[str, float] = field(default_factory=dict)
    """The family's own guidance scales besides ``guidance_scale``: Wan 2.2 ``{guidance_scale_2: 3.0}`` (the
    low-noise expert; default ``guidance_scale``), LTX-2 ``{audio_guidance_scale: 7.0}`` (the audio stream)."""
    split_steps: list[int] = field(default_factory=lambda: [1, 3, 5])
    """Tree split steps (empty list: flat GRPO)."""
    branch_factor: int = 2
    """Children per tree split. Range: [2, 64]."""
    split_noise_scale: float = 1.0
    """Noise std multiplier at split steps (BranchGRPO). Range: (0, inf)."""
    sde_window: Optional[list[int]] = None
    """[start, size]: SDE (and trained) steps; ODE elsewhere. None: every step is SDE."""
    window_schedule: str = "fixed"
    """How the ``sde_window`` start moves over RL steps (MixGRPO): fixed (as given), progressive (one step later
    every ``window_steps`` RL steps, rolling back to 0 after the last position), decay / exp_decay (MixGRPO's
    shrinking dwell times), random (a uniform start each RL step). Flat rollouts only (a tree's splits must stay
    inside the window)."""
    window_steps: int = 25
    """RL steps the window stays at a position (progressive; the initial dwell of decay / exp_decay).
    Range: [1, inf)."""
    timestep_fraction: float = 1.0
    """Fraction of the SDE steps trained each iteration (DanceGRPO). Range: (0, 1]."""
    eval_steps: int = 20
    """Steps of the deterministic evaluation sampler. Range: [1, 1000]."""


@dataclass
class PruningConfig:
    """BranchGRPO's pruning: edges left out of the gradient; rollouts are unchanged. ppo only."""

    width: Optional[str] = None
    """None (off), topk (within each set of sibling chains created at the last split, keep the top ``width_ratio``
    by leaf value) or best_worst (per tree, the best and worst ``width_ratio / 2`` of the leaves' chains); only the
    edges after the last split are pruned."""
    width_ratio: float = 0.5
    """Share of chains width pruning keeps. Range: (0, 1]."""
    depths: list[int] = field(default_factory=list)
    """Child depths whose edges are not trained (depth k + 1 is the edge of denoising step k); empty: off."""
    depth_interval: Optional[int] = None
    """Slide the pruned depths one depth shallower every this many RL steps, down to ``depth_stop``; None: fixed.
    Range: [1, inf)."""
    depth_stop: Optional[int] = None
    """The shallowest depth the sliding window reaches; None: the depth of the last split's children."""
    until: float = 1.0
    """Prune only while the RL step is below this fraction of ``train.steps``. Range: [0, 1]."""


@dataclass
class GuardConfig:
    """The reward-hacking alarm over ``train.guard_rewards`` (``diffrl.hacking``): a guard fires when its value,
    averaged over the last ``window`` steps, falls more than its threshold below its running best."""

    thresholds: dict[str, float] = field(default_factory=dict)
    """Guard name -> the drop from its running best that fires the alarm (in ``units``); a guard without one is
    logged and plotted only. Each value must be a finite number > 0."""
    units: str = "absolute"
    """absolute (the guard's own units, after its weight) or stderr (standard errors of the difference between the
    best and the current window means, from the per-step spread of the guard's scores)."""
    window: int = 5
    """Steps averaged before comparing with the best (a per-step mean over a few samples is noisy). Range: [1, 1000]."""
    patience: int = 1
    """Consecutive steps past the threshold before the alarm fires. Range: [1, 1000]."""
    action: str = "warn"
    """warn (log the evidence, go on), stop (end the run and export the newest evaluated checkpoint whose guard value
    on the held-out prompts is within the threshold of its best; with ``log.eval_every: 0``, the newest checkpoint at
    or before the guard's best window) or rollback (restore the newest checkpoint at or before the guard's best
    window, multiply the learning rate by ``lr_factor`` and the KL weight by ``kl_factor``, go on). Every alarm is
    written to ``guard_events.jsonl`` with both curves' values."""
    lr_factor: float = 0.5
    """Learning-rate multiplier of each rollback. Range: (0, 1]."""
    kl_factor: float = 1.0
    """KL-weight multiplier of each rollback (needs ``train.kl_weight`` > 0 to have an effect). Range: [1, inf)."""
    max_rollbacks: int = 3
    """Rollbacks before an alarm stops the run instead. Range: [1, 1000]."""


@dataclass
class TrainConfig:
    steps: int = 40
    """RL steps (each: rollouts, rewards, advantages, update). Range: [1, 10000000]."""
    prompts_per_step: int = 8
    """Prompts per RL step (over all processes). Range: [1, 1000000]."""
    trees_per_prompt: int = 1
    """Trees per prompt; with no splits, this is the GRPO group size. Range: [1, 1000000]."""
    lr: float = 1e-3
    """Peak learning rate (AdamW). Range: (0, inf)."""
    lr_schedule: str = "constant"
    """constant, cosine or linear: the learning rate at step k is ``diffrl.update.lr_at`` (a function of the step
    alone, so a resumed run follows the same schedule); cosine and linear decay to 0 at ``train.steps``."""
    warmup_steps: int = 0
    """Linear warm-up from lr / (warmup_steps + 1) over the first steps, then the schedule. Range: [0, inf)."""
    objective: str = "ppo"
    """ppo: clipped-ratio updates of the SDE transitions (Flow-GRPO, BranchGRPO); nft: DiffusionNFT's forward-process
    objective on the leaves' clean latents (arXiv 2509.16117); awm: Advantage Weighted Matching (arXiv 2509.25050;
    advantage-weighted flow matching on the same points). nft and awm noise each leaf at ``sampler.timestep_fraction``
    of the rollout's noise levels. Objectives are registered in ``diffrl.update.OBJECTIVES``."""
    awm_weighting: str = "ghuber"
    """AWM's per-sample weighting of the flow-matching error m: ghuber (sigma ((m + 1e-10)^0.25 - 1e-10^0.25) / 0.25,
    the release's default) or uniform (m, the paper's plain form)."""
    nft_beta: float = 1.0
    """DiffusionNFT's beta: how far the implicit positive/negative policies sit from the sampling policy.
    Range: (0, inf)."""
    clip_range: float = 0.2
    """Per-element-normalised PPO epsilon (diffrl.loss.effective_clip_range). Range: (0, inf)."""
    ratio_norm: bool = False
    """GRPO-Guard (as released in Flow-GRPO's scripts/train_sd3_GRPO_Guard.py): RatioNorm of the clipped ratio (the
    log-ratio's deterministic bias removed, rescaled by the step's std) and the surrogate re-weighted by 1 / |dt| per
    denoising step. ppo only."""
    kl_convention: str = "exact"
    """ppo's per-step KL to the reference: exact (the Gaussian KL of the step, ||mu - mu_ref||^2 / (2 sigma_t^2
    |dsigma|)) or flow_grpo (Flow-GRPO's, divided by 2 sigma_t^2 only: |dsigma| times the exact one), so that a
    ``kl_weight`` copied from Flow-GRPO means what it meant there."""
    kl_weight: float = 0.01
    """Weight of the KL to the reference (LoRA off); 0 skips the reference pass. Range: [0, inf)."""
    adv_clip: float = 5.0
    """Advantages are clipped to [-adv_clip, adv_clip] (DiffusionNFT's A_max). Range: (0, inf)."""
    advantage: str = "tree"
    """How leaf values become advantages (``diffrl.advantages.ESTIMATORS``): tree (BranchGRPO's depth-wise z-score of
    every node), grpo (each leaf's group z-score; a node takes the mean of its leaves') or rloo (leave-one-out). A
    per-leaf objective (nft, awm) trains on the leaves' advantages."""
    tree_fusion: str = "mean"
    """How ``advantage: tree`` values a node from its leaves (BranchGRPO's reward fusion): mean (of the leaves below)
    or path_prob (children weighted by the softmax of their transition log-probs)."""
    pruning: PruningConfig = field(default_factory=PruningConfig)
    """Width and depth pruning of the trained edges (a mapping, e.g. ``{width: topk, depths: [9, 10]}``)."""
    rollout_chunks: int = 1
    """Roll a step's trees out in this many chunks; each chunk's rewards run in a background thread while the next
    chunk rolls out (1: one batched rollout, nothing overlaps). Range: [1, 100000]."""
    reward_timeout_s: float = 600.0
    """A reward still running after this many seconds on a batch fails that batch's samples (left out, warned).
    Range: (0, inf)."""
    reward_aggregation: str = "sum"
    """How several rewards become one value per leaf (``diffrl.advantages.AGGREGATIONS``): sum (the weighted sum of
    the rewards), mean (the weighted mean), min (the smallest weighted reward: a pessimistic ensemble, high only
    where every reward agrees, against reward hacking) or gdpo (GDPO's BN(sum_k w_k z_k): per-reward group
    z-scores, weighted, renormalised over the batch; an advantage already, which grpo does not normalise again)."""
    guard_rewards: dict[str, float] = field(default_factory=dict)
    """Rewards scored beside training and never trained on, named and weighted like ``rewards`` (e.g. ``{shapes:
    1.0}``): every step's rollouts and every evaluation's samples are scored, and ``guard_<name>`` (the weight times
    the reward's first score, averaged) is logged, tracked and plotted beside the trained reward; a negative weight
    turns a lower-is-better guard around. ``train.guard`` sets the alarm."""
    guard_reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Guard reward name -> keyword options for its factory, like ``reward_options``."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """The reward-hacking alarm: thresholds per guard, and what it does when one fires."""
    reward_routing: dict[str, list[str]] = field(default_factory=dict)
    """Modality routing (OmniNFT, joint audio-video): reward name -> the latent streams its advantage trains, e.g.
    ``{aesthetic: [video], av_sync: [video, audio]}``; each stream's log-prob trains with the advantage of its
    rewards alone (aggregated and estimated as set above). Empty: one advantage for the whole latent."""
    minibatch: int = 64
    """Transitions per backward pass; gradients accumulate over the step's minibatches. Range: [1, 1000000]."""
    tokens_per_batch: Optional[int] = None
    """Sequence-length-aware batching (video): at most this many transformer tokens per forward (CFG's two passes
    counted), so the minibatch shrinks with resolution and frames; None: ``train.minibatch`` samples per forward.
    Range: [1, inf)."""
    inner_epochs: int = 1
    """Passes over a step's rollouts. Range: [1, 1000]."""
    updates_per_epoch: int = 1
    """Optimizer steps per inner epoch: the step's trees are split into this many groups, one step each.
    Range: [1, 1000000]."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this total norm before each optimizer step. Range: (0, inf)."""
    ema_decay: float = 0.0
    """EMA of the LoRA weights used for evaluation and export (0 disables it). Range: [0, 1)."""
    seed: int = 0
    """Seed of the prompts' order, the rollouts' noise, the LoRA's initialisation and every random choice of the run
    (the held-out evaluation is seeded apart from it)."""


@dataclass
class ExploreConfig:
    """Low-precision exploration with exact regeneration (Sol-RL; ``diffrl.explore``)."""

    enabled: bool = False
    """Explore with a low-precision copy of the policy, then regenerate the kept candidates in full precision
    (Sol-RL)."""
    candidates: int = 4
    """Trees (flat: chains) previewed per prompt; replaces ``train.trees_per_prompt`` while exploring.
    Range: [1, 1000]."""
    keep: int = 2
    """Leaves per prompt regenerated in full precision and trained on (K of candidates x leaves per tree).
    Range: [1, 1000000]."""
    precision: str = "fp8"
    """Exploration copy's grid: fp8 (e4m3, per-row scales), fp8_tensor (one scale per tensor), nvfp4 or mxfp4."""
    backend: str = "auto"
    """auto (torchao GEMMs where the GPU has them, else emulated), emulated, or native (an error where impossible)."""
    preview: str = "rollout"
    """rollout: the training schedule with the same SDE noises the regeneration uses (trees too; needed for
    ``naive``); ode: Sol-RL's deterministic Euler drafts from each candidate's initial noise (flat schedules only;
    they predict the regenerated reward only where the SDE noise decides little, e.g. a late ``sde_window``)."""
    preview_steps: Optional[int] = None
    """Steps of the ODE preview; None: ``sampler.num_steps``. Range: [1, 1000]."""
    select: str = "best_worst"
    """best_worst, mean_deviation, max_variance (D^3S) or random (the control)."""
    skip_modules: list[str] = field(default_factory=lambda: ["embed", "norm", "proj_out"])
    """Linear layers (name substrings) kept in the model's precision: by default the embeddings, the adaptive-norm
    modulations and the output projection (little compute, most of the error); the blocks' attention and MLP layers,
    where the FLOPs are, go low-precision."""
    min_dim: int = 0
    """Linear layers with max(d_in, d_out) <= this stay in the model's precision. Range: [0, inf)."""
    naive: bool = False
    """Train on the low-precision samples themselves, no regeneration (the degraded baseline, for comparison)."""


@dataclass
class DataConfig:
    prompts: str = "shapes"
    """"shapes" (the generated grammar; "shapes:count,relation" picks kinds), a .txt file (one prompt a line), a .jsonl
    file ({"prompt": ..., any metadata} a line), a .parquet file or a Hugging Face ``datasets`` folder written by
    ``save_to_disk`` (``pip install "diffrl[data]"``), or ``pkg.module:function`` returning a list of str or of dicts
    with "prompt". ``PATH:COLUMN`` names the prompt's key or column (default prompt). Each row reaches the rewards as
    its prompt's ``.metadata`` (docs/rewards.md, "Prompts with metadata")."""
    eval_prompts: str = "shapes:count,relation"
    """Held-out prompts: "shapes:<kinds>" or any source ``data.prompts`` takes (its first ``data.eval_size``)."""
    eval_size: int = 64
    """Distinct held-out prompts (they are kept out of the training prompts). Range: [1, 100000]."""
    eval_seeds: int = 1
    """Samples per held-out prompt, each from its own seed: the accuracy is over ``eval_size * eval_seeds`` samples
    (the shapes grammar has only 54 distinct count prompts, so more prompts would leave none to train on).
    Range: [1, 1000]."""
    evaluator: str = "auto"
    """How held-out samples are scored (``diffrl.evaluation``): shapes (the verifier's strict accuracy), reward:NAME
    (that reward's mean; NAME from ``rewards``), or auto (shapes when every held-out prompt is in its grammar, else
    the first reward)."""
    exclude_eval: bool = True
    """Keep the evaluation prompts out of training. false: train on them too, e.g. to check that RL fits the one
    prompt it trains on (``data.prompts`` and ``data.eval_prompts`` the same one-line file)."""


@dataclass
class LogConfig:
    out: str = "runs/tiny_shapes"
    """The run directory (``--out`` overrides it): config, metrics, grids, checkpoints, the export, summary.json."""
    sample_every: int = 10
    """Steps between sample grids (0: none). Range: [0, inf)."""
    eval_every: int = 20
    """Steps between held-out evaluations (0: only at the start and the end). Range: [0, inf)."""
    checkpoint_every: int = 5
    """Steps between checkpoints (the last step always saves one). Range: [1, inf)."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers the run logs to, from the first process (``diffrl.tracking.TRACKERS``): tensorboard (event
    files in ``tensorboard/``), wandb (Weights & Biases, ``pip install "diffrl[wandb]"``; with ``WANDB_MODE=offline``
    it writes ``wandb/`` in the run directory and needs no account). Each gets the resolved config at the start,
    ``metrics.jsonl``'s numbers every step, every sample grid and ``summary.json``'s values at the end. A listed
    tracker that is not installed stops the run before any model loads."""
    tensorboard: bool = True
    """false leaves tensorboard out whatever ``log.trackers`` lists (the switch from before ``log.trackers``: configs
    that set it keep their meaning)."""
    wandb_project: str = "diffrl"
    """The Weights & Biases project of the run (wandb in ``log.trackers``)."""
    wandb_entity: Optional[str] = None
    """The Weights & Biases team or user the run belongs to; None: the account's default."""
    run_name: Optional[str] = None
    """The run's name in the trackers and in the title of its model card; None: the run directory's name."""
    save_advantages: bool = False
    """Write every step's node advantages (all trees) to the run directory, for checking and debugging."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rewards: dict[str, float] = field(default_factory=lambda: {"shapes": 1.0})
    """Reward name (or pkg.module:fn) -> weight. A reward returning several scores uses its first."""
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Reward name -> keyword options for it (e.g. ``aesthetic: {weights: /path/head.pth}``, ``remote: {url: ...}``)."""
    explore: ExploreConfig = field(default_factory=ExploreConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)


CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"), "model.attention": ("sdpa", "xformers"),
    "sampler.kind": ("flow", "dance", "cps"),
    "sampler.window_schedule": ("fixed", "progressive", "decay", "exp_decay", "random"),
    "train.lr_schedule": ("constant", "cosine", "linear"), "train.awm_weighting": ("ghuber", "uniform"),
    "train.tree_fusion": ("mean", "path_prob"), "train.kl_convention": ("exact", "flow_grpo"),
    "explore.precision": ("fp8", "fp8_tensor", "nvfp4", "mxfp4"),
    "explore.backend": ("auto", "emulated", "native"), "explore.preview": ("ode", "rollout"),
    "explore.select": ("best_worst", "mean_deviation", "max_variance", "random"),
}


RANGES: dict[str, str] = {
    "model.lora_rank": "[0, 4096]", "model.lora_alpha": "(0, inf)", "model.resolution": "[8, 16384]",
    "model.num_frames": "[1, 10000]",
    "sampler.num_steps": "[1, 1000]", "sampler.noise_level": "[0, 1]", "sampler.guidance_scale": "[0, 100]",
    "sampler.branch_factor": "[2, 64]", "sampler.split_noise_scale": "(0, inf)", "sampler.timestep_fraction": "(0, 1]",
    "sampler.eval_steps": "[1, 1000]", "sampler.window_steps": "[1, inf)",
    "train.steps": "[1, 10000000]", "train.prompts_per_step": "[1, 1000000]", "train.trees_per_prompt": "[1, 1000000]",
    "train.lr": "(0, inf)", "train.warmup_steps": "[0, inf)", "train.nft_beta": "(0, inf)",
    "train.clip_range": "(0, inf)",
    "train.kl_weight": "[0, inf)", "train.adv_clip": "(0, inf)", "train.rollout_chunks": "[1, 100000]",
    "train.reward_timeout_s": "(0, inf)", "train.minibatch": "[1, 1000000]", "train.tokens_per_batch": "[1, inf)",
    "train.inner_epochs": "[1, 1000]", "train.updates_per_epoch": "[1, 1000000]", "train.max_grad_norm": "(0, inf)",
    "train.ema_decay": "[0, 1)", "train.pruning.width_ratio": "(0, 1]", "train.pruning.until": "[0, 1]",
    "train.pruning.depth_interval": "[1, inf)", "train.guard.window": "[1, 1000]", "train.guard.patience": "[1, 1000]",
    "train.guard.lr_factor": "(0, 1]", "train.guard.kl_factor": "[1, inf)", "train.guard.max_rollbacks": "[1, 1000]",
    "explore.candidates": "[1, 1000]", "explore.keep": "[1, 1000000]", "explore.preview_steps": "[1, 1000]",
    "explore.min_dim": "[0, inf)",
    "data.eval_size": "[1, 100000]", "data.eval_seeds": "[1, 1000]",
    "log.sample_every": "[0, inf)", "log.eval_every": "[0, inf)", "log.checkpoint_every": "[1, inf)",
}
"""Every numeric key's allowed values as an interval (``[`` / ``]`` include the bound, ``(`` / ``)`` exclude it);
values must also be finite. Each field's docstring states its range (a test keeps the two equal)."""
MAX_LEAVES_PER_STEP = 1_000_000
"""Rollouts per step beyond any real run: refused before a model loads (a typo such as 1e20 prompts would hang)."""
MAX_CONFIG_BYTES = 1024 * 1024
"""A config is a few KB; a bigger file is refused before YAML parses it (a 120 MB file parses for minutes)."""


def _in_range(value: float, spec: str) -> bool:
    """Whether finite ``value`` lies in the interval ``spec`` (e.g. ``"(0, 1]"``)."""
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return (lo <= value if spec[0] == "[" else lo < value) and (value <= hi if spec[-1] == "]" else value < hi)


def _range_errors(cfg: Config, where: str) -> list[str]:
    """A sentence for every numeric key (``RANGES``) that is not finite or lies outside its interval."""
    errors = []
    for key, spec in RANGES.items():
        value = functools.reduce(getattr, key.split("."), cfg)
        if value is not None and not (math.isfinite(value) and _in_range(value, spec)):
            errors.append(f"{where}: '{key}' must be a finite number in {spec}, got {value}")
    return errors


def _known_rewards() -> list[str]:
    """Reward names: the built-ins and installed plug-ins."""
    from rewards import REGISTRY, plugins

    return [*REGISTRY, *plugins()]


def _name_errors(cfg: Config, where: str) -> list[str]:
    """Unknown model families and reward names (built-in or installed plug-ins; ``pkg.module:attr`` paths are
    imported later)."""
    from diffrl.adapters import ADAPTERS

    errors, known = [], _known_rewards()
    if ":" not in cfg.model.family and cfg.model.family not in ADAPTERS:
        close = difflib.get_close_matches(cfg.model.family, list(ADAPTERS), n=1)
        errors.append(f"{where}: unknown 'model.family' {cfg.model.family!r}; choose one of {sorted(ADAPTERS)} or "
                      "'pkg.module:Class'" + (f" (did you mean {close[0]!r}?)" if close else ""))
    for name in cfg.rewards:
        if ":" not in name and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            errors.append(f"{where}: unknown reward 'rewards.{name}'; choose one of {sorted(known)} or "
                          "'pkg.module:function'" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return errors


def _type_ok(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_type_ok(k, args[0]) and _type_ok(v, args[1]) for k, v in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp) and not (tp is int and isinstance(value, bool))


def _merge(obj: Any, data: dict, prefix: str, where: str, errors: list[str]) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            suggestion = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            errors.append(f"{where}: unknown key '{path}'" + suggestion)
            continue
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                errors.append(f"{where}: '{path}' must be a mapping of its fields, got {value!r}")
            else:
                _merge(current, value, f"{path}.", where, errors)
            continue
        value = _coerce(value, hints[key])
        if not _type_ok(value, hints[key]):
            errors.append(f"{where}: '{path}' must be {_type_name(hints[key])}, got {value!r}")
        else:
            setattr(obj, key, float(value) if hints[key] is float else value)


def _coerce(value: Any, tp: Any) -> Any:
    """YAML 1.1 reads ``3e-4`` as a string: accept float-looking strings where a float is expected."""
    if isinstance(value, str) and (tp is float or tp == Optional[float]):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003): the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({str(e).splitlines()[0]}); quote it "
                          "if it is a string") from None


def named_overrides(text: str) -> tuple[str, list[str]]:
    """``"NAME:key=value,key=value"`` (a benchmark's variant) -> (NAME, ["key=value", ...]); commas inside brackets
    or braces belong to a value (``sampler.split_steps=[0,1,2]``). ConfigError in one sentence for an item that is
    not key=value."""
    name, _, own = text.partition(":")
    items, depth, item = [], 0, ""
    for ch in own:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(item)
            item = ""
        else:
            item += ch
    if item:
        items.append(item)
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{text!r}: {item!r} is not key=value")
    return name, items


def _nest(keys: list[str], value: Any) -> dict:
    return {keys[0]: value} if len(keys) == 1 else {keys[0]: _nest(keys[1:], value)}


def validate(cfg: Config, where: str) -> list[str]:
    """Value errors that types cannot express (impossible combinations), each naming file and key."""
    errors = []
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            errors.append(f"{where}: '{key}' must be one of {list(allowed)}, got {value!r}")
    s, t = cfg.sampler, cfg.train
    bad_splits = [k for k in s.split_steps if not 0 <= k < s.num_steps]
    if bad_splits:
        errors.append(f"{where}: 'sampler.split_steps' {bad_splits} lie past the last step {s.num_steps - 1}")
    if s.split_steps != sorted(set(s.split_steps)):
        errors.append(f"{where}: 'sampler.split_steps' must be strictly increasing, got {s.split_steps}")
    if s.window_schedule != "fixed" and (s.sde_window is None or s.split_steps):
        errors.append(f"{where}: 'sampler.window_schedule' {s.window_schedule} moves 'sampler.sde_window': it needs "
                      "one and flat rollouts ('sampler.split_steps: []')")
    if s.sde_window is not None:
        if len(s.sde_window) != 2 or s.sde_window[0] < 0 or s.sde_window[1] < 1 or sum(s.sde_window) > s.num_steps:
            errors.append(f"{where}: 'sampler.sde_window' must be [start, size] inside {s.num_steps} steps, "
                          f"got {s.sde_window}")
        elif any(not s.sde_window[0] <= k < sum(s.sde_window) for k in s.split_steps):
            errors.append(f"{where}: 'sampler.split_steps' must lie inside 'sampler.sde_window'")
    leaves = s.branch_factor ** len(s.split_steps)
    group = cfg.explore.keep if cfg.explore.enabled else t.trees_per_prompt * leaves
    if group < 2:
        errors.append(f"{where}: a group size of {group} (train.trees_per_prompt x leaves per tree) has no "
                      "variance to learn from; use at least 2 leaves per prompt")
    errors += _range_errors(cfg, where)
    if t.warmup_steps >= t.steps:
        errors.append(f"{where}: 'train.warmup_steps' must be less than 'train.steps' ({t.steps}), "
                      f"got {t.warmup_steps}")
    if cfg.model.fsdp and cfg.explore.enabled:
        errors.append(f"{where}: 'model.fsdp' and 'explore' do not combine yet (the low-precision copy of the policy "
                      "would be a whole unsharded model per process)")
    if cfg.model.fsdp_cpu_offload and not cfg.model.fsdp:
        errors.append(f"{where}: 'model.fsdp_cpu_offload' offloads FSDP shards: it needs 'model.fsdp' true")
    if t.objective == "ppo" and s.noise_level == 0:
        errors.append(f"{where}: 'sampler.noise_level' 0 makes the rollouts deterministic: the clipped-ratio objective "
                      "('train.objective' ppo) needs SDE noise to have log-probabilities (nft and awm train on ODE "
                      "rollouts)")
    if cfg.model.lora_rank > 0 and not cfg.model.lora_targets:
        errors.append(f"{where}: 'model.lora_targets' is empty: name the layers the LoRA adapts (e.g. [to_q, to_v])")
    trees = cfg.explore.candidates if cfg.explore.enabled else t.trees_per_prompt
    leaves_per_step = t.prompts_per_step * trees * leaves
    if leaves_per_step > MAX_LEAVES_PER_STEP:
        errors.append(f"{where}: a step of {leaves_per_step} rollouts ('train.prompts_per_step' x trees per prompt x "
                      f"leaves per tree) is more than {MAX_LEAVES_PER_STEP}: far beyond any run; check the sizes")
    from diffrl.advantages import AGGREGATIONS, ESTIMATORS
    from diffrl.update import OBJECTIVES

    for key, registry in (("objective", OBJECTIVES), ("advantage", ESTIMATORS), ("reward_aggregation", AGGREGATIONS)):
        if getattr(t, key) not in registry:
            errors.append(f"{where}: 'train.{key}' must be one of {list(registry)}, got {getattr(t, key)!r}")
    per_leaf = t.objective in OBJECTIVES and OBJECTIVES[t.objective].per_leaf
    if per_leaf and t.kl_convention != "exact":
        errors.append(f"{where}: 'train.kl_convention' scales the per-step Gaussian KL of ppo; {t.objective}'s KL is "
                      "||v - v_ref||^2: leave it at exact")
    if per_leaf and t.ratio_norm:
        errors.append(f"{where}: 'train.ratio_norm' normalises the clipped ratio of SDE transitions: it needs "
                      f"'train.objective' ppo, not {t.objective}")
    errors += _pruning_errors(cfg, per_leaf, where)
    if t.tree_fusion == "path_prob" and (t.advantage != "tree" or cfg.explore.enabled):
        errors.append(f"{where}: 'train.tree_fusion' path_prob fuses tree nodes by every edge's log-prob: it needs "
                      "'train.advantage' tree and no 'explore' (which regenerates only some edges)")
    if t.reward_routing:
        unrouted = sorted(set(cfg.rewards) - set(t.reward_routing))
        if unrouted:
            errors.append(f"{where}: 'train.reward_routing' routes no stream for rewards {unrouted}")
        errors += [f"{where}: 'train.reward_routing.{k}' names no reward in 'rewards' ({sorted(cfg.rewards)})"
                   for k in t.reward_routing if k not in cfg.rewards]
        if per_leaf:
            errors.append(f"{where}: 'train.reward_routing' trains each stream's log-probs with its own advantage: it "
                          f"needs 'train.objective' ppo ({t.objective}'s loss is one velocity error for the whole "
                          "latent)")
    if cfg.explore.enabled:
        errors += _explore_errors(cfg, leaves, where)
    if not cfg.rewards:
        errors.append(f"{where}: 'rewards' is empty; name at least one reward")
    errors += [f"{where}: 'rewards.{k}' weight must be a finite number, got {w}" for k, w in cfg.rewards.items()
               if not math.isfinite(w)]
    errors += _name_errors(cfg, where)
    errors += [f"{where}: 'sampler.family_guidance.{k}' must be a finite number >= 0, got {v}"
               for k, v in cfg.sampler.family_guidance.items() if not (math.isfinite(v) and v >= 0)]
    errors += [f"{where}: 'reward_options.{k}' names no reward in 'rewards' ({sorted(cfg.rewards)})"
               for k in cfg.reward_options if k not in cfg.rewards]
    errors += _tracker_errors(cfg, where)
    errors += _guard_errors(cfg, where)
    if t.reward_aggregation == "mean" and sum(cfg.rewards.values()) == 0:
        errors.append(f"{where}: 'train.reward_aggregation' mean divides by the sum of the reward weights, which is 0")
    return errors


def _guard_errors(cfg: Config, where: str) -> list[str]:
    """``train.guard_rewards`` and ``train.guard``: thresholds of known guards, an action that can act."""
    t, g = cfg.train, cfg.train.guard
    errors = [f"{where}: 'train.guard_rewards.{k}' weight must be a finite non-zero number, got {w}"
              for k, w in t.guard_rewards.items() if not (math.isfinite(w) and w != 0)]
    errors += [f"{where}: 'train.guard_reward_options.{k}' names no guard in 'train.guard_rewards' "
               f"({sorted(t.guard_rewards)})" for k in t.guard_reward_options if k not in t.guard_rewards]
    errors += [f"{where}: 'train.guard.thresholds.{k}' names no guard in 'train.guard_rewards' "
               f"({sorted(t.guard_rewards)})" for k in g.thresholds if k not in t.guard_rewards]
    errors += [f"{where}: 'train.guard.thresholds.{k}' must be a finite number > 0, got {v}"
               for k, v in g.thresholds.items() if not (math.isfinite(v) and v > 0)]
    if g.units not in ("absolute", "stderr"):
        errors.append(f"{where}: 'train.guard.units' must be one of ['absolute', 'stderr'], got {g.units!r}")
    if g.action not in ("warn", "stop", "rollback"):
        errors.append(f"{where}: 'train.guard.action' must be one of ['warn', 'stop', 'rollback'], got {g.action!r}")
    elif g.action != "warn" and not g.thresholds:
        errors.append(f"{where}: 'train.guard.action' {g.action} acts when a guard's threshold is crossed: set "
                      "'train.guard.thresholds' (e.g. {shapes: 0.05})")
    if g.action == "rollback" and g.lr_factor == 1 and g.kl_factor == 1:
        errors.append(f"{where}: 'train.guard.action' rollback with 'lr_factor' and 'kl_factor' both 1 would replay "
                      "the same drop; lower the learning rate or raise the KL weight")
    if g.kl_factor != 1 and t.kl_weight == 0:
        errors.append(f"{where}: 'train.guard.kl_factor' multiplies 'train.kl_weight', which is 0: set a KL weight")
    known = _known_rewards()
    for name in t.guard_rewards:
        if ":" not in name and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            errors.append(f"{where}: unknown reward 'train.guard_rewards.{name}'; choose one of {sorted(known)} or "
                          "'pkg.module:function'" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return errors


def _tracker_errors(cfg: Config, where: str) -> list[str]:
    """Names in ``log.trackers`` that no tracker has (``diffrl.tracking.TRACKERS``)."""
    from diffrl.tracking import TRACKERS

    errors = []
    for name in cfg.log.trackers:
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, list(TRACKERS), n=1)
            errors.append(f"{where}: unknown tracker {name!r} in 'log.trackers'; choose from {sorted(TRACKERS)}"
                          + (f" (did you mean {close[0]!r}?)" if close else ""))
    return errors


def _pruning_errors(cfg: Config, per_leaf: bool, where: str) -> list[str]:
    """``train.pruning``'s values and where it applies."""
    p, errors = cfg.train.pruning, []
    if p.width not in (None, "topk", "best_worst"):
        errors.append(f"{where}: 'train.pruning.width' must be topk, best_worst or null, got {p.width!r}")
    bad = [d for d in p.depths if not 1 <= d <= cfg.sampler.num_steps]
    if bad:
        errors.append(f"{where}: 'train.pruning.depths' {bad} are not edge depths 1..{cfg.sampler.num_steps}")
    if (p.width or p.depths) and per_leaf:
        errors.append(f"{where}: 'train.pruning' leaves edges out of the clipped-ratio update: it needs "
                      f"'train.objective' ppo, not {cfg.train.objective}")
    if p.width and not cfg.sampler.split_steps:
        errors.append(f"{where}: 'train.pruning.width' prunes the chains after the last split: it needs a tree "
                      "('sampler.split_steps')")
    return errors


def _explore_errors(cfg: Config, leaves: int, where: str) -> list[str]:
    e, s, t, errors = cfg.explore, cfg.sampler, cfg.train, []
    if not e.keep <= e.candidates * leaves:
        errors.append(f"{where}: 'explore.keep' ({e.keep}) must be at most 'explore.candidates' x leaves per tree "
                      f"({e.candidates} x {leaves})")
    if e.preview == "ode" and s.split_steps:
        errors.append(f"{where}: 'explore.preview' ode drafts flat chains; a tree schedule ('sampler.split_steps') "
                      "needs 'explore.preview' rollout")
    if e.naive and e.preview != "rollout":
        errors.append(f"{where}: 'explore.naive' trains on the preview itself, which needs 'explore.preview' rollout")
    if e.preview_steps is not None and e.preview != "ode":
        errors.append(f"{where}: 'explore.preview_steps' only applies to 'explore.preview' ode")
    if t.trees_per_prompt != 1:
        errors.append(f"{where}: with 'explore.enabled', 'explore.candidates' sets the trees per prompt: leave "
                      "'train.trees_per_prompt' at 1")
    if t.rollout_chunks > 1:
        errors.append(f"{where}: 'explore.enabled' regenerates the selected candidates in one pass: leave "
                      "'train.rollout_chunks' at 1")
    return errors


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides; validated. Raises ``ConfigError``."""
    cfg, errors = Config(), []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist")
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is {p.stat().st_size} bytes: a config is a few KB (at most "
                              f"{MAX_CONFIG_BYTES}); is this the right file?")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
        _merge(cfg, data, "", str(path), errors)
    for text in overrides:
        keys, value = parse_override(text)
        if keys == ["rewards"] or keys[0] != "rewards":
            _merge(cfg, _nest(keys, value), "", f"override {text!r}", errors)
        else:
            _merge(cfg, {"rewards": {**cfg.rewards, ".".join(keys[1:]): value}}, "", f"override {text!r}", errors)
    where = str(path) if path else "config"
    errors += validate(cfg, f"{where} (with overrides)" if overrides else where)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return cfg


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (written to the run directory)."""
    return dataclasses.asdict(cfg)
