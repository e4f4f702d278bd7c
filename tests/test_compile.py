"""``model.compile``: regional torch.compile of the denoiser blocks gives the eager path's samples within float
tolerance, keeps the first clipped ratio exactly 1 (rollout and update run the same compiled forward), and is off
when the config says so."""
import os

import pytest
import torch

from diffrl import trainer
from diffrl.adapters.base import repeated_blocks
from diffrl.config import load_config
from diffrl.update import optimize
from tests_helpers import BRIGHT, ROOT, TINY

os.environ["HF_HUB_OFFLINE"] = "1"


def _run(tmp_path, compile_: bool):
    """Flat chains without CFG or KL: every call has the same batch size, so few graphs compile (the test's cost)."""
    cfg = load_config(str(ROOT / "configs" / "tiny_shapes_tree.yaml"),
                      [*TINY, BRIGHT, "sampler.split_steps=[]", "train.trees_per_prompt=2", "sampler.guidance_scale=1",
                       "train.kl_weight=0", f"model.compile={str(compile_).lower()}"])
    return trainer.build(cfg, tmp_path / f"compile-{compile_}")


def _compiled(module: torch.nn.Module) -> list[bool]:
    return [getattr(b, "_compiled_call_impl", None) is not None for b in repeated_blocks(module)]


def test_the_switch_compiles_every_block_in_place_and_false_compiles_none(tmp_path):
    eager, compiled = _run(tmp_path, False), _run(tmp_path, True)
    blocks = _compiled(compiled.adapter.transformer)
    assert len(blocks) == len(compiled.adapter.transformer.transformer_blocks) == 6 and all(blocks)
    assert not any(_compiled(eager.adapter.transformer))
    # in place: the parameter names (LoRA, checkpoints, exports) are the eager model's
    assert [n for n, _ in compiled.adapter.named_trainable_parameters()] == \
        [n for n, _ in eager.adapter.named_trainable_parameters()]
    copies = compiled.adapter.merged_copies()
    assert not any(_compiled(copies["transformer"]))  # a copy's compiled call would run the original's weights


@pytest.mark.slow
def test_compiled_samples_match_eager_and_the_first_ratio_is_exactly_one(tmp_path):
    eager, compiled = _run(tmp_path, False), _run(tmp_path, True)
    be, bc = trainer.collect(eager, 0), trainer.collect(compiled, 0)
    te, tc = be.rollout.transitions, bc.rollout.transitions
    assert torch.equal(te.tree, tc.tree) and torch.equal(te.step, tc.step)
    # same seeds, same schedule: the samples agree up to the compiled kernels' float rounding
    assert float((te.x_next - tc.x_next).abs().max()) < 1e-3
    assert float((te.log_prob - tc.log_prob).abs().max()) < 1e-4
    assert float((be.rollout.leaves - bc.rollout.leaves).abs().max()) < 1e-3
    leaf_r, valid, scores = trainer.score(compiled, bc)
    adv, mask = trainer.advantage(compiled, bc, leaf_r, valid, 0, scores)
    stats = optimize(compiled, bc, adv, mask)
    assert stats["ratio_dev"] == 0.0  # the recorded and the re-scored log-prob come from one computation
    moved = optimize(compiled, bc, adv, mask)
    assert moved["ratio_dev"] > 0.0  # and the update moved the compiled model's policy
