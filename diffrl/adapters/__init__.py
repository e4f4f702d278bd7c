"""Model-family adapters. Each owns diffusers for one family; nothing else in diffrl imports diffusers.

``ADAPTERS`` maps a family name to a lazy ``"module:Class"`` path so that importing diffrl stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Optional

ADAPTERS: dict[str, str] = {
    "sd3": "diffrl.adapters.sd3:SD3Adapter", "flux": "diffrl.adapters.flux:FluxAdapter",
    "sana": "diffrl.adapters.sana:SanaAdapter", "wan": "diffrl.adapters.wan:WanAdapter",
    "ltx2": "diffrl.adapters.ltx2:LTX2Adapter",
}


def load_adapter_class(name: str):
    """The adapter class registered under ``name`` (or a ``"pkg.mod:Class"`` path)."""
    path = ADAPTERS.get(name, name)
    if ":" not in path:
        raise ValueError(f"unknown model family {name!r}; choose one of {sorted(ADAPTERS)} or give 'pkg.module:Class'")
    module, attr = path.split(":", 1)
    return getattr(importlib.import_module(module), attr)


def shape_options(resolution: Optional[int] = None, num_frames: Optional[int] = None) -> dict[str, int]:
    """The media-shape keyword arguments of ``Adapter.from_pretrained`` that are set (``num_frames``: video only)."""
    return {k: v for k, v in (("resolution", resolution), ("num_frames", num_frames)) if v is not None}
