"""FLUX.1 adapter on a tiny random FluxPipeline: our ODE sampler is the pipeline's own, one RL iteration through
the shared trainer starts exactly on policy and moves the LoRA, and the exported LoRA loads into plain diffusers."""
import json
import os

import pytest
import torch

from diffrl.adapters.flux import FluxAdapter
from diffrl.config import load_config
from diffrl.inference import load_for_inference, sample
from diffrl.trainer import train
from diffrl.tree import mix_seed, step_noise

from tests_helpers import BRIGHT, ROOT, TINY
from tiny_families import tiny_flux_pipeline

os.environ["HF_HUB_OFFLINE"] = "1"
PROMPTS = ["a red circle to the left of a blue square", "three green triangles"]


def _noise(adapter, seed=7):
    return torch.cat([step_noise(mix_seed(seed, i), -1, 1, adapter.latent_shape) for i in range(len(PROMPTS))])


def _pipe_images(pipe, adapter, **kw):
    latents = adapter.pack(_noise(adapter))
    return pipe(PROMPTS, num_inference_steps=4, latents=latents, height=32, width=32, output_type="pt",
                max_sequence_length=16, **kw).images


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_ode_sampler_reproduces_the_flux_pipeline(guidance_embeds):
    pipe = tiny_flux_pipeline(guidance_embeds)
    adapter = FluxAdapter(pipe, resolution=32)
    assert adapter.latent_shape == (4, 32, 32)
    ours = sample(adapter, PROMPTS, seed=7, steps=4, guidance=3.5 if guidance_embeds else 3.0)
    kw = {"guidance_scale": 3.5} if guidance_embeds else {"negative_prompt": ["", ""], "true_cfg_scale": 3.0}
    torch.testing.assert_close(ours, _pipe_images(pipe, adapter, **kw), atol=1e-4, rtol=0)


def test_pack_and_unpack_are_the_pipelines_and_inverse():
    pipe = tiny_flux_pipeline()
    adapter = FluxAdapter(pipe, resolution=32)
    x = torch.randn(2, *adapter.latent_shape)
    tokens = adapter.pack(x)
    assert tokens.shape == (2, 16 * 16, 16)
    torch.testing.assert_close(adapter.unpack(tokens), pipe._unpack_latents(tokens, 32, 32, pipe.vae_scale_factor))
    assert torch.equal(adapter.unpack(tokens), x)


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    tiny_flux_pipeline().save_pretrained(str(root / "model"))
    cfg = load_config(str(ROOT / "configs" / "tiny_shapes.yaml"),
                      TINY + ["model.family=flux", f"model.path={root / 'model'}", "model.resolution=32",
                              "train.steps=1", "train.lr=0.05", BRIGHT])
    train(cfg, out=str(root / "run"))
    return root


def test_one_rl_iteration_through_the_shared_trainer(flux_run):
    m = json.loads((flux_run / "run" / "metrics.jsonl").read_text())
    assert m["first_ratio_dev"] == 0.0  # exactly on policy before the first update
    assert m["trained_edges"] > 0
    from safetensors.torch import load_file

    lora = load_file(str(flux_run / "run" / "checkpoint-000001" / "lora.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)


def test_flux_lora_export_loads_into_a_plain_diffusers_pipeline(flux_run):
    from diffusers import FluxPipeline

    model, lora = str(flux_run / "model"), str(flux_run / "run" / "lora")
    ours = sample(load_for_inference(model, lora, family="flux", resolution=32), PROMPTS, seed=7, steps=4,
                  guidance=4.5)
    pipe = FluxPipeline.from_pretrained(model)
    adapter = FluxAdapter(pipe, resolution=32)
    base = _pipe_images(pipe, adapter, guidance_scale=4.5)
    pipe.load_lora_weights(lora)
    theirs = _pipe_images(pipe, adapter, guidance_scale=4.5)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (base - theirs).abs().max() > 1e-3  # the LoRA really changes the samples
