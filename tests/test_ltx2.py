"""LTX-2 joint audio-video on a tiny random LTX2Pipeline built in code (tests/tiny_ltx2.py): our ODE sampler is the
pipeline's own for both streams, and one RL iteration routes a video reward to the video stream and an audio
reward to the audio stream through the shared trainer, exactly on policy, with a LoRA that loads back into the
plain pipeline."""
import json
import os

import pytest
import torch

from diffrl.adapters.ltx2 import LTX2Adapter
from diffrl.config import load_config
from diffrl.inference import load_for_inference, sample
from diffrl.seeding import mix_seed, step_noise
from diffrl.trainer import train
from tests_helpers import ROOT, TINY
from tiny_ltx2 import FAST_CALL, tiny_ltx2_pipeline

os.environ["HF_HUB_OFFLINE"] = "1"
PROMPTS = ["a red circle to the left of a blue square", "three green triangles"]
SHAPE = dict(resolution=64, num_frames=9)


def _pipe_media(pipe, adapter, guidance, audio_guidance):
    x = torch.cat([step_noise(mix_seed(7, i), -1, 1, adapter.latent_shape) for i in range(len(PROMPTS))])
    xv, xa = adapter.split(x)
    a = pipe.audio_vae
    audio_in = xa * a.latents_std + a.latents_mean  # the pipeline normalises given audio latents
    return pipe(PROMPTS, num_frames=9, height=64, width=64, num_inference_steps=3, latents=xv, audio_latents=audio_in,
                output_type="pt", return_dict=False,
                **dict(FAST_CALL, guidance_scale=guidance, audio_guidance_scale=audio_guidance))


def test_streams_tile_the_latent_and_the_schedule_is_the_pipelines():
    adapter = LTX2Adapter(tiny_ltx2_pipeline(), max_sequence_length=16, **SHAPE)
    v, a = adapter.streams["video"], adapter.streams["audio"]
    assert v.start == 0 and v.stop == a.start and a.stop == adapter.latent_shape[0]
    xv, xa = adapter.split(torch.zeros(1, *adapter.latent_shape))
    assert xv.shape == (1, 2 * 2 * 2, 8) and xa.shape[1] == round(9 * 25 / 24)  # F' H' W' tokens; L = F/fps x 25/s
    assert adapter.sigmas(3)[-2] == pytest.approx(0.1) and adapter.sigmas(3)[-1] == 0  # shift_terminal, then 0


@pytest.mark.parametrize("guidance, audio_guidance", [(1.0, 1.0), (3.0, 7.0)])
def test_ode_sampler_reproduces_the_pipeline_video_and_audio(guidance, audio_guidance):
    pipe = tiny_ltx2_pipeline()
    adapter = LTX2Adapter(pipe, max_sequence_length=16, audio_guidance_scale=audio_guidance, **SHAPE)
    ours = sample(adapter, PROMPTS, seed=7, steps=3, guidance=guidance)
    video, audio = _pipe_media(pipe, adapter, guidance, audio_guidance)
    torch.testing.assert_close(ours["video"], video, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours["audio"], audio, atol=1e-4, rtol=0)
    assert ours["fps"] == 24.0 and ours["sample_rate"] == pipe.vocoder.config.output_sampling_rate
    if guidance != 1.0:  # guidance matters for both streams: the check is not vacuous
        plain_video, plain_audio = _pipe_media(pipe, adapter, 1.0, 1.0)
        assert (ours["video"] - plain_video).abs().max() > 1e-3 and (ours["audio"] - plain_audio).abs().max() > 1e-6


def test_one_rl_iteration_routes_each_reward_to_its_stream_and_exports_the_lora(tmp_path):
    tiny_ltx2_pipeline().save_pretrained(str(tmp_path / "model"))
    routing = "train.reward_routing={'tests_helpers:video_brightness': [video], 'tests_helpers:loudness': [audio]}"
    cfg = load_config(str(ROOT / "configs" / "tiny_shapes_tree.yaml"), TINY + [
        "model.family=ltx2", f"model.path={tmp_path / 'model'}", "model.resolution=64", "model.num_frames=9",
        "train.steps=1", "train.lr=0.05", "train.advantage=grpo", routing,
        "rewards={'tests_helpers:video_brightness': 1.0, 'tests_helpers:loudness': 1.0}"])
    train(cfg, out=str(tmp_path / "run"))
    m = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert m["first_ratio_dev"] == 0.0 and m["trained_edges"] > 0
    assert m["reward_tests_helpers:loudness"] > 0
    model, lora = str(tmp_path / "model"), str(tmp_path / "run" / "lora")
    ours = sample(load_for_inference(model, lora, family="ltx2", **SHAPE), PROMPTS, seed=7, steps=3, guidance=1.0)
    adapter = LTX2Adapter.from_pretrained(model, **SHAPE)
    base = sample(adapter, PROMPTS, seed=7, steps=3, guidance=1.0)
    adapter.pipe.load_lora_weights(lora)
    theirs = sample(adapter, PROMPTS, seed=7, steps=3, guidance=1.0)
    torch.testing.assert_close(ours["video"], theirs["video"], atol=1e-4, rtol=0)
    assert (base["video"] - theirs["video"]).abs().max() > 1e-4  # the LoRA really changes the samples
