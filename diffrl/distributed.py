"""Multi-process training (``accelerate launch`` / ``torchrun``): prompts are sharded, rewards gathered.

The launchers set ``WORLD_SIZE``/``RANK``/``MASTER_ADDR``; ``setup`` joins the process group (gloo on CPU, nccl on
CUDA). With one process every function here is a no-op, so the single-process path has no distributed code in it.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def setup(device: str) -> tuple[int, int]:
    """(rank, world size), joining the process group when launched with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather_rows(t: Tensor) -> Tensor:
    """Concatenate every process's ``[n, ...]`` tensor (same shape everywhere) along dim 0, in rank order."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of the gradients over processes (each process's loss is a mean over its own edges; a process with no
    edges in this update contributes zeros, so every process reduces the same tensors)."""
    if not dist.is_initialized():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
