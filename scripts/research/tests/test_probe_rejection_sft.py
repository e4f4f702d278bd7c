"""scripts/research/probe_rejection_sft.py: its fine-tuning loss against the rectified-flow closed form, its choice of
training prompts, its refusal of prompts the verifier cannot score, and one tiny end-to-end run."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from research_helpers import load_probe, probe_path

from diffrl.config import load_config
from diffrl.prompts import PromptStream, eval_prompts
from tests_helpers import ROOT, SUBPROCESS_ENV


class ConstantVelocity:
    """A model whose velocity is one learnable tensor, whatever the input: flow matching drives it to the mean of
    the target eps - z, which is -z for a fixed latent z (the noise averages out)."""

    def __init__(self, shape):
        self.c = torch.nn.Parameter(torch.zeros(shape))
        self.empty_rows = self.rows = 0

    def encode(self, prompts):
        return {"pooled": torch.tensor([[float(len(p))] for p in prompts])}

    def unconditional(self):
        return self.encode([""])

    def velocity(self, x, sigma, cond, guidance):
        assert guidance == 1.0 and len(cond["pooled"]) == len(x) == len(sigma)
        self.empty_rows += int((cond["pooled"] == 0).sum())
        self.rows += len(x)
        return self.c.expand_as(x)

    def trainable_parameters(self):
        return [self.c]


def test_sft_fits_the_rectified_flow_target():
    model = ConstantVelocity((1, 2, 2))
    run = SimpleNamespace(adapter=model, optimizer=torch.optim.Adam([model.c], lr=0.05),
                          cfg=SimpleNamespace(train=SimpleNamespace(max_grad_norm=100.0)))
    z = torch.full((3, 1, 2, 2), 0.5)
    losses = load_probe("probe_rejection_sft").sft(run, z, ["a red circle"] * 3, steps=300, batch=256, seed=0)
    assert model.c.detach() == pytest.approx(torch.full((1, 2, 2), -0.5), abs=0.1)  # E[eps - z] = -z
    assert losses[-1] < losses[0] and model.empty_rows == 0


def test_sft_gives_the_empty_prompt_to_the_asked_share():
    model = ConstantVelocity((1, 2, 2))
    run = SimpleNamespace(adapter=model, optimizer=torch.optim.Adam([model.c], lr=0.05),
                          cfg=SimpleNamespace(train=SimpleNamespace(max_grad_norm=100.0)))
    load_probe("probe_rejection_sft").sft(run, torch.zeros(2, 1, 2, 2), ["a red circle"] * 2, steps=20, batch=100,
                                           seed=0, empty=0.25)
    assert model.empty_rows / model.rows == pytest.approx(0.25, abs=0.03)  # 2000 rows: binomial sd ~0.01


def test_training_prompts_are_the_whole_file_less_the_held_out(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("two red circles\na blue square\ntwo red circles\na green triangle\n")
    probe = load_probe("probe_rejection_sft")
    run = SimpleNamespace(prompts=PromptStream(str(path), seed=0, exclude=["a blue square"]))
    assert probe.training_prompts(run, 99) == ["two red circles", "a green triangle"]
    generated = SimpleNamespace(prompts=PromptStream("shapes:count", seed=0))
    assert generated.prompts.at(0, 5) == probe.training_prompts(generated, 5)


def test_refuses_held_out_prompts_the_verifier_cannot_score():
    done = subprocess.run([sys.executable, probe_path("probe_rejection_sft"),
                           "data.eval_prompts=prompts/general_eval.txt", "data.eval_size=2"],
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300, cwd=ROOT)
    assert done.returncode != 0
    assert "data.eval_prompts holds prompts outside the shapes grammar" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_tiny_run_ends_with_its_json(tmp_path):
    done = subprocess.run([sys.executable, probe_path("probe_rejection_sft"), "--prompts", "4", "--per-prompt", "8",
                           "--sft-steps", "2", "--batch", "4", "--out", str(tmp_path), "data.eval_size=2",
                           "data.eval_seeds=1"],
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0 < out["kept"] <= out["sampled"] == 32 and out["sft_steps"] == 2
    assert set(out["base"]) == set(out["final"]) == {"accuracy", "accuracy_count", "accuracy_relation"}
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_fit_eight_is_the_main_jobs_first_eight_held_out_prompts():
    lines = (ROOT / "prompts" / "fit_eight.txt").read_text().splitlines()
    data = load_config(str(ROOT / "configs" / "tiny_shapes.yaml")).data
    assert lines == eval_prompts(data.eval_prompts, data.eval_size)[:8]
