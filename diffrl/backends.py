"""Optional accelerated backends, checked before any model loads so a wrong choice fails in one sentence."""
from __future__ import annotations

import importlib.util

ATTENTION_BACKENDS = ("sdpa", "xformers")


def check_attention_backend(name: str, device: str) -> str:
    """Validate an attention backend for a device and return it.

    ``sdpa`` (torch's scaled_dot_product_attention, diffusers' default) works everywhere. ``xformers`` needs the
    ``gpu`` extra and a CUDA device: it ships no CPU kernels.
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; choose one of {ATTENTION_BACKENDS}")
    if name == "xformers":
        if not str(device).startswith("cuda"):
            raise ValueError(f"attention backend 'xformers' has no CPU kernels and cannot run on device {device!r}; "
                             "use attention 'sdpa' (the default) or a CUDA device")
        if importlib.util.find_spec("xformers") is None:
            raise ValueError("attention backend 'xformers' is not installed; pip install 'diffrl[gpu]'")
    return name
