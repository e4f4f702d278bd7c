"""Multi-process training (``accelerate launch`` / ``torchrun``, one process per GPU, one or several nodes): where
each process runs, the process group, and the few collectives the loop needs.

The launchers set ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``. ``setup`` is the one place that decides a
process's device (``model.device: cuda`` means *this process's* GPU, ``cuda:LOCAL_RANK``) and joins the process group
(NCCL on GPUs, gloo on CPUs). Collectives run on the device the backend needs (NCCL: the process's GPU; gloo: the
CPU) whatever device their input is on, and return on the input's device. With one process every collective is a
no-op, so the single-process path has no distributed code in it.

Global rank 0 alone writes the run directory's files (metrics, summary, exports); sharded checkpoints are written
by every process into the same directory, so on several nodes ``--out`` must be on a filesystem they share.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from diffrl.config import ConfigError

T = TypeVar("T")
_OWNED: list[bool] = []
"""Non-empty while the process group is one ``setup`` created (``shutdown`` leaves only those)."""


@dataclass(frozen=True)
class Placement:
    """Where this process runs: global ``rank`` of ``world`` processes, ``local_rank`` on its node, ``device``."""

    rank: int
    world: int
    local_rank: int
    device: torch.device


def resolve_device(device: str, local_rank: int, world: int, gpus: int) -> torch.device:
    """This process's device for ``model.device``: ``cpu``; ``cuda`` -> ``cuda:<local_rank>``; ``cuda:N`` (one
    process only: several processes each take their own GPU); ``auto`` -> ``cuda`` when a GPU is visible, else the
    CPU. ``gpus``: CUDA devices visible to this process. Raises ``ConfigError`` in one sentence when no such GPU
    exists."""
    kind, _, index = device.partition(":")
    if kind == "auto":
        kind = "cuda" if gpus else "cpu"
    if kind == "cpu" and not index:
        return torch.device("cpu")
    if kind != "cuda":
        raise ConfigError(f"'model.device' must be cpu, cuda, cuda:N or auto, got {device!r}")
    if index and world > 1:
        raise ConfigError(f"'model.device' {device!r} names one GPU, but {world} processes were launched: use "
                          "'cuda' (each process takes the GPU its LOCAL_RANK names)")
    i = int(index) if index else local_rank
    if gpus == 0:
        raise ConfigError(f"'model.device' is {device!r} but no CUDA GPU is visible to this process "
                          "(use 'cpu', or 'auto' to take a GPU when there is one)")
    if i >= gpus:
        raise ConfigError(f"this process wants cuda:{i} (LOCAL_RANK {local_rank}, 'model.device' {device!r}) but only "
                          f"{gpus} GPU(s) are visible: launch at most {gpus} processes per node")
    return torch.device("cuda", i)


def first_process(env: Optional[Mapping[str, str]] = None) -> bool:
    """Whether this is the first process of the run (global ``RANK`` 0, or no launcher), known before the process
    group exists: it alone owns the run directory's lock."""
    return int((os.environ if env is None else env).get("RANK", "0")) == 0


def setup(device: str, env: Optional[Mapping[str, str]] = None) -> Placement:
    """Place this process (``resolve_device`` with ``LOCAL_RANK``), make its GPU the current one, and join the
    process group when several processes were launched (NCCL for GPUs, gloo for CPUs)."""
    env = os.environ if env is None else env
    world, local_rank = int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))
    gpus = torch.cuda.device_count() if device != "cpu" else 0
    dev = resolve_device(device, local_rank, world, gpus)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=dev)
        else:
            dist.init_process_group(backend="gloo")
        _OWNED.append(True)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return Placement(rank=rank, world=world, local_rank=local_rank, device=dev)


def comm_device() -> torch.device:
    """The device collective tensors must live on: this process's GPU under NCCL, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(t: Tensor) -> Tensor:
    """Concatenate every process's ``[n, ...]`` tensor (same shape everywhere) along dim 0, in rank order; the
    result is on ``t``'s device."""
    if not dist.is_initialized():
        return t
    x = t.to(comm_device()).contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts).to(t.device)


def max_over_processes(n: int) -> int:
    """The largest ``n`` over the processes (``n`` itself with one process)."""
    if not dist.is_initialized():
        return n
    t = torch.tensor([n], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def mean_over_processes(stats: dict[str, float], keys: tuple[str, ...],
                        maxima: tuple[str, ...] = ()) -> dict[str, float]:
    """The statistics named in ``keys`` averaged over the processes that have them (those in ``maxima``: their
    largest value), so logged metrics describe every process's share, not the first one's; a key no process has
    stays absent. ``stats`` itself with one process."""
    if not dist.is_initialized():
        return stats
    dev = comm_device()
    have = torch.tensor([k in stats for k in keys], dtype=torch.float64, device=dev)
    total = torch.tensor([float(stats.get(k, 0.0)) for k in keys], dtype=torch.float64, device=dev)
    top = torch.tensor([float(stats.get(k, -math.inf)) for k in keys], dtype=torch.float64, device=dev)
    for t, op in ((have, dist.ReduceOp.SUM), (total, dist.ReduceOp.SUM), (top, dist.ReduceOp.MAX)):
        dist.all_reduce(t, op=op)
    return {k: float(top[i]) if k in maxima else float(total[i] / have[i]) for i, k in enumerate(keys) if have[i] > 0}


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of the gradients over processes (each process's loss is a mean over its own edges; a process with no
    edges in this update contributes zeros, so every process reduces the same tensors)."""
    if not dist.is_initialized():
        return
    dev = comm_device()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = p.grad if p.grad.device == dev else p.grad.to(dev)
        dist.all_reduce(g)
        g /= dist.get_world_size()
        if g is not p.grad:
            p.grad.copy_(g)


def from_first_process(obj: Optional[dict] = None) -> dict:
    """The first process's ``obj`` (a JSON-serialisable dict) on every process: sent as UTF-8 JSON bytes, so nothing
    is unpickled. ``obj`` itself with one process; the other processes' argument is ignored."""
    if not dist.is_initialized():
        return obj
    dev = comm_device()
    data = json.dumps(obj).encode() if dist.get_rank() == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.long, device=dev)
    dist.broadcast(size, src=0)
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev) if dist.get_rank() == 0
           else torch.empty(int(size), dtype=torch.uint8, device=dev))
    dist.broadcast(buf, src=0)
    return json.loads(buf.cpu().numpy().tobytes().decode())


class FirstProcessError(RuntimeError):
    """What every other process raises when work the first process does alone (``first_process_runs``) failed."""


def first_process_runs(fn: Callable[[], T]) -> Optional[T]:
    """``fn()`` on the first process alone (scoring, writing); the others wait for it and get None. If ``fn``
    raises, the first process raises it and every other process raises ``FirstProcessError`` with its first line,
    so none waits on a collective the first process will not reach. ``fn()`` itself with one process."""
    if not dist.is_initialized():
        return fn()
    out, failed = None, None
    if dist.get_rank() == 0:
        try:
            out = fn()
        except Exception as e:
            failed = e
    first_line = (str(failed).splitlines() or [type(failed).__name__])[0] if failed is not None else None
    error = from_first_process({"error": first_line})["error"]
    if failed is not None:
        raise failed
    if error is not None:
        raise FirstProcessError(f"the first process failed: {error}")
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Wait for every process, then leave the process group ``setup`` joined (a group the caller made stays): a
    process that exits with its group alive can abort in the backend's threads."""
    if dist.is_initialized():
        dist.barrier()
        if _OWNED:
            dist.destroy_process_group()
            _OWNED.clear()
