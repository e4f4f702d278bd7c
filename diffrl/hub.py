"""``diffrl push``: upload a finished run's export (its LoRA or its fully fine-tuned denoisers, with the model card
and the last sample grid) to a Hugging Face Hub repository.

``upload_plan`` decides what goes where without touching the network; ``push`` creates the repository and uploads
the plan through an ``HfApi``-like object (injected by tests; the real one is built only when none is given).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from diffrl.model_card import CARD

EXPORTS = {"lora": ("lora",), "full": ("transformer", "transformer_2")}
"""``--lora`` / ``--full`` -> the run's export folders it uploads: the first holds the card and goes to the
repository's root, a second expert's (Wan 2.2) goes to its own subfolder."""


class PushError(ValueError):
    """A run directory holds nothing to push (no export, or an export without its model card)."""


def upload_plan(run_dir: Path, kind: Optional[str] = None) -> list[tuple[Path, str]]:
    """``[(local folder, folder in the repository ("" for the root))]`` to upload from ``run_dir``: the export
    ``kind`` names (``lora`` or ``full``; None: the one the run has). ``PushError`` in one sentence when the run
    has no such export or its card (``README.md`` opening with the Hub's ``---`` front matter) is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PushError(f"{run_dir} is not a run directory (a folder written by diffrl train)")
    kind = kind or next((k for k, names in EXPORTS.items() if (run_dir / names[0]).is_dir()), None)
    if kind is None or not (run_dir / EXPORTS[kind][0]).is_dir():
        wanted = f"{EXPORTS[kind][0]}/" if kind else "lora/ or transformer/"
        raise PushError(f"{run_dir} holds no {wanted} export: a run exports it when it finishes (a run that was "
                        "stopped or is still going has none; --lora or --full picks one)")
    names = EXPORTS[kind]
    card = run_dir / names[0] / CARD
    if not card.is_file() or not card.read_text(encoding="utf-8").startswith("---"):
        raise PushError(f"{card} is missing or has no Hub front matter: the model card is written when a run "
                        "finishes (runs of diffrl before model cards have none)")
    return [(run_dir / name, "" if i == 0 else name) for i, name in enumerate(names) if (run_dir / name).is_dir()]


def push(run_dir: Path, repo_id: str, *, private: bool = False, kind: Optional[str] = None,
         api: Optional[Any] = None) -> str:
    """Create the Hub repository ``repo_id`` (kept if it exists) and upload ``upload_plan(run_dir, kind)`` to it
    through ``api`` (an ``huggingface_hub.HfApi``; by default a new one, which reads the token of
    ``huggingface-cli login`` or ``HF_TOKEN``); returns the repository's URL."""
    plan = upload_plan(run_dir, kind)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    for folder, path_in_repo in plan:
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), path_in_repo=path_in_repo or None,
                          commit_message=f"diffrl push of {Path(run_dir).name}/{folder.name}")
    return str(url)
