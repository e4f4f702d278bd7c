"""The adapter protocol names everything the RL loop uses from a model family, and the shipped adapters meet it."""
import re

from diffrl.adapters.interface import Adapter
from diffrl.adapters.sd3 import SD3Adapter
from tests_helpers import MODEL, ROOT

USERS = ["trainer.py", "update.py", "state.py", "explore.py", "inference.py", "guided_sampling.py"]
"""The modules that drive a family through its adapter."""


def _declared() -> set[str]:
    names = set(getattr(Adapter, "__annotations__", {}))
    return names | {n for n in vars(Adapter) if not n.startswith("_")}


def test_every_member_the_loop_uses_is_declared():
    """``run.adapter.X``, ``ad.X``, ``adapter.X``, ``self.adapter.X`` in the loop's modules: each X is in the
    protocol (a member used without being declared fails here)."""
    used = set()
    for name in USERS:
        text = (ROOT / "diffrl" / name).read_text()
        used |= set(re.findall(r"\b(?:run\.adapter|self\.adapter|adapter|ad)\.([a-z_]+)", text))
    assert used and used <= _declared(), sorted(used - _declared())


def test_the_shipped_adapter_meets_the_protocol():
    adapter = SD3Adapter.from_pretrained(MODEL)
    assert isinstance(adapter, Adapter)
    missing = [n for n in _declared() if not hasattr(adapter, n)]
    assert not missing
