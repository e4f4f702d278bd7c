"""Pure-math modules must not import diffusers, transformers, peft, accelerate or open_clip."""
import subprocess
import sys

L1 = ["diffrl.types", "diffrl.sde", "diffrl.schedule", "diffrl.tree", "diffrl.advantages", "diffrl.loss",
      "diffrl.guidance", "diffrl.quant", "diffrl.selection", "diffrl.seeding", "diffrl.rollout", "diffrl"]
HEAVY = ["diffusers", "transformers", "peft", "accelerate", "open_clip", "torchao"]


def test_pure_math_imports_no_model_library():
    # One fresh interpreter: every diffrl module import runs diffrl/__init__ anyway, so this covers each of them.
    code = f"import sys\nfor m in {L1!r}: __import__(m)\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"pure-math modules import {out.stdout.strip()}"
