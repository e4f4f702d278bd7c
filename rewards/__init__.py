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
    "shapes_dense": "rewards.shapes:build_dense",
    "jpeg_compressibility": "rewards.jpeg:build_compressibility",
    "jpeg_incompressibility": "rewards.jpeg:build_incompressibility",
    "av_sync": "rewards.av_sync:build",
    "clip_score": "rewards.clip_score:build",
    "aesthetic": "rewards.aesthetic:build",
    "pickscore": "rewards.pickscore:build",
    "hpsv2": "rewards.hpsv2:build",
    "ocr": "rewards.ocr:build",
    "remote": "rewards.remote:build",
    "vlm_judge": "rewards.vlm_judge:build",
    "pairwise": "rewards.pairwise:build",
}


def register(name: str) -> Callable:
    """Decorator: register a reward factory (``build(**options) -> reward``) under ``name``."""

    def wrap(factory: Callable) -> Callable:
        REGISTRY[name] = f"{factory.__module__}:{factory.__qualname__}"
        return factory

    return wrap


def resolve_dotted(path: str) -> Any:
    """The object ``pkg.module:attr.sub`` names; ``LookupError`` saying which part is missing (the module, with
    the import error, or the attribute)."""
    module, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise LookupError(f"cannot import module {module!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise LookupError(f"module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _import(path: str) -> Any:
    try:
        return resolve_dotted(path)
    except LookupError as e:
        raise ValueError(f"reward {path!r}: {e}") from None


# What each built-in reward reads (image, video, audio: audio-video training routes its advantage by this) and
# whether its scores are differentiable functions of the pixels.
META: dict[str, tuple[tuple[str, ...], bool]] = {
    "shapes": (("image",), False), "shapes_partial": (("image",), False), "shapes_dense": (("image",), False),
    "jpeg_compressibility": (("image",), False), "jpeg_incompressibility": (("image",), False),
    "av_sync": (("video", "audio"), False), "clip_score": (("image",), True), "aesthetic": (("image",), True),
    "pickscore": (("image",), True), "hpsv2": (("image",), True), "ocr": (("image", "video"), False),
    "remote": (("image", "video"), False), "vlm_judge": (("image",), False), "pairwise": (("image", "video"), False),
}
ENTRY_POINT_GROUP = "diffrl.rewards"


def describe(reward: Callable, modalities: tuple[str, ...] = ("image",), differentiable: bool = False) -> Callable:
    """Declare what a reward reads and whether it is differentiable (attributes ``modalities``, ``differentiable``);
    a custom reward can also just set those attributes itself."""
    if not hasattr(reward, "__dict__"):  # bound methods, builtins: wrap to carry the attributes

        def wrapped(media, prompts):
            return reward(media, prompts)

        reward = wrapped
    reward.modalities = tuple(modalities)
    reward.differentiable = bool(differentiable)
    return reward


def groupwise(reward: Callable) -> Callable:
    """Declare that a reward scores the samples of one prompt together (attribute ``groupwise``): the trainer calls
    it once per group, ``reward(media_of_the_group, prompt) -> {name: float tensor (group size,)}``; the group is the
    leaves of the prompt's trees, or its flat chains. Pairwise preference models (Pref-GRPO, arXiv 2508.20751) are
    written this way; ``rewards.pairwise`` turns any pointwise reward into win rates."""
    reward.groupwise = True
    return reward


def modalities(reward: Callable) -> tuple[str, ...]:
    """The modalities a reward reads (``("image",)`` unless it declares otherwise)."""
    return tuple(getattr(reward, "modalities", ("image",)))


def is_differentiable(reward: Callable) -> bool:
    return bool(getattr(reward, "differentiable", False))


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
        inner = load(name_or_path[len("video:"):], **options)
        return describe(on_frames(inner, **frame_options), ("video",), is_differentiable(inner))
    if name_or_path in REGISTRY:
        reward = _import(REGISTRY[name_or_path])(**options)
        return describe(reward, *META.get(name_or_path, (("image",), False)))
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
