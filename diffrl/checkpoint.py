"""Atomic checkpoints: a run killed at any moment resumes from its last complete checkpoint.

A checkpoint is a folder ``checkpoint-<step>`` holding ``lora.safetensors`` (and ``ema.safetensors``), the optimizer
state (``optimizer.pt``, read back with ``weights_only=True``) and ``state.json`` (step, metrics history, RNG
states); a sharded (FSDP) run's holds ``sharded/`` (``torch.distributed.checkpoint``: every process's shards of
the trained weights, EMA and optimizer state) and ``state.json``. It is written under a temporary name and renamed
into place, so a half-written one is never picked up.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

KEEP = 2


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


def save(run_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], optimizer: dict, state: dict,
         keep: Sequence[int] = ()) -> Path:
    """Write ``checkpoint-<step>`` atomically and keep the newest ``KEEP`` checkpoints, and the newest one at or
    before each step in ``keep``; temporary folders left by a save that was killed midway are removed first (they
    are never loaded, only disk)."""
    run_dir = Path(run_dir)
    for stale in run_dir.glob(".tmp-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-checkpoint-", dir=run_dir))
    final = run_dir / f"checkpoint-{step:06d}"
    try:
        for name, sd in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        _write_state(tmp, step, state)
    except Exception as e:  # noqa: BLE001 - disk full, quota, permissions: one sentence, the previous one intact
        raise _write_error(run_dir, tmp, final, e) from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune(run_dir, final, keep)
    return final


def _write_error(run_dir: Path, tmp: Path, final: Path, error: Exception) -> CheckpointError:
    """Remove the half-written ``tmp`` and say in one sentence why ``final`` could not be written."""
    shutil.rmtree(tmp, ignore_errors=True)
    previous = latest(run_dir)
    return CheckpointError(f"cannot write {final.name} in {run_dir} ({str(error).splitlines()[0]}); the previous "
                           f"checkpoint {previous.name if previous else '(none)'} is intact")


def prune(run_dir: Path, final: Path, keep: Sequence[int] = ()) -> None:
    """Keep ``final`` (just written), the ``KEEP - 1`` newest checkpoints before it and the newest at or before
    each step in ``keep`` (where a guard's stop or rollback would go back to); checkpoints of later steps belong to
    no live history (a run resumes from its newest), so they go too."""
    found = sorted(run_dir.glob("checkpoint-*"))
    older, later = [p for p in found if p.name < final.name], [p for p in found if p.name > final.name]
    pinned = {at_or_before(run_dir, k) for k in keep}
    for old in older[: max(0, len(older) - (KEEP - 1))] + later:
        if old not in pinned:
            shutil.rmtree(old, ignore_errors=True)


def at_or_before(run_dir: Path, step: int) -> Optional[Path]:
    """The newest complete checkpoint of a step at most ``step``, or None."""
    found = sorted(p for p in Path(run_dir).glob("checkpoint-*") if (p / "state.json").is_file()
                   and _step_of(p) <= step)
    return found[-1] if found else None


def remove_after(run_dir: Path, path: Path) -> None:
    """Remove the checkpoints newer than ``path`` (after a rollback to it they belong to no live history)."""
    for later in Path(run_dir).glob("checkpoint-*"):
        if later.name > path.name:
            shutil.rmtree(later, ignore_errors=True)


def _step_of(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def save_sharded(run_dir: Path, step: int, sharded: dict[str, Any], state: dict, rank: int,
                 keep: Sequence[int] = ()) -> Path:
    """``save`` for FSDP runs, called by every process: ``sharded`` (DTensors: the trained parameters, their EMA,
    the optimizer state) goes through ``torch.distributed.checkpoint``, each process writing only its own shards
    into ``checkpoint-<step>/sharded``; the first process adds ``state.json`` and renames the folder into place once
    every shard is written, so a half-written checkpoint is never picked up. No process gathers whole weights."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    run_dir = Path(run_dir)
    tmp = run_dir / f".tmp-checkpoint-{step:06d}"
    if rank == 0:
        for stale in run_dir.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    final = run_dir / f"checkpoint-{step:06d}"
    try:  # a collective: returns once every process has written, raises on every process if one could not
        dcp.save(sharded, checkpoint_id=str(tmp / "sharded"))
        if rank == 0:
            _write_state(tmp, step, state)
    except Exception as e:  # noqa: BLE001 - disk full, quota, permissions: one sentence, the previous one intact
        raise _write_error(run_dir, tmp, final, e) from None
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(run_dir, final, keep)
    dist.barrier()
    return final


def load_sharded(path: Path, sharded: dict[str, Any]) -> dict:
    """Fill ``sharded`` (laid out as ``save_sharded`` wrote it) in place from checkpoint ``path``, each process
    reading its own shards; restores the RNG states and returns the state dict."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    dcp.load(sharded, checkpoint_id=str(path / "sharded"))
    return _read_state(path)


def _write_state(folder: Path, step: int, state: dict) -> None:
    rng = {"python": _jsonable(random.getstate()), "torch": torch.get_rng_state().tolist()}
    (folder / "state.json").write_text(json.dumps({**state, "step": step, "rng": rng}))


def _read_state(folder: Path) -> dict:
    state = json.loads((folder / "state.json").read_text())
    random.setstate(_tupled(state["rng"]["python"]))
    torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
    return state


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file under a temporary name, then rename it into place (never half-written)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint folder, or None."""
    found = sorted(p for p in Path(run_dir).glob("checkpoint-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def load(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """(tensors by file name, optimizer state, state dict) of a checkpoint; restores the RNG states."""
    path = Path(path)
    tensors = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors")}
    optimizer = torch.load(path / "optimizer.pt", weights_only=True)
    return tensors, optimizer, _read_state(path)


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x: Any) -> Any:
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x
