"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for denoisers too large for one process: meta-device models whose
shards are read straight from the safetensors files, sharded checkpoints (``torch.distributed.checkpoint``), and the
collectives that consolidate trained weights once, for export.

No process ever holds a whole denoiser: the model is built on the ``meta`` device, sharded, given memory for its
own shard only (``to_empty``), and each process reads only its rows of each weight (safetensors slices). FSDP2
shards every parameter along dim 0 in ``world`` chunks of ``ceil(d0 / world)`` rows (the last ones shorter or
empty), which is what ``local_rows`` computes.

Plain torch + safetensors; the adapters decide what to shard (``DiffusersAdapter.shard``).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")
"""Attribute names under which the supported denoisers keep their transformer blocks (one FSDP unit each)."""


def shard_module(module: nn.Module, cpu_offload: bool = False, pin_memory: bool = True) -> None:
    """``fully_shard`` every transformer block of ``module`` (one all-gather per block in forward and backward),
    then the module itself (the rest: embeddings, norms, projections). ``cpu_offload``: shards, gradients and the
    optimizer state live in CPU memory (pinned, for GPUs: ``pin_memory``) and go to the device per block."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy(pin_memory=pin_memory) if cpu_offload else OffloadPolicy()
    for attr in BLOCK_LISTS:
        for block in getattr(module, attr, None) or []:
            fully_shard(block, offload_policy=policy)
    fully_shard(module, offload_policy=policy)


def local_part(p: Tensor) -> Tensor:
    """This process's part of a (possibly) sharded tensor: a DTensor's local shard, a plain tensor itself."""
    return p.to_local() if hasattr(p, "to_local") else p


def local_rows(d0: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a ``d0``-row parameter held by ``rank`` (``torch.chunk`` over ``world``)."""
    size = math.ceil(d0 / world) if d0 else 0
    start = min(rank * size, d0)
    return start, min(start + size, d0)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class SafetensorsWeights:
    """Read rows of the tensors of a diffusers model folder (``diffusion_pytorch_model.safetensors`` or its sharded
    form with ``.safetensors.index.json``) without loading whole tensors: each read is one ``pread`` of exactly the
    rows' bytes (the safetensors layout is a JSON header, then each tensor's bytes, row-major), so a process's
    memory holds its own rows only (a memory-mapped file would count every page it touched as resident too)."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors weights in {folder}")
        self._meta: dict[str, tuple[Path, torch.dtype, list[int], int]] = {}
        for f in files:
            with open(f, "rb") as h:
                n = int.from_bytes(h.read(8), "little")
                header = json.loads(h.read(n))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                self._meta[key] = (f, _DTYPES[info["dtype"]], info["shape"], 8 + n + info["data_offsets"][0])
        self._fds: dict[Path, int] = {}

    def keys(self) -> Iterable[str]:
        return self._meta.keys()

    def rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` (dim 0) of tensor ``key``, in its stored dtype; a 0-dim tensor whole."""
        f, dtype, shape, offset = self._meta[key]
        if not shape:
            start, stop, row_shape = 0, 1, []
        else:
            row_shape = shape[1:]
        row_bytes = math.prod(row_shape) * dtype.itemsize
        if f not in self._fds:
            self._fds[f] = os.open(f, os.O_RDONLY)
        data = bytearray(max(stop - start, 0) * row_bytes)
        if data:
            got = os.preadv(self._fds[f], [data], offset + start * row_bytes)
            if got != len(data):
                raise OSError(f"{f}: short read of {key!r} ({got} of {len(data)} bytes)")
        out = torch.frombuffer(data, dtype=torch.uint8).view(dtype) if data else torch.empty(0, dtype=dtype)
        return out.reshape(shape) if not shape else out.reshape(stop - start, *row_shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def materialize(module: nn.Module, device: torch.device, weights: SafetensorsWeights,
                buffers: dict[str, Tensor], lora_rank: Optional[int]) -> None:
    """Give a sharded meta-device ``module`` memory for its own shards on ``device`` and fill them: base weights
    from ``weights`` (a LoRA-wrapped layer's ``base_layer`` reads the plain layer's key), buffers from ``buffers``
    (kept real while the parameters were on meta), and the LoRA as ``lora_init`` draws it (this process's rows)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    lora = lora_init(module, lora_rank) if lora_rank else {}
    module.to_empty(device=device)
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in buffers:
                buf.copy_(buffers[name])
        for name, p in module.named_parameters():
            local = local_part(p)
            start, stop = local_rows(p.shape[0], rank, world) if p.dim() else (0, 0)
            if name in lora:
                local.copy_(lora[name][start:stop])
            else:
                key = name.replace(".base_layer.", ".")
                if key not in weights.keys():
                    raise KeyError(f"parameter {key!r} is not in the checkpoint")
                local.copy_(weights.rows(key, start, stop))


def lora_init(module: nn.Module, lora_rank: int) -> dict[str, Tensor]:
    """Whole LoRA weights ``{parameter name: tensor}`` of a meta-device ``module``, drawn from the global CPU
    generator exactly as peft draws them when it attaches the adapters to a real model (so a sharded run starts
    from the LoRA an unsharded one would): per LoRA layer in module order, ``nn.Linear``'s default init of ``A``
    ``[r, in]`` and ``B`` ``[out, r]`` (two uniform draws), then peft's gaussian init, ``A ~ N(0, 1/r^2)``,
    ``B = 0``."""
    out = {}
    for qual, m in module.named_modules():
        lora_a, lora_b = getattr(m, "lora_A", None), getattr(m, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict):
            continue
        for adapter in lora_a:
            a, b = lora_a[adapter].weight, lora_b[adapter].weight
            torch.empty(a.shape).uniform_()
            torch.empty(b.shape).uniform_()
            out[f"{qual}.lora_A.{adapter}.weight"] = torch.empty(a.shape).normal_(std=1 / lora_rank)
            out[f"{qual}.lora_B.{adapter}.weight"] = torch.zeros(b.shape)
    return out


def trained_local(params: Iterable[tuple[str, nn.Parameter]]) -> dict[str, Tensor]:
    """This process's shard of each trained parameter (copies, keyed by parameter name): no communication."""
    return {name: local_part(p).detach().clone() for name, p in params}


def load_local(params: Iterable[tuple[str, nn.Parameter]], state: dict[str, Tensor]) -> None:
    """Copy ``trained_local`` shards back into the parameters."""
    with torch.no_grad():
        for name, p in params:
            local_part(p).copy_(state[name])


def full_tensors(params: Iterable[tuple[str, nn.Parameter]]) -> Iterator[tuple[str, Tensor]]:
    """Each sharded parameter gathered whole, on the CPU, one at a time (a collective: every process iterates)."""
    for name, p in params:
        yield name, (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()


EXPORT_SHARD_BYTES = 2**30
"""Largest safetensors file ``save_full`` writes (diffusers reads the sharded layout through its index)."""


def save_full(module: nn.Module, folder: Path, stem: str, max_bytes: int = EXPORT_SHARD_BYTES) -> None:
    """Write the whole state dict of sharded ``module`` (a collective; the first process writes) as
    ``folder/<stem>.safetensors``, or past ``max_bytes`` as ``<stem>-0000i-of-0000n.safetensors`` files with
    ``<stem>.safetensors.index.json``, the layout ``save_pretrained`` writes. Each parameter is gathered alone and
    dropped once its file is written: the first process holds at most one file's tensors."""
    from safetensors.torch import save_file

    rank, folder = dist.get_rank(), Path(folder)
    written: list[tuple[Path, list[str]]] = []
    pending: dict[str, Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal pending, size, total
        total += size
        if pending:
            path = folder / f".part-{len(written):05d}.safetensors"
            save_file(pending, str(path))
            written.append((path, list(pending)))
        pending, size = {}, 0

    for key, value in module.state_dict().items():
        full = (value.full_tensor() if hasattr(value, "full_tensor") else value).detach()
        if rank != 0:
            continue
        pending[key] = full.cpu().contiguous()
        size += full.numel() * full.element_size()
        if size >= max_bytes:
            flush()
    if rank != 0:
        return
    flush()
    if len(written) == 1:
        written[0][0].replace(folder / f"{stem}.safetensors")
        return
    weight_map = {}
    for i, (path, keys) in enumerate(written):
        name = f"{stem}-{i + 1:05d}-of-{len(written):05d}.safetensors"
        path.replace(folder / name)
        weight_map.update({k: name for k in keys})
    (folder / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def as_sharded(params: Iterable[tuple[str, nn.Parameter]], state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``trained_local`` shards wrapped as DTensors laid out like their parameters (what a sharded checkpoint
    stores: each process writes its own rows)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in params:
        if hasattr(p, "device_mesh"):
            out[name] = DTensor.from_local(state[name], p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                           run_check=False)
        else:
            out[name] = state[name]
    return out
