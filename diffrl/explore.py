"""Low-precision exploration with exact regeneration (Sol-RL, arXiv 2604.06916), for every adapter.

A copy of the policy with its LoRA merged in runs on the FP8 / FP4 grid (``diffrl.quant``: emulated anywhere, torchao
on GPUs that have the GEMMs). It previews many candidates per prompt cheaply; ``select_candidates`` keeps K per
prompt; the full-precision policy then regenerates exactly those (same initial noise, same per-step noises: for a
tree only the root-to-leaf paths of the kept leaves), and only the regenerated ones are trained on.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from diffrl.quant import choose_path, emulate_low_precision, quantizable
from diffrl.rollout import tree_rollout
from diffrl.scoring import score_samples
from diffrl.tree import TreeSchedule
from diffrl.types import TreeRollout

log = logging.getLogger("diffrl")


class LowPrecisionPolicy:
    """The exploration copy of an adapter's policy: its denoisers with the LoRA merged in, on the ``fmt`` grid.

    fmt: fp8, fp8_tensor, nvfp4 or mxfp4. backend: auto, emulated or native (``quant.choose_path``).
    skip / min_dim: linear layers kept in the model's precision (name substrings; max(d_in, d_out) <= min_dim).
    ``path`` and ``reason`` say which implementation runs and why; ``refresh()`` re-quantizes from the current
    policy after an update.
    """

    def __init__(self, adapter: Any, fmt: str, backend: str = "auto", skip: Sequence[str] = (), min_dim: int = 0):
        self.adapter, self.fmt, self.skip, self.min_dim = adapter, fmt, tuple(skip), min_dim
        dev = adapter.device
        cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
        has_torchao = importlib.util.find_spec("torchao") is not None
        self.path, self.reason = choose_path(fmt, backend, str(dev), cap, has_torchao, adapter.dtype)
        log.info("exploration policy: %s, %s path (%s)", fmt, self.path, self.reason)
        t0 = time.perf_counter()
        self.copies = self._build()
        self.build_s = time.perf_counter() - t0

    def _build(self) -> dict[str, torch.nn.Module]:
        """Merged copies of the denoisers, quantized; ``self.quantized``: per denoiser, the low-precision layers."""
        copies = self.adapter.merged_copies()
        quantize = emulate_low_precision if self.path == "emulated" else _torchao_quantize
        self.quantized = {name: quantize(model, self.fmt, self.skip, self.min_dim) for name, model in copies.items()}
        return copies

    @torch.no_grad()
    def refresh(self) -> float:
        """Bring the copy up to the current policy; returns the seconds it took. Emulated LoRA: the LoRA-carrying
        layers are re-merged and re-quantized in place; full fine-tuning (every weight moved) or native (torchao
        tensors are not updated in place): the copy is rebuilt."""
        t0 = time.perf_counter()
        if self.path == "emulated" and not self.adapter.full_finetune:
            for name, weights in self.adapter.merged_weights().items():
                for qual, w in weights.items():
                    layer = self.copies[name].get_submodule(qual)
                    if hasattr(layer, "set_weight"):
                        layer.set_weight(w)
                    else:
                        layer.weight.copy_(w)
        else:
            self.copies = self._build()
        return time.perf_counter() - t0

    def velocity(self, guidance: float) -> Callable:
        """``velocity(x, sigma, cond)`` of the low-precision policy (the rollout engine's signature)."""
        def fn(x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
            with self.adapter.using_denoisers(self.copies):
                return self.adapter.velocity(x, sigma, cond, guidance)
        return fn


def _torchao_quantize(model: torch.nn.Module, fmt: str, skip: Sequence[str], min_dim: int) -> list[str]:
    """torchao's dynamic-activation low-precision linear layers (FP8 per-row or per-tensor on compute capability
    8.9+, NVFP4 / MXFP4 on 10.0+) on the quantizable layers of ``model``; returns their names."""
    from torchao.quantization import quantize_

    if fmt in ("fp8", "fp8_tensor"):
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor

        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow() if fmt == "fp8" else PerTensor())
    elif fmt == "nvfp4":
        from torchao.prototype.mx_formats import NVFP4DynamicActivationNVFP4WeightConfig

        config = NVFP4DynamicActivationNVFP4WeightConfig()
    else:
        from torchao.prototype.mx_formats import MXDynamicActivationMXWeightConfig

        config = MXDynamicActivationMXWeightConfig(activation_dtype=torch.float4_e2m1fn_x2,
                                                   weight_dtype=torch.float4_e2m1fn_x2)
    names = [n for n, m in model.named_modules() if quantizable(n, m, skip, min_dim)]
    quantize_(model, config, filter_fn=lambda m, fqn: quantizable(fqn, m, skip, min_dim))
    return names


@dataclass
class Preview:
    """What exploration saw: ``rewards`` ``[P, N * L]`` weighted preview reward of every candidate leaf of each
    prompt (its N trees' L leaves, tree-major); ``rollout``: the low-precision rollout when it followed the training
    schedule (``preview: rollout``), else None; ``seconds``; ``leaves``: candidates previewed."""

    rewards: Tensor
    rollout: Optional[TreeRollout]
    seconds: float
    leaves: int


def preview(policy: LowPrecisionPolicy, rewards: Mapping[str, Callable], weights: Mapping[str, float],
            prompts: Sequence[str], seeds: Sequence[int], candidates: int, *, schedule: TreeSchedule, sigmas: Tensor,
            rollout_options: dict, guidance: float, ode_steps: Optional[int] = None, max_batch: Optional[int] = None,
            timeout: Optional[float] = None) -> Preview:
    """Roll out one tree per seed with the low-precision policy and score its leaves.

    prompts / seeds: one per tree, each prompt's ``candidates`` trees contiguous. ode_steps: a deterministic Euler
    preview from each tree's initial noise with that many steps (flat schedules only: Sol-RL's draft); None: the
    training ``schedule``, ``sigmas`` and ``rollout_options`` (SDE kind, noise, window), with the same per-step
    noises the regeneration will use. A leaf whose reward fails takes its prompt's mean preview reward.
    """
    t0, ad = time.perf_counter(), policy.adapter
    with torch.no_grad():
        if ode_steps is not None:
            sched, sig, opts = TreeSchedule(ode_steps), ad.sigmas(ode_steps), {"kind": "ode"}
        else:
            sched, sig, opts = schedule, sigmas, rollout_options
        ro = tree_rollout(policy.velocity(guidance), sched, sig, list(seeds), ad.latent_shape,
                          cond=ad.encode(list(prompts)), max_batch=max_batch, device=ad.device, **opts)
        media = ad.decode(ro.leaves.flatten(0, 1))
    leaves = sched.num_leaves
    scores, valid = score_samples(rewards, media, [p for p in prompts for _ in range(leaves)], timeout)
    total = sum(w * scores[k] for k, w in weights.items()).reshape(-1, candidates * leaves)
    valid = valid.reshape(total.shape)
    means = (total * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp_min(1)
    total = torch.where(valid, total, means)
    return Preview(rewards=total, rollout=ro if ode_steps is None else None, seconds=time.perf_counter() - t0,
                   leaves=total.numel())


def kept_leaves(picks: Tensor, candidates: int, leaves: int) -> Tensor:
    """``[P, K]`` picked candidate indices (into each prompt's N * L leaves) -> ``[P * N, L]`` bool kept leaves."""
    p = picks.shape[0]
    kept = torch.zeros(p, candidates * leaves, dtype=torch.bool).scatter_(1, picks, True)
    return kept.reshape(p * candidates, leaves)


def restrict(rollout: TreeRollout, keep_nodes: Tensor, schedule: TreeSchedule) -> TreeRollout:
    """The part of a whole rollout on the kept nodes ``[T, N]`` (the naive baseline trains on the low-precision
    rollout itself): its edges into kept nodes, its kept leaves (the others zeroed)."""
    tr = rollout.transitions
    edges = keep_nodes[tr.tree.cpu(), tr.child.cpu()]
    kept = keep_nodes[:, schedule.leaves]
    leaves = torch.where(kept.to(rollout.leaves.device).reshape(*kept.shape, *[1] * (rollout.leaves.ndim - 2)),
                         rollout.leaves, torch.zeros_like(rollout.leaves))
    return TreeRollout(leaves=leaves, leaf_ids=rollout.leaf_ids, transitions=tr.index(edges.to(tr.tree.device)),
                       nfe=rollout.nfe, kept=kept)
