"""Run CUDA code paths on a CPU-only machine and fail where real CUDA would fail on mixed devices.

``PretendCuda`` is a torch function mode: inside it, ``device="cuda"`` (factories, ``.to``, ``.cuda()``) makes an
ordinary CPU tensor whose storage is *labelled* ``cuda:0``, and ``.device`` / ``.is_cuda`` report the label, so the
code under test takes its CUDA branches. Every torch call then checks its tensor arguments as CUDA does: all on one
device, except 0-dim CPU tensors (CUDA accepts CPU scalars) and CPU indices of a CUDA tensor (``x[idx]``), and a
CPU ``generator`` for a CUDA factory is refused. Results inherit the label of their inputs.

Why not ``FakeTensorMode`` alone: it has no data, so the trainer's data-dependent code (``nonzero``, ``tolist``,
``unique``) cannot run in it, and indexing a CPU tensor with CUDA indices passes there silently. Here the values
are real (the math is checked too) and that indexing raises.

Labels live on storages (views and ``Parameter`` wrappers share them) and are dropped when the storage is freed.
Tensors made outside any torch call (autograd's gradients) carry no label and match any device.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

CUDA = "cuda:0"
_DEVICE, _IS_CUDA = torch.Tensor.device.__get__, torch.Tensor.is_cuda.__get__


class DeviceMismatch(RuntimeError):
    """What real CUDA raises as 'Expected all tensors to be on the same device'."""


def _target(func: Any, args: tuple, kwargs: dict) -> Optional[str]:
    """The device a call moves to or creates on, normalised ('cuda:0' / 'cpu'), or None."""
    name = getattr(func, "__name__", "")
    if name == "cuda":
        return CUDA
    if name == "cpu":
        return "cpu"
    candidates = [kwargs.get("device")]
    if name == "to":
        candidates += list(args[1:])
    for c in candidates:
        if isinstance(c, (str, torch.device)):
            return CUDA if torch.device(c).type == "cuda" else torch.device(c).type
    return None


def _to_cpu(func: Any, args: tuple, kwargs: dict, move: bool) -> tuple[Any, tuple, dict]:
    """The same call with every CUDA device argument replaced by the CPU; ``move``: the call changes a tensor's
    device, which copies it (the original keeps its label)."""
    cpu = lambda c: "cpu" if isinstance(c, (str, torch.device)) and torch.device(c).type == "cuda" else c  # noqa: E731
    name = getattr(func, "__name__", "")
    if name in ("cuda", "cpu"):
        return (torch.Tensor.clone, args[:1], {}) if move else (lambda t: t, args[:1], {})
    kwargs = {k: cpu(v) if k == "device" else v for k, v in kwargs.items()}
    if name == "to":
        args, kwargs = (args[0], *[cpu(a) for a in args[1:]]), {**kwargs, "copy": kwargs.get("copy", False) or move}
    return func, args, kwargs


class PretendCuda(TorchFunctionMode):
    """See the module docstring. ``calls`` counts the torch calls checked (a test can assert the mode was live)."""

    def __init__(self) -> None:
        super().__init__()
        self.labels: dict[int, str] = {}
        self.calls = 0

    def label(self, t: torch.Tensor) -> Optional[str]:
        if t.device.type == "meta":
            return None
        return self.labels.get(id(t.untyped_storage()))

    def _set(self, t: torch.Tensor, label: Optional[str]) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = id(storage)
        if label is None:
            self.labels.pop(key, None)
            return
        if key not in self.labels:
            weakref.finalize(storage, self.labels.pop, key, None)
        self.labels[key] = label

    def _check(self, name: str, tensors: list[torch.Tensor], indices: list[torch.Tensor] = ()) -> Optional[str]:
        """The one device of the call's tensors (None when none is labelled); raises on a mix."""
        seen = {}
        for t in tensors:
            lab = self.label(t)
            if lab is None or (lab == "cpu" and t.dim() == 0):
                continue
            seen.setdefault(lab, tuple(t.shape))
        if len(seen) > 1:
            raise DeviceMismatch(f"{name}: tensors on several devices {seen}")
        device = next(iter(seen), None)
        for t in indices:
            lab = self.label(t)
            if lab is not None and lab != "cpu" and lab != device and t.dim() > 0:
                raise DeviceMismatch(f"{name}: {lab} indices {tuple(t.shape)} into a {device} tensor")
        return device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == _DEVICE:
            return torch.device(self.label(args[0]) or func(args[0]))
        if func == _IS_CUDA:
            return (self.label(args[0]) or "cpu").startswith("cuda")
        name = getattr(func, "__qualname__", str(func))
        if name.endswith(_UNCHECKED):
            return func(*args, **kwargs)
        self.calls += 1
        target = _target(func, args, kwargs)
        if target == CUDA and isinstance(kwargs.get("generator"), torch.Generator) \
                and kwargs["generator"].device.type != "cuda":
            raise DeviceMismatch(f"{name}: a CPU generator for a CUDA tensor")
        if name.endswith(("__getitem__", "__setitem__")):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            values = [args[2]] if name.endswith("__setitem__") and isinstance(args[2], torch.Tensor) else []
            idx = [t for t in tree_flatten(index)[0] if isinstance(t, torch.Tensor)]
            device = self._check(name, [args[0], *values], idx)
        else:
            flat = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            device = self._check(name, flat)
        move = target is not None and isinstance(args[0] if args else None, torch.Tensor) \
            and (self.label(args[0]) or "cpu") != target
        func, args, kwargs = _to_cpu(func, args, kwargs, move)
        out = func(*args, **kwargs)
        label = target or device or ("cpu" if kwargs.get("device") is not None or _is_factory(func) else None)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._set(t, label)
        return out


_UNCHECKED = ("getset_descriptor.__get__", "getset_descriptor.__set__", "._has_compatible_shallow_copy_type",
              ".is_same_size", "TensorBase.copy_")
"""Attribute access, metadata comparisons and ``copy_``, which CUDA allows across devices (``param.data = moved``,
``gpu_tensor.copy_(cpu_tensor)``)."""
_FACTORIES = {"zeros", "ones", "empty", "full", "arange", "tensor", "randn", "rand", "randint", "randperm",
              "linspace", "eye", "as_tensor"}


def _is_factory(func: Any) -> bool:
    """A call that creates a tensor from no tensor input: it lands on the CPU unless a device is named."""
    return getattr(func, "__name__", "") in _FACTORIES
