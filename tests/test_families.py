"""Model-family adapters on tiny random pipelines built in code (tests/tiny_families.py): for every family, our
ODE sampler is the pipeline's own (same noise, same images), one RL iteration through the shared trainer starts
exactly on policy and moves the LoRA, and the exported LoRA loads into the plain diffusers pipeline."""
import json
import os

import pytest
import torch

from diffrl.adapters import load_adapter_class
from diffrl.config import load_config
from diffrl.inference import load_for_inference, sample
from diffrl.seeding import mix_seed, step_noise
from diffrl.trainer import train
from tests_helpers import BRIGHT, ROOT, TINY
from tiny_families import tiny_flux_pipeline, tiny_sana_pipeline, tiny_wan_pipeline

os.environ["HF_HUB_OFFLINE"] = "1"
PROMPTS = ["a red circle to the left of a blue square", "three green triangles"]
SEQ = 16
# family -> (tiny pipeline factory, adapter keyword arguments)
FAMILIES = {
    "flux": (tiny_flux_pipeline, {"max_sequence_length": SEQ}),
    "sana": (tiny_sana_pipeline, {"max_sequence_length": SEQ}),
    "wan": (tiny_wan_pipeline, {"max_sequence_length": SEQ, "num_frames": 9}),
}


def _adapter(family, pipe, **kw):
    return load_adapter_class(family)(pipe, resolution=32, **{**FAMILIES[family][1], **kw})


def _pipe_images(family, pipe, adapter, guidance, **kw):
    latents = torch.cat([step_noise(mix_seed(7, i), -1, 1, adapter.latent_shape) for i in range(len(PROMPTS))])
    if family == "flux":
        latents = adapter.pack(latents)
    if family == "wan":
        kw["num_frames"] = adapter.num_frames
    out = pipe(PROMPTS, num_inference_steps=4, latents=latents, height=32, width=32, output_type="pt",
               max_sequence_length=adapter.max_sequence_length, guidance_scale=guidance, **kw)
    return out.frames if family == "wan" else out.images


@pytest.mark.parametrize("family, guidance, kw", [
    ("flux", 3.5, {}),  # FLUX.1-dev: guidance embedding, one pass
    ("sana", 4.5, {}),  # classifier-free guidance, unconditional prompt without the instruction
    ("wan", 4.5, {}),  # video: [n, F, 3, H, W]
])
def test_ode_sampler_reproduces_the_family_pipeline(family, guidance, kw):
    pipe = FAMILIES[family][0]()
    adapter = _adapter(family, pipe)
    ours = sample(adapter, PROMPTS, seed=7, steps=4, guidance=guidance)
    torch.testing.assert_close(ours, _pipe_images(family, pipe, adapter, guidance, **kw), atol=1e-4, rtol=0)
    assert (ours - _pipe_images(family, pipe, adapter, 1.0)).abs().max() > 1e-2  # guidance matters: not vacuous


def test_flux_without_guidance_embedding_runs_true_cfg_like_the_pipeline():
    pipe = tiny_flux_pipeline(guidance_embeds=False)
    adapter = _adapter("flux", pipe)
    ours = sample(adapter, PROMPTS, seed=7, steps=4, guidance=3.0)
    theirs = _pipe_images("flux", pipe, adapter, 1.0, negative_prompt=["", ""], true_cfg_scale=3.0)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_wan22_runs_each_step_through_the_expert_of_its_timestep():
    pipe = tiny_wan_pipeline(two_experts=True)
    adapter = _adapter("wan", pipe, guidance_scale_2=2.0)
    ours = sample(adapter, PROMPTS, seed=7, steps=4, guidance=4.5)
    assert ours.shape == (2, 9, 3, 32, 32)
    torch.testing.assert_close(ours, _pipe_images("wan", pipe, adapter, 4.5, guidance_scale_2=2.0), atol=1e-4, rtol=0)
    one_expert = tiny_wan_pipeline(two_experts=False)  # the same high-noise expert (same seed), no second one
    assert (ours - sample(_adapter("wan", one_expert), PROMPTS, seed=7, steps=4, guidance=4.5)).abs().max() > 1e-3
    sigma = adapter.sigmas(4)[:-1]
    assert ((sigma * 1000 >= 875) == torch.tensor([True, False, False, False])).all()  # 1 high-noise step, 3 low


def test_wan_rejects_frame_counts_its_vae_cannot_take():
    with pytest.raises(ValueError, match="4k \\+ 1"):
        _adapter("wan", tiny_wan_pipeline(), num_frames=8)


def test_wan22_lora_covers_both_experts_and_exports_both(tmp_path):
    adapter = _adapter("wan", tiny_wan_pipeline(two_experts=True))
    adapter.add_lora(4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    params = adapter.trainable_parameters()
    assert {id(p) for p in params} & {id(p) for p in adapter.pipe.transformer_2.parameters()}
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
    state = adapter.trained_state_dict()
    assert any(k.startswith("transformer_2.") for k in state) and any(not k.startswith("transformer_2.") for k in state)
    adapter.save_lora(str(tmp_path / "lora"))
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "lora" / "transformer_2" / "pytorch_lora_weights.safetensors").is_file()
    fresh = _adapter("wan", tiny_wan_pipeline(two_experts=True))
    fresh.add_lora(4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    fresh.load_trained_state_dict(state)
    for k, v in fresh.trained_state_dict().items():
        assert torch.equal(v, state[k])


def test_flux_pack_and_unpack_are_the_pipelines_and_inverse():
    pipe = tiny_flux_pipeline()
    adapter = _adapter("flux", pipe)
    x = torch.randn(2, *adapter.latent_shape)
    tokens = adapter.pack(x)
    assert tokens.shape == (2, 16 * 16, 16)
    torch.testing.assert_close(adapter.unpack(tokens), pipe._unpack_latents(tokens, 32, 32, pipe.vae_scale_factor))
    assert torch.equal(adapter.unpack(tokens), x)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_run(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    FAMILIES[family][0]().save_pretrained(str(root / "model"))
    cfg = load_config(str(ROOT / "configs" / "tiny_shapes_tree.yaml"),
                      TINY + [f"model.family={family}", f"model.path={root / 'model'}", "model.resolution=32",
                              "train.steps=1", "train.lr=0.05", BRIGHT]
                      + (["model.num_frames=9"] if family == "wan" else []))
    train(cfg, out=str(root / "run"))
    return family, root


def test_one_rl_iteration_through_the_shared_trainer(family_run):
    _, root = family_run
    m = json.loads((root / "run" / "metrics.jsonl").read_text())
    assert m["first_ratio_dev"] == 0.0  # exactly on policy before the first update
    assert m["trained_edges"] > 0
    from safetensors.torch import load_file

    lora = load_file(str(root / "run" / "checkpoint-000001" / "lora.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)


def test_lora_export_loads_into_the_plain_diffusers_pipeline(family_run):
    family, root = family_run
    model, lora = str(root / "model"), str(root / "run" / "lora")
    frames = {"num_frames": 9} if family == "wan" else {}
    ours = sample(load_for_inference(model, lora, family=family, resolution=32, **frames), PROMPTS, seed=7, steps=4,
                  guidance=4.5)
    adapter = load_adapter_class(family).from_pretrained(model, resolution=32, **frames)
    pipe = adapter.pipe
    base = _pipe_images(family, pipe, adapter, 4.5)
    pipe.load_lora_weights(lora)
    theirs = _pipe_images(family, pipe, adapter, 4.5)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (base - theirs).abs().max() > 1e-3  # the LoRA really changes the samples


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradient_checkpointing_gives_the_same_lora_gradients(family):
    adapter = _adapter(family, FAMILIES[family][0]())
    adapter.add_lora(4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))  # lora_B starts at 0: make every LoRA path carry gradient
    x = torch.randn(2, *adapter.latent_shape)
    sigma, cond = torch.tensor([0.7, 0.4]), adapter.encode(PROMPTS)

    def grads():
        for p in adapter.trainable_parameters():
            p.grad = None
        adapter.velocity(x, sigma, cond, 2.0).square().mean().backward()
        return [p.grad.clone() for p in adapter.trainable_parameters()]

    plain = grads()
    adapter.enable_gradient_checkpointing()
    assert all(m.gradient_checkpointing for m in adapter.denoisers.values())
    checkpointed = grads()
    assert any(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family, extra", [("flux", []), ("wan", ["--num-frames", "9"])])
def test_cli_sample_takes_family_resolution_and_frames(tmp_path, family, extra):
    from PIL import Image

    from diffrl.cli import main

    FAMILIES[family][0]().save_pretrained(str(tmp_path / "model"))
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(tmp_path / "model"), "--family", family, "--resolution", "32",
                 "--prompt", "three green triangles", "--num", "2", "--steps", "3", "--out", str(out), *extra]) == 0
    assert Image.open(out).size[0] >= 2 * 32  # two samples side by side (upscaled)


def test_cli_eval_scores_the_middle_frame_of_videos(tmp_path, capsys):
    from diffrl.cli import main

    tiny_wan_pipeline().save_pretrained(str(tmp_path / "model"))
    assert main(["eval", "--model", str(tmp_path / "model"), "--family", "wan", "--resolution", "32",
                 "--num-frames", "9", "--n", "2", "--steps", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == 0.0  # random weights


def _embedded_tokens(family, adapter, x):
    """Tokens the denoiser really sees for latents ``x``, counted through the family's own patch embedding."""
    t = adapter.transformer
    if family == "flux":
        return adapter.pack(x).shape[1]
    if family == "wan":
        return t.patch_embedding(x).flatten(2).shape[2]
    return t.patch_embed(x).shape[1]  # [B, N, D]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sequence_length_is_the_number_of_tokens_the_transformer_sees(family):
    adapter = _adapter(family, FAMILIES[family][0]())
    x = torch.zeros(1, *adapter.latent_shape)
    assert adapter.sequence_length == _embedded_tokens(family, adapter, x)


def test_tokens_per_batch_caps_the_samples_per_forward():
    from diffrl.trainer import batch_size

    cfg = load_config(None, ["train.minibatch=16", "train.tokens_per_batch=1000"])
    assert batch_size(cfg, 64) == 7  # 1000 // (64 tokens x 2 CFG passes)
    assert batch_size(load_config(None, ["train.minibatch=16", "train.tokens_per_batch=1000",
                                         "sampler.guidance_scale=1.0"]), 64) == 15
    assert batch_size(cfg, 4000) == 1  # one sample is always taken
    assert batch_size(load_config(None, ["train.minibatch=4", "train.tokens_per_batch=1000"]), 8) == 4


def test_offload_moves_encoders_and_vae_to_the_device_only_while_they_work(monkeypatch):
    pipe = tiny_wan_pipeline()
    adapter = _adapter("wan", pipe)
    plain = sample(adapter, PROMPTS, seed=3, steps=2, guidance=4.5)
    moves = []
    original = torch.nn.Module.to

    def spy(module, *args, **kwargs):
        for name in ("text_encoder", "vae"):
            if module is getattr(pipe, name):
                moves.append((name, str(args[0])))
        return original(module, *args, **kwargs)

    adapter._prompt_cache.clear()
    adapter.enable_offload()
    monkeypatch.setattr(torch.nn.Module, "to", spy)
    offloaded = sample(adapter, PROMPTS, seed=3, steps=2, guidance=4.5)
    torch.testing.assert_close(offloaded, plain)
    # to the device and back (the device is the CPU here): the encoder for the prompts, then for CFG's empty prompt;
    # the VAE for the one decode
    assert moves == [("text_encoder", "cpu")] * 4 + [("vae", "cpu")] * 2
    moves.clear()
    sample(adapter, PROMPTS, seed=3, steps=2, guidance=4.5)
    assert moves == [("vae", "cpu")] * 2  # cached prompt embeddings: the encoder stays on the CPU


def test_wan22_lora_loaded_for_inference_reproduces_the_trained_policy(tmp_path):
    """Both experts' LoRAs load (``load_lora``, what ``diffrl sample/eval/guide --lora`` call): the samples equal
    the trained adapter's; with the second expert's folder dropped they do not."""
    import shutil

    adapter = _adapter("wan", tiny_wan_pipeline(two_experts=True))
    adapter.add_lora(4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for i, p in enumerate(adapter.trainable_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    adapter.save_lora(str(tmp_path / "lora"))
    trained = sample(adapter, PROMPTS, 3, 4, 4.5)
    fresh = _adapter("wan", tiny_wan_pipeline(two_experts=True))
    fresh.load_lora(str(tmp_path / "lora"))
    torch.testing.assert_close(sample(fresh, PROMPTS, 3, 4, 4.5), trained, rtol=1e-4, atol=1e-5)
    shutil.rmtree(tmp_path / "lora" / "transformer_2")
    one = _adapter("wan", tiny_wan_pipeline(two_experts=True))
    one.load_lora(str(tmp_path / "lora"))
    assert (sample(one, PROMPTS, 3, 4, 4.5) - trained).abs().max() > 1e-3
