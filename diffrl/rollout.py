"""The rollout engine: advance every active node of every tree together, one denoising step at a time.

It only needs a velocity function over a batch, so the same code serves a toy field, a tiny model and a 12B
transformer (adapters wrap their model as such a function). Flat GRPO is ``TreeSchedule(T)`` with G tree seeds.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from diffrl.sde import SDE_KINDS, sde_step
from diffrl.seeding import step_noise
from diffrl.tree import TreeSchedule
from diffrl.types import Transitions, TreeRollout

VelocityFn = Callable[..., Tensor]
"""``velocity(x [n, ...], sigma [n])`` or, when the rollout is given ``cond``, ``velocity(x, sigma, cond_rows)``
where ``cond_rows`` is ``cond`` indexed by each row's tree (a tensor, or a dict of tensors indexed alike)."""


def _index_cond(cond: Any, rows: Tensor) -> Any:
    if isinstance(cond, dict):
        return {k: _index_cond(v, rows) for k, v in cond.items()}
    return cond[rows.to(cond.device)] if isinstance(cond, Tensor) else [cond[i] for i in rows.tolist()]


def evaluate_velocity(
    velocity: VelocityFn, x: Tensor, sigma: Tensor, tree: Tensor, cond: Any = None, max_batch: Optional[int] = None
) -> Tensor:
    """Call ``velocity`` on ``x [n, ...]`` in chunks of at most ``max_batch`` rows; returns ``[n, ...]``."""
    size = max_batch or x.shape[0]
    outs = []
    for i in range(0, x.shape[0], size):
        sl = slice(i, i + size)
        args = (x[sl], sigma[sl]) if cond is None else (x[sl], sigma[sl], _index_cond(cond, tree[sl]))
        outs.append(velocity(*args))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def tree_rollout(
    velocity: VelocityFn,
    schedule: TreeSchedule,
    sigmas: Tensor,
    tree_seeds: Sequence[int],
    latent_shape: Sequence[int],
    *,
    kind: str = "flow",
    noise_level: float = 0.7,
    split_noise_scale: float = 1.0,
    sde_steps: Optional[Tensor] = None,
    cond: Any = None,
    max_batch: Optional[int] = None,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
    keep: Optional[Tensor] = None,
) -> TreeRollout:
    """Roll out ``len(tree_seeds)`` trees of ``schedule`` through ``velocity`` and record every edge.

    sigmas: ``[T + 1]`` from 1 to 0. latent_shape: one latent without the batch dim. sde_steps: ``[T]`` bool, the
    stochastic steps (default all); the others are ODE steps and must not be split steps. split_noise_scale: the
    std multiplier lambda at split steps (the child's log-prob uses the scaled std). All trees advance together:
    step ``k`` makes one batched call over the ``n_trees * A_k`` active nodes, so each shared prefix is computed once.
    Noise comes from ``step_noise(seed, k, ...)``: the same seeds reproduce the same tree.
    keep: ``[n_trees, N]`` bool, the nodes to compute (closed under parents, e.g. ``keep_paths``): only their edges
    are evaluated and recorded, each with exactly the noise it has in the whole tree (regeneration of selected
    paths); the leaves not kept are zeros and ``TreeRollout.kept`` says which are real.
    """
    T = schedule.num_steps
    if sigmas.shape != (T + 1,):
        raise ValueError(f"sigmas must have shape ({T + 1},) for {T} steps, got {tuple(sigmas.shape)}")
    if kind not in SDE_KINDS:
        raise ValueError(f"unknown SDE kind {kind!r}; choose one of {SDE_KINDS}")
    sde = torch.ones(T, dtype=torch.bool) if sde_steps is None else sde_steps.bool().cpu()
    if kind == "ode":
        sde = torch.zeros(T, dtype=torch.bool)
    bad = [s for s in schedule.split_steps if not sde[s]]
    if bad:
        raise ValueError(f"split steps {bad} are deterministic (ODE) steps: branching there makes identical children")
    n_trees = len(tree_seeds)
    nodes = None if keep is None else keep.bool().cpu()
    if nodes is not None and (nodes.shape != (n_trees, schedule.num_nodes) or not nodes[:, 0].any()):
        raise ValueError(f"keep must be [{n_trees}, {schedule.num_nodes}] bool with at least one root kept")
    shape = tuple(latent_shape)
    tree = torch.arange(n_trees) if nodes is None else nodes[:, 0].nonzero().flatten()  # the tree of each row
    pos = torch.zeros(len(tree), dtype=torch.long)  # each row's position among its step's active nodes
    x = torch.cat([step_noise(tree_seeds[t], -1, 1, shape) for t in tree.tolist()]).to(device=device, dtype=dtype)
    n_edges = n_trees * (schedule.num_nodes - 1) if nodes is None else int(nodes[:, 1:].sum())
    # Latent-sized records go straight into preallocated buffers: no per-step tensors kept alive, no final cat.
    big = {"x": x.new_empty((n_edges, *shape)), "x_next": x.new_empty((n_edges, *shape)),
           "mean": torch.empty((n_edges, *shape), device=x.device, dtype=torch.float32)}
    records: list[dict[str, Tensor]] = []
    nfe = row = 0
    for k in range(T):
        a_k, b = len(schedule.step_nodes[k]), schedule.branch[k]
        sigma = sigmas[k].expand(x.shape[0]).to(x.device, torch.float32)
        v = evaluate_velocity(velocity, x, sigma, tree, cond, max_batch)
        nfe += x.shape[0]
        # Children: b per row, at positions pos * b + j among the step's created nodes.
        child_tree = tree.repeat_interleave(b)
        child_pos = pos.repeat_interleave(b) * b + torch.arange(b).repeat(len(pos))
        child = schedule.step_children[k][child_pos]
        sel = None if nodes is None else nodes[child_tree, child].nonzero().flatten()
        if b > 1:
            x, v, sigma = x.repeat_interleave(b, 0), v.repeat_interleave(b, 0), sigma.repeat_interleave(b)
        if sel is not None and len(sel) < len(child):
            idx = sel.to(x.device)
            x, v, sigma = x[idx], v[idx], sigma[idx]
            child_tree, child_pos, child = child_tree[sel], child_pos[sel], child[sel]
        sigma_next = sigmas[k + 1].expand(x.shape[0]).to(x.device, torch.float32)
        scale = split_noise_scale if b > 1 else 1.0
        step_kind = kind if sde[k] else "ode"
        noise = None
        if step_kind != "ode":
            rows = child_tree * (a_k * b) + child_pos
            noise = torch.cat([step_noise(s, k, a_k * b, shape) for s in tree_seeds])[rows].to(x.device)
        out = sde_step(x, v, sigma, sigma_next, kind=step_kind, noise_level=noise_level, noise=noise,
                       noise_scale=scale)
        rows = slice(row, row + x.shape[0])
        big["x"][rows], big["x_next"][rows], big["mean"][rows] = x, out.x_next, out.mean
        records.append(_edge_record(schedule, k, out, sigma, sigma_next, scale, child_tree, child))
        x, row, tree, pos = big["x_next"][rows], rows.stop, child_tree, child_pos
    small = {f: torch.cat([r[f] for r in records]) for f in records[0]}
    transitions = Transitions(**big, **small)
    if nodes is None:
        return TreeRollout(leaves=x.reshape(n_trees, schedule.num_leaves, *shape), leaf_ids=schedule.leaves.clone(),
                           transitions=transitions, nfe=nfe)
    leaves = x.new_zeros((n_trees, schedule.num_leaves, *shape))
    leaves[tree.to(x.device), pos.to(x.device)] = x
    return TreeRollout(leaves=leaves, leaf_ids=schedule.leaves.clone(), transitions=transitions, nfe=nfe,
                       kept=nodes[:, schedule.leaves])


def keep_paths(schedule: TreeSchedule, kept_leaves: Tensor) -> Tensor:
    """``[n_trees, L]`` bool leaves -> ``[n_trees, N]`` bool nodes on their root-to-leaf paths (what regenerating
    those leaves computes)."""
    return (kept_leaves.float() @ schedule.leaf_matrix.float().T) > 0


def _edge_record(schedule: TreeSchedule, k: int, out, sigma: Tensor, sigma_next: Tensor, scale: float,
                 tree: Tensor, child: Tensor) -> dict[str, Tensor]:
    """The per-edge scalar ``Transitions`` fields of the edges created at step ``k`` (``tree``, ``child``: ``[n]``)."""
    n, dev = sigma.shape[0], sigma.device
    log_prob = out.log_prob if out.log_prob is not None else torch.zeros(n, device=dev)
    return dict(
        std=out.std, log_prob=log_prob, sigma=sigma, sigma_next=sigma_next,
        step=torch.full((n,), k, dtype=torch.long, device=dev),
        depth=torch.full((n,), k + 1, dtype=torch.long, device=dev),
        tree=tree.to(dev), parent=schedule.parent[child].to(dev),
        child=child.to(dev), noise_scale=torch.full((n,), scale, device=dev), stochastic=out.std > 0,
    )


def trained_edges(transitions: Transitions, train_steps: Optional[Tensor] = None) -> Tensor:
    """``[E]`` bool: stochastic edges whose step is in ``train_steps`` (``[T]`` bool; all steps when None)."""
    mask = transitions.stochastic.clone()
    if train_steps is not None:
        mask &= train_steps.bool().to(mask.device)[transitions.step]
    return mask


def concat_rollouts(parts: Sequence[TreeRollout]) -> TreeRollout:
    """Rollouts of consecutive chunks of trees as one rollout: tree indices renumbered in chunk order.

    parts[i].leaves ``[T_i, L, ...]`` -> leaves ``[sum T_i, L, ...]``; transitions concatenated; NFE summed.
    """
    offset, transitions = 0, []
    for part in parts:
        t = part.transitions
        transitions.append(dataclasses.replace(t, tree=t.tree + offset))
        offset += part.leaves.shape[0]
    merged = Transitions(**{f.name: torch.cat([getattr(t, f.name) for t in transitions])
                            for f in dataclasses.fields(Transitions)})
    kept = None
    if any(p.kept is not None for p in parts):
        kept = torch.cat([p.kept if p.kept is not None else torch.ones(p.leaves.shape[:2], dtype=torch.bool)
                          for p in parts])
    return TreeRollout(leaves=torch.cat([p.leaves for p in parts]), leaf_ids=parts[0].leaf_ids,
                       transitions=merged, nfe=sum(p.nfe for p in parts), kept=kept)
