"""The finiteness guard: a run whose rewards, advantages, losses, gradients or weights stop being finite numbers is
stopped (not skipped: after one non-finite update the optimizer's moments are suspect too), so it never exports
or checkpoints a non-finite value and its last checkpoint stays its result."""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Union

import torch
from torch import Tensor

from diffrl.fsdp import local_part

Checked = Union[Tensor, float, Mapping[str, Union[Tensor, float]], Iterable[Tensor]]


class NonFiniteError(RuntimeError):
    """A quantity of the training step is NaN or infinite; ``quantity`` names it."""

    def __init__(self, quantity: str, detail: str, message: str = ""):
        super().__init__(message or f"{quantity} {detail}")
        self.quantity = quantity


def _first_bad(value: Checked) -> Union[str, None]:
    """A description of the first non-finite entry of ``value``, or None when every entry is finite."""
    if isinstance(value, (int, float)):
        return None if math.isfinite(value) else f"is {value}"
    if isinstance(value, Tensor):
        t = local_part(value).detach()  # a replicated DTensor's local part is all of it
        bad = ~torch.isfinite(t)
        if not bool(bad.any()):
            return None
        if t.numel() == 1:
            return f"is {t.item()}"
        return f"holds {int(bad.sum())} non-finite of {t.numel()} values (e.g. {t[bad].flatten()[0].item()})"
    items = value.items() if isinstance(value, Mapping) else enumerate(value)
    for key, v in items:
        found = _first_bad(v)
        if found is not None:
            return f"['{key}'] {found}" if isinstance(key, str) else found
    return None


def check_finite(quantity: str, value: Checked) -> None:
    """Raise ``NonFiniteError`` naming ``quantity`` when any entry of ``value`` (a tensor, a number, a mapping or
    iterable of them) is NaN or infinite."""
    found = _first_bad(value)
    if found is not None:
        raise NonFiniteError(quantity, found)
