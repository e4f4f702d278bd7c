"""The RL loop, read top to bottom: collect (tree SDE rollouts) -> score (rewards) -> advantage -> optimize
(clipped-ratio LoRA updates with a KL to the adapters-off reference; ``diffrl.update``) -> log / evaluate /
checkpoint. What a run is made of (``Run``, ``TrainState``, ``Batch``) is in ``diffrl.state``.

One trainer for every model family: it talks to the model only through an adapter (``diffrl.adapters``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

import rewards as reward_registry
from diffrl import checkpoint, rundir, tracking
from diffrl.adapters import load_adapter_class, shape_options
from diffrl.adapters.base import meta_denoisers
from diffrl.advantages import Trees, clip_advantages, fill_invalid, node_advantages, routed_advantages
from diffrl.config import Config, ConfigError, to_dict
from diffrl.distributed import (
    first_process,
    first_process_runs,
    from_first_process,
    gather_rows,
    mean_over_processes,
    setup,
    shutdown,
)
from diffrl.evaluation import evaluator_for
from diffrl.explore import LowPrecisionPolicy, kept_leaves, preview, restrict
from diffrl.finite import NonFiniteError, check_finite
from diffrl.guards import Guards
from diffrl.guards import apply as apply_guards
from diffrl.hacking import Alarm, export_step
from diffrl.inference import EVAL_SEED, sample_shared
from diffrl.model_card import write_card
from diffrl.prompts import PromptStream, eval_prompts
from diffrl.rollout import concat_rollouts, keep_paths, trained_edges, tree_rollout
from diffrl.schedule import mix_window_start, subsample_steps, window_mask
from diffrl.scoring import check_valid, score_batch, score_samples, submit
from diffrl.seeding import mix_seed
from diffrl.selection import mean_spearman, select_candidates
from diffrl.state import Batch, Run, Swap, TrainState
from diffrl.tree import TreeSchedule, depth_prune_mask, width_prune_mask
from diffrl.update import STATS, ema_update, objective, optimize, set_lr
from diffrl.viz import cat_media, image_grid, stills, training_curves

log = logging.getLogger("diffrl")
GRID_PROMPTS = 8


def build(cfg: Config, out: Path) -> Run:
    """Load the model (LoRA attached), the rewards, the optimizer and the prompt sources."""
    place = setup(cfg.model.device)
    rank, world = place.rank, place.world
    if cfg.train.prompts_per_step % world:
        raise ConfigError(f"'train.prompts_per_step' ({cfg.train.prompts_per_step}) must be divisible by the "
                          f"number of processes ({world})")
    if world > 1:
        log.info("process %d of %d processes (local rank %d, %s)", rank, world, place.local_rank, place.device)
    tracking.check_installed(tracking.active(cfg.log))
    # before the model: a bad reward fails in seconds, not after a long load
    rewards = load_rewards(cfg.rewards, cfg.reward_options)
    t = cfg.train
    guards = Guards(load_rewards(t.guard_rewards, t.guard_reward_options, "guard reward"), t.guard_rewards, t.guard,
                    t.lr, t.kl_weight, t.seed) if t.guard_rewards else None
    sharded = cfg.model.fsdp and world > 1
    try:
        adapter_cls = load_adapter_class(cfg.model.family)
        with meta_denoisers() if sharded else contextlib.nullcontext():  # sharded: no process loads a whole denoiser
            adapter = adapter_cls.from_pretrained(cfg.model.path, device=str(place.device), dtype=cfg.model.dtype,
                                                  attention=cfg.model.attention,
                                                  **shape_options(cfg.model.resolution, cfg.model.num_frames))
    except (ValueError, ImportError, AttributeError) as e:
        raise ConfigError(f"'model' ({cfg.model.family} from {cfg.model.path}): {str(e).splitlines()[0]}") from None
    try:
        adapter.set_family_guidance(cfg.sampler.family_guidance)
    except ValueError as e:
        raise ConfigError(f"'sampler.family_guidance': {e}") from None
    native = getattr(adapter, "native_resolution", None)
    if cfg.model.resolution and native and cfg.model.resolution < native:
        log.warning("'model.resolution' %d is below %s's native %d px: the rewards read images the model rarely "
                    "makes at this size, which invites reward hacking (blur and artifacts a reward does not see); "
                    "evaluate at %d px before trusting a gain", cfg.model.resolution, cfg.model.family, native, native)
    if not sharded:
        weights = (p for m in adapter.denoisers.values() for p in m.parameters())
        check_finite(f"the weights of {cfg.model.path}", weights)
    torch.manual_seed(cfg.train.seed)
    try:
        adapter.add_lora(cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets)
    except ValueError as e:
        raise ConfigError(f"'model.lora_targets' {cfg.model.lora_targets}: {str(e).splitlines()[0]}") from None
    if cfg.model.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    if cfg.model.offload:
        adapter.enable_offload()
    if cfg.model.fsdp:
        if sharded:
            adapter.shard(cfg.model.fsdp_cpu_offload)
            log.info("FSDP: the denoisers%s are sharded over %d processes",
                     " and their reference" if adapter.full_finetune else " (LoRA on the frozen base)", world)
        else:
            log.warning("model.fsdp: one process, nothing to shard over (launch with accelerate launch / torchrun)")
    if cfg.model.compile:
        adapter.compile()
    routed = sorted({m for ms in cfg.train.reward_routing.values() for m in ms})
    unknown = [m for m in routed if m not in (adapter.streams or {})]
    if unknown:
        raise ConfigError(f"'train.reward_routing' routes rewards to {unknown}, but the {cfg.model.family} model's "
                          f"latent streams are {sorted(adapter.streams or {}) or 'one single stream'}")
    held_out = eval_prompts(cfg.data.eval_prompts, cfg.data.eval_size)
    try:
        evaluator = evaluator_for(held_out, rewards, cfg.data.evaluator, cfg.train.reward_timeout_s)
    except ValueError as e:
        raise ConfigError(f"'data.evaluator': {e}") from None
    e = cfg.explore
    explorer = LowPrecisionPolicy(adapter, e.precision, e.backend, e.skip_modules, e.min_dim) if e.enabled else None
    s = cfg.sampler
    tracker = tracking.start(cfg.log, out, to_dict(cfg)) if rank == 0 else tracking.Trackers()
    return Run(cfg=cfg, out=out, adapter=adapter, rewards=rewards,
               schedule=TreeSchedule(s.num_steps, s.split_steps, s.branch_factor), sigmas=adapter.sigmas(s.num_steps),
               optimizer=torch.optim.AdamW(adapter.trainable_parameters(), lr=cfg.train.lr, weight_decay=0.0),
               prompts=PromptStream(cfg.data.prompts, cfg.train.seed,
                                    exclude=held_out if cfg.data.exclude_eval else ()),
               eval_prompts=held_out,
               minibatch=batch_size(cfg, adapter.sequence_length), tracker=tracker, rank=rank, world=world,
               explorer=explorer, evaluator=evaluator, collector=Rollouts() if explorer is None else Exploration(),
               guards=guards)


def load_rewards(names: Iterable[str], options: dict[str, dict], what: str = "reward") -> dict[str, Callable]:
    """The named rewards, each loaded with its options; a reward that cannot load is one ``ConfigError``."""
    rewards = {}
    for name in names:
        try:
            rewards[name] = reward_registry.load(name, **options.get(name, {}))
        except (ValueError, TypeError, ImportError, OSError) as e:
            raise ConfigError(f"{what} {name!r} cannot load: {str(e).splitlines()[0]}") from None
    return rewards


def batch_size(cfg: Config, tokens_per_sample: int) -> int:
    """Samples per forward: ``train.minibatch``, or fewer so that one forward (both CFG passes) holds at most
    ``train.tokens_per_batch`` transformer tokens; at least 1."""
    if cfg.train.tokens_per_batch is None:
        return cfg.train.minibatch
    passes = 1 if cfg.sampler.guidance_scale == 1.0 else 2
    fit = max(1, cfg.train.tokens_per_batch // (tokens_per_sample * passes))
    if fit < cfg.train.minibatch:
        log.info("sequence-length-aware batching: %d tokens per sample x %d passes, %d samples per forward",
                 tokens_per_sample, passes, fit)
    return min(cfg.train.minibatch, fit)


def _velocity(run: Run, guidance: float) -> Callable:
    return lambda x, sigma, cond: run.adapter.velocity(x, sigma, cond, guidance)


def collect(run: Run, step: int) -> Batch:
    """This process's rollouts for RL step ``step``, made by ``run.collector``."""
    return run.collector.collect(run, step)


class Rollouts:
    """Full-precision SDE rollouts (``rollouts``): every leaf is rolled out, scored and trained."""

    def collect(self, run: Run, step: int) -> Batch:
        return rollouts(run, step)

    def expected_leaves(self, run: Run, valid: Tensor) -> int:
        return valid.numel()

    def after_update(self, run: Run, batch: Batch, leaf_r: Tensor) -> dict:
        return {}

    def after_restore(self, run: Run) -> None:
        pass


class Exploration:
    """Sol-RL exploration (``collect_explored``) with ``run.explorer``, the low-precision copy of the policy: only
    ``explore.keep`` leaves per prompt are regenerated and scored; the copy follows every update and the resumed
    weights, and each step logs its timings and the preview/regenerated rank agreement."""

    def collect(self, run: Run, step: int) -> Batch:
        return collect_explored(run, step)

    def expected_leaves(self, run: Run, valid: Tensor) -> int:
        return run.cfg.explore.keep * run.cfg.train.prompts_per_step

    def after_update(self, run: Run, batch: Batch, leaf_r: Tensor) -> dict:
        return {**_explore_metrics(run, batch, leaf_r), "refresh_s": round(run.explorer.refresh(), 4)}

    def after_restore(self, run: Run) -> None:
        run.explorer.refresh()  # the exploration copy was built before the checkpoint's LoRA was loaded


def rollouts(run: Run, step: int) -> Batch:
    """Tree (or flat) SDE rollouts of this process's share of the step's prompts; every tree's seed derives from
    (seed, step, global tree index), so N processes roll out exactly the trees one process would. With
    ``train.rollout_chunks > 1`` the trees roll out chunk by chunk and each chunk is scored in a background thread
    while the next one rolls out."""
    cfg, t0 = run.cfg, time.perf_counter()
    all_prompts, first, prompts, seeds = _step_trees(run, step, cfg.train.trees_per_prompt)
    n, s, leaves = len(prompts), cfg.sampler, run.schedule.num_leaves
    parts, images, pending = [], [], []
    groups = torch.arange(n).reshape(-1, cfg.train.trees_per_prompt)  # a chunk holds whole prompts (groupwise rewards)
    for idx in (g.flatten() for g in groups.tensor_split(min(cfg.train.rollout_chunks, len(groups)))):
        chunk = [prompts[i] for i in idx.tolist()]
        with torch.no_grad():
            ro = tree_rollout(_velocity(run, s.guidance_scale), run.schedule, run.sigmas,
                              [seeds[i] for i in idx.tolist()], run.adapter.latent_shape,
                              cond=run.adapter.encode(chunk), max_batch=run.minibatch,
                              device=run.adapter.device, **_rollout_options(run, step))
            parts.append(ro)
            images.append(run.adapter.decode(ro.leaves.flatten(0, 1)))
        if cfg.train.rollout_chunks > 1:
            pending.append(submit(score_samples, run.rewards, images[-1], [p for p in chunk for _ in range(leaves)],
                                  cfg.train.reward_timeout_s))
    return Batch(prompts=prompts, all_prompts=all_prompts, first_tree=first,
                 rollout=parts[0] if len(parts) == 1 else concat_rollouts(parts), images=cat_media(images),
                 rollout_s=time.perf_counter() - t0, pending_scores=pending)


def _step_trees(run: Run, step: int, per_prompt: int) -> tuple[list[str], int, list[str], list[int]]:
    """The step's trees: every process's prompts (``per_prompt`` trees each, contiguous), this process's first
    tree, its prompts and its tree seeds (from (seed, step, global tree index))."""
    prompts = run.prompts.at(step, run.cfg.train.prompts_per_step)
    all_prompts = [p for p in prompts for _ in range(per_prompt)]
    n = len(all_prompts) // run.world
    first = run.rank * n
    return all_prompts, first, all_prompts[first : first + n], [mix_seed(run.cfg.train.seed, step, first + i)
                                                                   for i in range(n)]


def _rollout_options(run: Run, step: int) -> dict:
    """The training rollouts' SDE options for ``tree_rollout`` at RL step ``step``."""
    s = run.cfg.sampler
    window = sde_window(run.cfg, step)
    return dict(kind=s.kind, noise_level=s.noise_level, split_noise_scale=s.split_noise_scale,
                sde_steps=None if window is None else window_mask(s.num_steps, *window))


def sde_window(cfg: Config, step: int) -> Optional[tuple[int, int]]:
    """``(start, size)`` of the SDE (and trained) window at RL step ``step``, or None (every step is SDE):
    ``sampler.sde_window`` as given (``sampler.window_schedule: fixed``) or with its start moved by MixGRPO's
    schedule (``schedule.mix_window_start``: progressive, decay, exp_decay; random draws from (seed, step))."""
    s = cfg.sampler
    if s.sde_window is None:
        return None
    if s.window_schedule == "fixed":
        return s.sde_window[0], s.sde_window[1]
    g = torch.Generator().manual_seed(mix_seed(cfg.train.seed, step, 17))
    start = mix_window_start(step, s.num_steps, s.sde_window[1], strategy=s.window_schedule,
                             iters_per_move=s.window_steps, generator=g)
    return start, s.sde_window[1]


def collect_explored(run: Run, step: int) -> Batch:
    """Sol-RL exploration: ``explore.candidates`` trees per prompt previewed by the low-precision policy, K =
    ``explore.keep`` leaves per prompt selected (``explore.select``) and regenerated by the full-precision policy with
    the same seeds and noises (only the root-to-leaf paths of the kept leaves), or, with ``explore.naive``, the
    preview's own kept paths. Processes hold whole prompts, so selection needs no communication."""
    cfg, e, s = run.cfg, run.cfg.explore, run.cfg.sampler
    all_prompts, first, prompts, seeds = _step_trees(run, step, e.candidates)
    ode = e.preview == "ode"
    pre = preview(run.explorer, run.rewards, cfg.rewards, prompts, seeds, e.candidates, schedule=run.schedule,
                  sigmas=run.sigmas, rollout_options=_rollout_options(run, step), guidance=s.guidance_scale,
                  ode_steps=(e.preview_steps or s.num_steps) if ode else None, max_batch=run.minibatch,
                  timeout=cfg.train.reward_timeout_s)
    g = torch.Generator().manual_seed(mix_seed(cfg.train.seed, step, 13, first))
    picks = select_candidates(pre.rewards, e.keep, e.select, g)
    kept = kept_leaves(picks, e.candidates, run.schedule.num_leaves)
    nodes = keep_paths(run.schedule, kept)
    t0 = time.perf_counter()
    if e.naive:
        ro = restrict(pre.rollout, nodes, run.schedule)
    else:
        with torch.no_grad():
            ro = tree_rollout(_velocity(run, s.guidance_scale), run.schedule, run.sigmas, seeds,
                              run.adapter.latent_shape, cond=run.adapter.encode(prompts), max_batch=run.minibatch,
                              device=run.adapter.device, keep=None if bool(kept.all()) else nodes,
                              **_rollout_options(run, step))
    if ro.kept is None:
        ro.kept = kept
    with torch.no_grad():
        images = run.adapter.decode(ro.leaves[kept.to(ro.leaves.device)])
    return Batch(prompts=prompts, all_prompts=all_prompts, first_tree=first, rollout=ro, images=images,
                 rollout_s=time.perf_counter() - t0, preview_rewards=pre.rewards.gather(1, picks),
                 explore_s=pre.seconds, num_previewed=pre.leaves)


def score(run: Run, batch: Batch) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Leaf rewards ``[trees, leaves]`` of every process's trees (the weighted sum of the rewards), validity,
    and the raw scores ``{name: [trees * leaves]}``; each process scores its own leaves (or collects its chunks'
    background scores), then the rewards are gathered."""
    if batch.pending_scores:
        done = [f.result() for f in batch.pending_scores]
        scores = {k: torch.cat([d[0][k] for d in done]) for k in run.rewards}
        valid = check_valid(torch.cat([d[1] for d in done]), run.rewards)
        dev = batch.rollout.leaves.device
        scores, valid = {k: gather_rows(v).to(dev) for k, v in scores.items()}, gather_rows(valid).to(dev)
    else:
        scores, valid = leaf_scores(run, batch, run.rewards)
    total = sum(w * scores[k] for k, w in run.cfg.rewards.items())
    shape = (len(batch.all_prompts), run.schedule.num_leaves)
    return total.reshape(shape), valid.reshape(shape), scores


def leaf_scores(run: Run, batch: Batch, rewards: dict[str, Callable]) -> tuple[dict[str, Tensor], Tensor]:
    """``rewards`` on the batch's media: ``{name: [trees * leaves]}`` and validity ``[trees * leaves]`` of every
    process's leaves (each process scores its own, then they are gathered); with exploration only the regenerated
    leaves have media, the others are invalid."""
    leaf_prompts = [p for p in batch.prompts for _ in range(run.schedule.num_leaves)]
    timeout = run.cfg.train.reward_timeout_s
    if batch.rollout.kept is not None:  # only the regenerated leaves have media
        idx = batch.rollout.kept.flatten().nonzero().flatten()
        sub, ok = score_batch(rewards, batch.images, [leaf_prompts[i] for i in idx], timeout)
        scores = {k: torch.zeros(len(leaf_prompts)).index_copy_(0, idx, v) for k, v in sub.items()}
        valid = torch.zeros(len(leaf_prompts), dtype=torch.bool).index_copy_(0, idx, ok)
    else:
        scores, valid = score_batch(rewards, batch.images, leaf_prompts, timeout)
    dev = batch.rollout.leaves.device  # the advantage math runs where the transitions it indexes live
    return {k: gather_rows(v).to(dev) for k, v in scores.items()}, gather_rows(valid).to(dev)


def _prompt_groups(prompts: list[str], device: torch.device) -> Tensor:
    """``[len(prompts)]`` group ids on ``device``: equal prompts share one, numbered in order of appearance."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(p, len(ids)) for p in prompts], device=device)


def advantage(run: Run, batch: Batch, leaf_r: Tensor, valid: Tensor, step: int,
              scores: dict[str, Tensor]) -> tuple[Union[Tensor, dict[str, Tensor]], Tensor]:
    """What this process trains and with which advantages, for ``Objective.update``: per-edge advantages ``[E]``
    and the edges to train ``[E]`` bool, or for a per-leaf objective (``Objective.per_leaf``: nft, awm) per-leaf
    advantages ``[trees, leaves]`` of this process's trees and the leaves to train (the valid ones); with
    ``train.reward_routing``, one advantage tensor per stream (OmniNFT routing).

    The per-reward scores ``{name: [trees * leaves]}`` become leaf values (``advantages.AGGREGATIONS``, by
    ``train.reward_aggregation``), then node advantages (``advantages.ESTIMATORS``, by ``train.advantage``; the
    tree estimator fuses nodes by ``train.tree_fusion``). Edges that lead only to invalid leaves (a reward failed)
    are not trained; ``train.pruning`` drops more edges from the gradient.
    """
    cfg, sched, tr = run.cfg, run.schedule, batch.rollout.transitions
    groups = _prompt_groups(batch.all_prompts, leaf_r.device)
    per_leaf = {k: v.reshape(leaf_r.shape) for k, v in scores.items()}
    trees = Trees(sched, cfg.train.tree_fusion, _edge_log_probs(run, batch, leaf_r.device))
    kw = {"aggregation": cfg.train.reward_aggregation, "estimator": cfg.train.advantage}
    if cfg.train.reward_routing:
        node_adv = routed_advantages(per_leaf, cfg.rewards, valid, groups, trees, cfg.train.reward_routing, **kw)
    else:
        node_adv = {"": node_advantages(per_leaf, cfg.rewards, valid, groups, trees, **kw)}
    if cfg.log.save_advantages and run.rank == 0:
        save_file({f"node_advantages{'_' + k if k else ''}": a.cpu().contiguous() for k, a in node_adv.items()},
                  str(run.out / f"advantages_step{step + 1:05d}.safetensors"))
    mine = batch.first_tree + torch.arange(len(batch.prompts), device=leaf_r.device)  # this process's trees
    if objective(cfg.train.objective).per_leaf:
        adv = {k: clip_advantages(a[:, sched.leaves][mine], cfg.train.adv_clip) for k, a in node_adv.items()}
        return adv.get("", adv), valid[mine]
    rows = batch.first_tree + tr.tree
    reaches_valid = (valid.float() @ sched.leaf_matrix.to(valid.device).float().T) > 0
    ranked = fill_invalid(leaf_r, valid, groups[:, None].expand_as(leaf_r))[mine]  # width pruning's ranking
    mask = _train_mask(run, batch, step) & reaches_valid[rows, tr.child] & _pruning_mask(run, batch, ranked, step)
    adv = {k: clip_advantages(a[rows, tr.child], cfg.train.adv_clip) for k, a in node_adv.items()}
    return adv.get("", adv), mask


def _edge_log_probs(run: Run, batch: Batch, device: torch.device) -> Optional[Tensor]:
    """``[trees, nodes]`` every node's log-prob given its parent, gathered from every process, for
    ``train.tree_fusion: path_prob``; None otherwise."""
    if run.cfg.train.tree_fusion != "path_prob":
        return None
    tr = batch.rollout.transitions
    local = torch.zeros(len(batch.prompts), run.schedule.num_nodes, device=device)
    local[tr.tree, tr.child] = tr.log_prob.to(device)
    return gather_rows(local)


def _pruning_mask(run: Run, batch: Batch, local_values: Tensor, step: int) -> Tensor:
    """``[E]`` bool, the edges ``train.pruning`` keeps in the gradient (BranchGRPO; rollouts unchanged): width
    pruning ranks each last split's sibling chains (or a tree's leaves) by their leaves' weighted rewards
    ``[trees, leaves]`` of this process, depth pruning drops the edges into the given child depths (a window
    sliding towards ``depth_stop`` every ``depth_interval`` steps); both only while step < ``until`` x
    ``train.steps``."""
    p, tr = run.cfg.train.pruning, batch.rollout.transitions
    keep = torch.ones(len(tr.step), dtype=torch.bool, device=tr.step.device)
    if step >= p.until * run.cfg.train.steps:
        return keep
    if p.width is not None:
        keep &= width_prune_mask(run.schedule, tr.step.cpu(), tr.child.cpu(), tr.tree.cpu(), local_values.cpu(),
                                 p.width_ratio, p.width).to(keep.device)
    if p.depths:
        stop = p.depth_stop if p.depth_stop is not None else (run.schedule.split_steps or [0])[-1] + 1
        keep &= depth_prune_mask(tr.depth.cpu(), p.depths, step, p.depth_interval, stop).to(keep.device)
    return keep


def _train_mask(run: Run, batch: Batch, step: int) -> Tensor:
    s = run.cfg.sampler
    window = sde_window(run.cfg, step)
    steps = window_mask(s.num_steps, *window) if window else torch.ones(s.num_steps, dtype=torch.bool)
    if s.timestep_fraction < 1:
        g = torch.Generator().manual_seed(mix_seed(run.cfg.train.seed, step, 11))
        steps = subsample_steps(steps, s.timestep_fraction, g)
    return trained_edges(batch.rollout.transitions, steps)


def sample_images(run: Run, prompts: list[str], seed: int, reference: bool = False) -> Union[Tensor, dict]:
    """The evaluation sampler: deterministic, ``sampler.eval_steps`` steps, the rollout CFG. With several processes
    (DDP or FSDP), every process samples its share of the prompts and gets all the media (``sample_shared``)."""
    s = run.cfg.sampler
    return sample_shared(run.adapter, prompts, seed, s.eval_steps, s.guidance_scale, run.minibatch, reference,
                         rank=run.rank, world=run.world)


def evaluate(run: Run, reference: bool = False) -> dict[str, float]:
    """Held-out accuracy of ``data.eval_seeds`` samples per held-out prompt, scored by the run's evaluator
    (``diffrl.evaluation``: the shapes verifier's strict score per kind, or a reward's mean), and the guard rewards'
    values on the same samples (``guard_<name>``). Every process samples its share (``sample_images``); the first
    one scores them all, once (a remote evaluator is not called N times), and every process gets its result."""
    prompts = run.eval_prompts * run.cfg.data.eval_seeds  # sample i has its own seed, so repeats are new samples
    media = sample_images(run, prompts, seed=EVAL_SEED, reference=reference)

    def score() -> dict[str, float]:
        result = {k: float(v) for k, v in run.evaluator(media, prompts).items()}
        if run.guards is not None:
            result.update(Guards.metrics(run.guards.score(media, prompts, run.cfg.train.reward_timeout_s)))
        return result

    return from_first_process(first_process_runs(score))


def grid_path(run: Run, step: int) -> Path:
    """Where the sample grid of RL step ``step`` is written."""
    return run.out / f"samples_step{step:05d}.png"


def write_grid(run: Run, state: TrainState) -> None:
    """The sample grid of the first ``GRID_PROMPTS`` held-out prompts (fixed seeds), written and tracked by the
    first process."""
    prompts = run.eval_prompts[:GRID_PROMPTS]
    images = stills(sample_images(run, prompts, seed=4242))
    if run.rank == 0:
        image_grid(images, grid_path(run, state.step), ncol=len(prompts), captions=prompts)
        run.tracker.log_image("samples", grid_path(run, state.step), state.step)


def log_step(run: Run, state: TrainState, metrics: dict) -> None:
    """Append the step's metrics to the history and ``metrics.jsonl``, and its numbers to the trackers."""
    state.history.append(metrics)
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
    run.tracker.log_scalars(scalars, metrics["step"])


def guard_acts(run: Run) -> bool:
    """Whether a guard may stop or roll back the run (``train.guard.action`` other than warn), so the checkpoints it
    would go back to must exist."""
    return run.guards is not None and run.cfg.train.guard.action != "warn"


def save_checkpoint(run: Run, state: TrainState) -> None:
    """The trained weights, EMA, optimizer, history and guard state, written atomically by the first process;
    sharded (FSDP), every process writes its own shards into the same checkpoint (``torch.distributed.checkpoint``).
    With a guard that stops or rolls back, the checkpoints a stop or a rollback would go back to are kept too."""
    meta = {"history": state.history, "evals": state.evals, "base_accuracy": state.base_accuracy}
    keep: list[int] = []
    if run.guards is not None:
        meta["guards"] = run.guards.state_dict()
        if guard_acts(run):
            keep = [run.guards.alarm.return_step()]
            if run.cfg.log.eval_every > 0:  # what a stop would export (``_export_step``)
                keep += run.guards.alarm.export_steps(state.evals, state.step)
    if run.adapter.sharded:
        checkpoint.save_sharded(run.out, state.step, _sharded_state(run, state.ema), meta, run.rank, keep)
        return
    tensors = {"lora": run.adapter.trained_state_dict()}
    if state.ema is not None:
        tensors["ema"] = state.ema
    if run.rank == 0:
        checkpoint.save(run.out, state.step, tensors, run.optimizer.state_dict(), meta, keep)


def _sharded_state(run: Run, ema: Optional[dict[str, Tensor]]) -> dict:
    """What a sharded checkpoint holds, as DTensors laid out like the parameters: the trained parameters themselves,
    the EMA's shards and the optimizer's sharded state (loading fills these tensors in place)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from diffrl.fsdp import as_sharded

    params = run.adapter.named_trainable_parameters()
    models = torch.nn.ModuleDict(run.adapter.denoisers)  # one module owning every optimized parameter
    out = {"trained": dict(params), "optimizer": get_optimizer_state_dict(models, run.optimizer)}
    if ema is not None:
        out["ema"] = as_sharded(params, ema)
    return out


def restore(run: Run, path: Optional[Path] = None, rewrite_metrics: bool = True) -> TrainState:
    """The state of checkpoint ``path`` (default: the newest in the run directory), its weights loaded; the guards'
    state and rollback multipliers too. metrics.jsonl is rewritten to match it unless ``rewrite_metrics`` is
    False."""
    path = path or checkpoint.latest(run.out)
    if path is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run.out}")
    if run.adapter.sharded:
        ema = run.adapter.trained_state_dict() if run.cfg.train.ema_decay > 0 else None  # filled in place
        template = _sharded_state(run, ema)
        saved = checkpoint.load_sharded(path, template)
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(torch.nn.ModuleDict(run.adapter.denoisers), run.optimizer,
                                 optim_state_dict=template["optimizer"])
    else:
        tensors, opt_state, saved = checkpoint.load(path)
        run.adapter.load_trained_state_dict(tensors["lora"])
        run.optimizer.load_state_dict(opt_state)
        ema = tensors.get("ema") if run.cfg.train.ema_decay > 0 else None  # EMA turned off on resume: none exported
    state = TrainState(step=saved["step"], history=saved["history"], evals=saved["evals"],
                       base_accuracy=saved["base_accuracy"], ema=ema)
    if run.guards is not None and "guards" in saved:
        run.guards.load_state_dict(saved["guards"])
        _apply_guards(run)
    if run.rank == 0 and rewrite_metrics:
        checkpoint.atomic_write_text(run.out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in state.history))
    log.info("resumed from %s (step %d)", path, state.step)
    return state


def train(cfg: Config, out: Optional[str] = None, resume: bool = False,
          on_step: Optional[Callable[[TrainState], None]] = None, overwrite: bool = False,
          allow_config_change: bool = False, command: Optional[str] = None) -> dict:
    """Run RL fine-tuning from a validated config; returns the summary (also written to summary.json).

    Before anything loads, the run directory is checked (``diffrl.rundir``: no other run in it unless ``resume`` or
    ``overwrite``; on resume, the saved config matches unless ``allow_config_change``) and locked while the run
    lives. A non-finite reward, advantage, loss, gradient or weight stops the run (``NonFiniteError``) with
    ``summary.json`` saying so and nothing exported. With several processes every one rolls out and trains its
    share; the first one alone evaluates, logs and writes checkpoints, so the others return an empty summary.
    ``command`` is the command line that started the run, which its model card names (None: from Python).
    """
    t_start = time.perf_counter()
    out_dir = Path(out or cfg.log.out)
    rundir.check_out(out_dir, resume, overwrite)
    changes = rundir.check_resume_config(out_dir, to_dict(cfg), allow_config_change) if resume else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = rundir.RunLock(out_dir)
    if first_process():
        lock.acquire()
    try:
        if overwrite and first_process():
            rundir.remove_run(out_dir)
        run = build(cfg, out_dir)
        run.command = command
        state = begin(run, resume, changes)
        try:
            stopped = loop(run, state, on_step)
        except NonFiniteError as e:
            raise stop_nonfinite(run, state, e, time.perf_counter() - t_start) from None
        summary = finish(run, state, time.perf_counter() - t_start, stopped)
    finally:
        lock.release()
        shutdown()
    return summary


def loop(run: Run, state: TrainState, on_step: Optional[Callable[[TrainState], None]] = None) -> Optional[dict]:
    """The RL steps from ``state.step`` to ``train.steps``, each followed by its logging, evaluation and checkpoint,
    and by the guards' alarm (``on_alarm``). Returns None, or what a guard's stop says (``on_alarm``)."""
    with tqdm(initial=state.step, total=run.cfg.train.steps, desc="RL", disable=run.rank != 0) as bar:
        while state.step < run.cfg.train.steps:
            metrics = train_step(run, state, state.step)
            state.step += 1
            alarm = None
            if run.guards is not None:
                names = run.guards.rewards
                alarm = run.guards.alarm.observe(state.step, {n: (metrics[f"guard_{n}"], metrics[f"guard_{n}_se"])
                                                              for n in names})
            after_step(run, state, metrics)
            if run.rank == 0:
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics.get('kl', 0):.2e}")
            stopped = on_alarm(run, state, alarm) if alarm is not None else None
            if on_step is not None:
                on_step(state)
            if stopped is not None:
                return stopped
            bar.n = state.step
            bar.refresh()
    return None


def _apply_guards(run: Run) -> None:
    """The guards' rolled-back learning rate, KL weight and seed into the config; a new seed draws a new prompt
    stream."""
    seed = run.cfg.train.seed
    apply_guards(run.guards, run.cfg.train)
    if run.cfg.train.seed != seed:
        run.prompts = PromptStream(run.cfg.data.prompts, run.cfg.train.seed,
                                   exclude=run.eval_prompts if run.cfg.data.exclude_eval else ())


def on_alarm(run: Run, state: TrainState, alarm: Alarm) -> Optional[dict]:
    """Act on a guard's alarm by ``train.guard.action`` (every process alike: the guards' values are gathered), with
    the evidence (both curves' recent values) in ``guard_events.jsonl`` and the log. warn: nothing else. stop: the
    checkpoint ``_export_step`` chooses is loaded for export; returns what the summary says. rollback: the newest
    checkpoint at or before the alarm's return step (``diffrl.hacking``) is restored into ``state``, the learning
    rate and KL weight are multiplied by ``lr_factor`` and ``kl_factor``, the seed moves on (new prompts and noises
    for the repeated steps), and training goes on from there (after ``max_rollbacks``, a stop); later alarms return
    no further back than that checkpoint."""
    g, guards = run.cfg.train.guard, run.guards
    action = "stop" if g.action == "rollback" and guards.rollbacks >= g.max_rollbacks else g.action
    recent = {m["step"]: m["reward_mean"] for m in state.history[-2 * g.window:]}
    event = {"step": state.step, "action": action, "guard": alarm.guard, "best": alarm.best,
             "best_step": alarm.best_step, "return_step": alarm.return_step, "current": alarm.current,
             "threshold": alarm.threshold, "units": alarm.units, "guard_values": alarm.recent, "reward_mean": recent}
    stopped = None
    if action == "warn":
        log.warning("%s: training goes on ('train.guard.action' warn)", alarm.sentence())
    else:
        back_to = _export_step(run, state, alarm) if action == "stop" else alarm.return_step
        target = checkpoint.at_or_before(run.out, back_to)
        event["restored"] = target.name
        if action == "stop":
            restored = restore(run, target, rewrite_metrics=False)
            state.ema = restored.ema
            stopped = {"reason": alarm.sentence(), "exported_step": restored.step}
            log.warning("%s: the run stops and exports %s", alarm.sentence(), target.name)
        else:
            counters = guards.rollbacks, guards.lr_scale, guards.kl_scale
            event["abandoned"] = state.history[len(json.loads((target / "state.json").read_text())["history"]):]
            restored = restore(run, target)
            if run.rank == 0:
                checkpoint.remove_after(run.out, target)
            guards.rollbacks, guards.lr_scale, guards.kl_scale = counters
            guards.alarm.floor = restored.step  # a later alarm returns no further back than here
            event["lr"], event["kl_weight"] = guards.rolled_back()
            _apply_guards(run)
            run.collector.after_restore(run)
            state.step, state.history, state.evals, state.ema = (restored.step, restored.history, restored.evals,
                                                                 restored.ema)
            log.warning("%s: rolled back to %s (rollback %d of %d), learning rate %.3g, KL weight %.3g",
                        alarm.sentence(), target.name, guards.rollbacks, g.max_rollbacks, event["lr"],
                        event["kl_weight"])
    if run.rank == 0:
        with open(run.out / "guard_events.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")
    return stopped


def _export_step(run: Run, state: TrainState, alarm: Alarm) -> int:
    """Where a guard's stop exports from (``diffrl.hacking``): the newest evaluated checkpoint the held-out guard
    does not call worse than its best, no further back than a rollback went (checkpoints before it may be pruned),
    or the alarm's return step when the run evaluates only at step 0. Every process holds the same evaluations
    (``evaluate``), so every process makes the same choice."""
    evaluated = None
    if run.cfg.log.eval_every > 0:
        evaluated = export_step(state.evals, alarm.guard, alarm.threshold, alarm.units, state.step,
                                run.guards.alarm.floor)
    return alarm.return_step if evaluated is None else evaluated


def stop_nonfinite(run: Run, state: TrainState, error: NonFiniteError, wall_s: float) -> NonFiniteError:
    """Record in ``summary.json`` that the run stopped at step ``state.step + 1`` on a non-finite value (nothing is
    exported; the last checkpoint is the run's result) and return the one-sentence error to raise."""
    last = checkpoint.latest(run.out)
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
    message = (f"stopped at step {state.step + 1}: {error}; nothing was exported and {where} (lower 'train.lr', "
               "check the rewards' scale and weights)")
    if run.rank == 0:
        summary = {"status": "stopped_nonfinite", "reason": message, "stopped_at_step": state.step + 1,
                   "last_checkpoint": last.name if last else None, "base_accuracy": state.base_accuracy,
                   "steps": state.step, "wall_s": round(wall_s, 1), "evals": state.evals}
        checkpoint.atomic_write_text(run.out / "summary.json", json.dumps(summary, indent=2))
        run.tracker.finish(summary)
    return NonFiniteError(error.quantity, str(error), message)


def begin(run: Run, resume: bool, changes: Optional[dict] = None) -> TrainState:
    """A fresh state (with the base model's held-out accuracy and first sample grid) or the restored one; a resume
    with allowed config ``changes`` (``{key: (old, new)}``) writes the new config and appends the changes to
    ``config_changes.jsonl``."""
    if resume:
        state = restore(run)
        if changes and run.rank == 0:
            log.warning("resuming with a changed config: %s",
                        "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
            checkpoint.atomic_write_text(run.out / "config.yaml", yaml.safe_dump(to_dict(run.cfg), sort_keys=False))
            with open(run.out / "config_changes.jsonl", "a") as f:
                f.write(json.dumps({"step": state.step, "changes": changes}) + "\n")
        run.collector.after_restore(run)
        return state
    state = TrainState()
    if run.rank == 0:
        (run.out / "config.yaml").write_text(yaml.safe_dump(to_dict(run.cfg), sort_keys=False))
        (run.out / "metrics.jsonl").write_text("")
    base = evaluate(run)
    state.base_accuracy = base["accuracy"]
    state.evals.append({"step": 0, **base})
    write_grid(run, state)
    if guard_acts(run):
        save_checkpoint(run, state)  # a drop before the first checkpoint returns to the base model
    return state


def after_step(run: Run, state: TrainState, metrics: dict) -> None:
    """Periodic evaluation, logging, sample grid and checkpoint: every process samples its share of the evaluation
    and the grid; the first one writes (sharded, every process writes its shards of the checkpoint)."""
    log_cfg = run.cfg.log
    evaluated = bool(log_cfg.eval_every) and state.step % log_cfg.eval_every == 0 and state.step < run.cfg.train.steps
    if evaluated:
        with Swap(run.adapter, state.ema):
            state.evals.append({"step": state.step, **evaluate(run)})
        metrics["eval_accuracy"] = state.evals[-1]["accuracy"]
    if run.rank == 0:
        log_step(run, state, metrics)
    if log_cfg.sample_every and state.step % log_cfg.sample_every == 0:
        with Swap(run.adapter, state.ema):
            write_grid(run, state)
    exportable = evaluated and guard_acts(run)  # a stop may export what was evaluated
    if state.step % log_cfg.checkpoint_every == 0 or state.step == run.cfg.train.steps or exportable:
        save_checkpoint(run, state)


def train_step(run: Run, state: TrainState, step: int) -> dict:
    """One RL iteration; returns its metrics."""
    batch = collect(run, step)
    t0 = time.perf_counter()
    leaf_r, valid, scores = score(run, batch)
    check_finite("the weighted reward", leaf_r[valid])
    guard_values = run.guards.values(*leaf_scores(run, batch, run.guards.rewards)) if run.guards else {}
    adv, mask = advantage(run, batch, leaf_r, valid, step, scores)
    check_finite("the advantages", adv)
    lr = set_lr(run, step)
    stats = mean_over_processes(optimize(run, batch, adv, mask, step), STATS, maxima=("ratio_dev",))
    check_finite("the loss statistics", stats)
    ema_update(run, state)
    collected = run.collector.after_update(run, batch, leaf_r)
    r = leaf_r[valid]
    return {"step": step + 1, "reward_mean": float(r.mean()), "reward_std": float(r.std(unbiased=False)),
            "kl": stats.get("kl", 0.0), "clip_frac": stats.get("clip_frac", 0.0), "lr": lr,
            "rollout_s": round(batch.rollout_s, 3), "train_s": round(time.perf_counter() - t0, 3),
            "nfe": batch.rollout.nfe,
            "ratio_mean": stats.get("ratio_mean", 1.0), "approx_kl": stats.get("approx_kl", 0.0),
            "first_ratio_dev": stats.get("ratio_dev", 0.0),
            **({"old_dev": stats["old_dev"]} if "old_dev" in stats else {}),
            "trained_edges": int(mask.sum()), "invalid": run.collector.expected_leaves(run, valid) - int(valid.sum()),
            **({"sde_window": list(window)} if (window := sde_window(run.cfg, step)) else {}),
            **{f"reward_{k}": float(v[valid.flatten()].mean()) for k, v in scores.items()},
            **Guards.metrics(guard_values), **collected}


def _explore_metrics(run: Run, batch: Batch, leaf_r: Tensor) -> dict:
    """Exploration's timings, throughput and preview/regenerated rank agreement (this process's prompts)."""
    local = leaf_r[batch.first_tree : batch.first_tree + len(batch.prompts)].cpu()
    preview = batch.preview_rewards.cpu()
    rho = mean_spearman(preview, local[batch.rollout.kept.cpu()].reshape(preview.shape))
    return {"explore_s": round(batch.explore_s, 3), "regen_s": round(batch.rollout_s, 3),
            "candidates_per_s": round(batch.num_previewed / batch.explore_s, 2),
            "spearman": None if math.isnan(rho) else round(rho, 4)}


def finish(run: Run, state: TrainState, wall_s: float, stopped: Optional[dict] = None) -> dict:
    """Final evaluation, plots, the diffusers-format export (LoRA or transformer) with its model card
    (``diffrl.model_card``), summary.json, and the trackers' summary. The optimizer's state and gradients are dropped
    first (the last checkpoint holds them): their memory goes to the export. ``stopped``: a guard stopped the run
    (``on_alarm``) and the weights loaded are the checkpoint it chose."""
    run.optimizer.zero_grad(set_to_none=True)
    run.optimizer.state.clear()
    with Swap(run.adapter, state.ema):
        result = evaluate(run)
        write_grid(run, state)
    final = result["accuracy"]
    if not state.evals or state.evals[-1]["step"] != state.step:
        state.evals.append({"step": state.step, **result})
    if run.rank != 0 and not run.adapter.sharded:  # it took part in sampling; sharded, in the export's gathers too
        return {}
    exported = Path(run.adapter.export(str(run.out), state.ema))
    if run.rank != 0:
        return {}
    events = run.out / "guard_events.jsonl"
    training_curves(state.history, state.evals, run.out / "curves.png",
                    events=[json.loads(x) for x in events.read_text().splitlines()] if events.is_file() else ())
    summary = {"status": "finished", "base_accuracy": state.base_accuracy, "final_accuracy": final,
               "wall_s": round(wall_s, 1), "steps": state.step, "evals": state.evals}
    if stopped is not None:
        summary.update(status="stopped_by_guard", **stopped)
    if run.guards is not None:
        summary["guard"] = {"rollbacks": run.guards.rollbacks, "lr": run.cfg.train.lr,
                            "kl_weight": run.cfg.train.kl_weight}
    (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_card(exported, to_dict(run.cfg), summary, evaluator=run.evaluator.name, full=run.adapter.full_finetune,
               grid=grid_path(run, state.step), command=run.command)
    run.tracker.finish(summary)
    return summary
