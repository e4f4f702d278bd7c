"""Built-in reward models, one file each, and the reward registry.

A reward is a callable ``reward(media, prompts) -> {name: float tensor (batch,)}``. ``load(name_or_path)``
accepts a registered name or a ``"pkg.module:attr"`` path to a function (used as is) or to a factory/class
(called with the options). Reward files import their heavy dependencies inside ``build``, so ``import rewards``
stays cheap.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any, Callable

REGISTRY: dict[str, str] = {
    "shapes": "rewards.shapes:build",
    "shapes_partial": "rewards.shapes:build_partial",
    "jpeg_compressibility": "rewards.jpeg:build_compressibility",
    "jpeg_incompressibility": "rewards.jpeg:build_incompressibility",
    "av_sync": "rewards.av_sync:build",
    "clip_score": "rewards.clip_score:build",
    "aesthetic": "rewards.aesthetic:build",
    "pickscore": "rewards.pickscore:build",
    "hpsv2": "rewards.hpsv2:build",
    "ocr": "rewards.ocr:build",
    "remote": "rewards.remote:build",
}


def register(name: str) -> Callable:
    """Decorator: register a reward factory (``build(**options) -> reward``) under ``name``."""

    def wrap(factory: Callable) -> Callable:
        REGISTRY[name] = f"{factory.__module__}:{factory.__qualname__}"
        return factory

    return wrap


def _import(path: str) -> Any:
    module, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"reward {path!r}: cannot import module {module!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {path!r}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


ENTRY_POINT_GROUP = "diffrl.rewards"


def plugins() -> dict[str, str]:
    """Rewards installed packages register under the ``diffrl.rewards`` entry-point group: name -> "module:attr"."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load(name_or_path: str, **options: Any) -> Callable:
    """The reward callable for a built-in name, an installed plug-in's name or a ``"pkg.module:attr"`` path.

    Names resolve to factories (called with ``options``); a path to a class or, with options, to a factory is
    called with them, a path to a function is used as is. ``"video:NAME"`` applies reward NAME to sampled frames
    (options ``stride`` and ``reduction``, see ``rewards.video``).
    """
    if name_or_path.startswith("video:"):
        from rewards.video import on_frames

        frame_options = {k: options.pop(k) for k in ("stride", "reduction") if k in options}
        return on_frames(load(name_or_path[len("video:"):], **options), **frame_options)
    if name_or_path in REGISTRY:
        return _import(REGISTRY[name_or_path])(**options)
    installed = plugins()
    if name_or_path in installed:
        return _import(installed[name_or_path])(**options)
    if ":" not in name_or_path:
        raise ValueError(f"unknown reward {name_or_path!r}; built-in rewards are {sorted(REGISTRY)}, installed "
                         f"plug-ins {sorted(installed)}; or give a 'pkg.module:function' path")
    obj = _import(name_or_path)
    if isinstance(obj, type) or options:
        return obj(**options)
    return obj
