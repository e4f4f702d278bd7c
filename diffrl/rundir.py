"""Who owns a run directory: one live run at a time (a lock file), no run written over another by accident, and a
resumed run that continues with the config it started with (or says what changed).

``claim(out, resume, overwrite)`` is called before any model loads, so a refusal costs nothing and changes no file.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from diffrl.config import ConfigError

log = logging.getLogger("diffrl")
LOCK = "run.lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "config_changes.jsonl", "curves.png", "lora",
             "transformer", "transformer_2", "tensorboard", "wandb")
"""What a run writes into its directory, besides ``RUN_GLOBS``: ``--overwrite`` removes exactly these."""
RUN_GLOBS = ("checkpoint-*", ".tmp-checkpoint-*", "samples_step*.png", "advantages_step*.safetensors")

RESUME_MAY_CHANGE = ("train.steps", "train.reward_timeout_s", "log.out", "log.sample_every", "log.eval_every",
                     "log.checkpoint_every", "log.tensorboard", "log.trackers", "log.wandb_project",
                     "log.wandb_entity", "log.run_name", "model.device", "model.attention", "model.offload",
                     "model.gradient_checkpointing", "model.compile")
"""Keys a resumed run may change silently: how long it runs, how often it logs, where and how fast it computes (the
same math). Anything else needs ``--allow-config-change``. With a decaying ``train.lr_schedule``, a new
``train.steps`` stretches what is left of the schedule."""
RESUME_NEVER = ("model.family", "model.path", "model.lora_rank", "model.lora_targets", "model.fsdp")
"""Keys no resume can change: the checkpoint's tensors (their names, shapes, sharding) depend on them."""


class RunDirError(ConfigError):
    """The run directory is locked by a live run, holds another run, or cannot hold one."""


def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None where unknown, dead or a zombie
    (a killed process its parent has not reaped yet: ``kill(pid, 0)`` still succeeds on it)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _alive(pid: int, start: Optional[str]) -> bool:
    """Whether the process that wrote a lock still runs: not when it is gone, a zombie, or a reused pid with
    another start time (where ``/proc`` is missing, whether the pid exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc/self/stat").exists():
        return True
    now = _process_start(pid)
    return now is not None and (start is None or now == start)


class RunLock:
    """``run.lock`` in the run directory, created exclusively and holding the owner's host, pid and start time.
    A lock whose process is dead on this host is stale and taken over (a run killed with SIGKILL leaves one)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self.held = False

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunDirError(f"{self.path.parent} is locked by another run that just started; use another --out")

    def _clear_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            owner = {}
        if owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1)), owner.get("start")):
            log.warning("removing the stale lock of a run that ended without releasing it (pid %s)", owner.get("pid"))
            self.path.unlink(missing_ok=True)
            return
        who = f"process {owner.get('pid')} on {owner.get('host')}" if owner else "another process"
        raise RunDirError(f"{self.path.parent} is in use by a live run ({who}, since {owner.get('since', '?')}); "
                          f"wait for it, use another --out, or delete {self.path} if no run is live")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds files of a run (its config, metrics, checkpoints, exports)."""
    out = Path(out)
    return any((out / name).exists() for name in RUN_FILES) or any(any(out.glob(g)) for g in RUN_GLOBS)


def remove_run(out: Path) -> None:
    """Delete the files a run wrote into ``out`` (``RUN_FILES``, ``RUN_GLOBS``); nothing else in it."""
    out = Path(out)
    paths = [out / name for name in RUN_FILES] + [p for g in RUN_GLOBS for p in out.glob(g)]
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse (``RunDirError``, nothing written) a run directory that is a file, or that holds another run when
    neither ``resume`` nor ``overwrite`` is given."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory")
    if resume and overwrite:
        raise RunDirError("--resume continues the run in --out and --overwrite deletes it: give one of them")
    if not resume and not overwrite and holds_run(out):
        raise RunDirError(f"{out} holds another run: continue it with --resume, replace it with --overwrite, or "
                          "choose another --out")


def flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; the ``rewards`` and ``reward_options`` mappings stay whole values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in ("rewards", "reward_options", "train.reward_routing"):
            out.update(flat(v, f"{key}."))
        else:
            out[key] = v
    return out


def config_changes(saved: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between a saved config and a new one (both as ``config.to_dict`` writes them):
    ``{key: (saved, new)}``."""
    a, b = flat(saved), flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume_config(out: Path, new: dict, allow: bool) -> dict[str, tuple[Any, Any]]:
    """Compare the run's saved ``config.yaml`` with the resuming config: refuse (``RunDirError``, one sentence
    listing them) changes outside ``RESUME_MAY_CHANGE`` unless ``allow``, and changes of ``RESUME_NEVER`` always.
    Returns the changes that need ``allow`` (empty when none)."""
    path = Path(out) / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"--resume: {path} is missing, so the run's config cannot be checked")
    changes = {k: v for k, v in config_changes(yaml.safe_load(path.read_text()) or {}, new).items()
               if k not in RESUME_MAY_CHANGE}
    never = {k: v for k, v in changes.items() if k in RESUME_NEVER}
    if never:
        raise RunDirError(f"--resume cannot change {_listing(never)}: the checkpoint's weights depend on them")
    if changes and not allow:
        raise RunDirError(f"--resume with a changed config ({_listing(changes)}); undo the change, or give "
                          "--allow-config-change to continue with the new values")
    return changes


def _listing(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
