"""The trainer end to end on the shipped tiny model: one iteration, exact on-policy ratio, kill-and-resume,
LoRA export into plain diffrl-free diffusers, bad rewards and bad configs."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from diffrl.config import load_config
from diffrl.trainer import train
from tests_helpers import BRIGHT, MODEL, ROOT, SUBPROCESS_ENV, TINY

os.environ["HF_HUB_OFFLINE"] = "1"


def tiny_cfg(*extra):
    return load_config(str(ROOT / "configs" / "tiny_shapes_tree.yaml"), TINY + list(extra))


def test_one_iteration_updates_the_lora_and_starts_exactly_on_policy(tmp_path):
    summary = train(tiny_cfg("train.steps=1", BRIGHT), out=str(tmp_path))
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1
    m = metrics[0]
    for key in ("step", "reward_mean", "reward_std", "kl", "clip_frac", "lr", "rollout_s", "train_s", "nfe"):
        assert key in m
    assert m["first_ratio_dev"] == 0.0  # every ratio exactly 1 before the first update
    assert m["nfe"] == 2 * (1 + 1 + 2 + 2)  # two trees of TreeSchedule(4, [1])
    for key in ("base_accuracy", "final_accuracy", "wall_s", "steps"):
        assert key in summary
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "config.yaml").is_file()
    from safetensors.torch import load_file

    lora = load_file(str(tmp_path / "checkpoint-000001" / "lora.safetensors"))
    ups = [v for k, v in lora.items() if "lora_B" in k]
    assert ups and any(v.abs().sum() > 0 for v in ups)  # lora_B starts at zero: the update moved it


@pytest.mark.parametrize("advantage", ["grpo", "tree"])
@pytest.mark.parametrize("reward", ["tests_helpers:brightness", "tests_helpers:darkness"])
def test_repeated_updates_on_one_batch_raise_its_clipped_objective_for_the_reward_asked(tmp_path, reward, advantage):
    """Policy-gradient direction end to end (rollout -> reward -> advantage -> loss -> LoRA), for a reward and its
    negation, with leaf GRPO advantages and the depth-wise tree advantages: updates on one batch raise the batch's
    clipped surrogate mean(min(r A, clip(r) A)) from its on-policy value, and the log-ratios they leave correlate
    positively with the edges' advantages (better-than-average transitions became likelier). A flipped sign
    anywhere lowers both; an update that ignores the advantages leaves them near zero.

    (Re-rolling the batch's own seeds and comparing their brightness is not a test of this: on one batch of 16
    samples that is the score-function estimate's noise, and it pointed the wrong way on the v5 base for both
    rewards; on fresh batches of 64 samples the held-out brightness moved the right way for both.)"""
    from diffrl import trainer
    from diffrl.update import optimize

    cfg = tiny_cfg(f"rewards={{'{reward}': 1.0}}", "train.prompts_per_step=4", "train.lr=1e-3", "train.kl_weight=0",
                   f"train.advantage={advantage}")
    run = trainer.build(cfg, tmp_path)
    batch = trainer.collect(run, 0)
    leaf_r, valid, scores = trainer.score(run, batch)
    adv, mask = trainer.advantage(run, batch, leaf_r, valid, 0, scores)
    first = optimize(run, batch, adv, mask)
    for _ in range(3):
        last = optimize(run, batch, adv, mask)
    log_ratio, a = _log_ratios(run, batch, mask), adv[mask]
    assert first["ratio_dev"] == 0.0 and float(log_ratio.abs().mean()) > 1e-3  # on policy, then the updates moved it
    assert float(torch.corrcoef(torch.stack([log_ratio, a]))[0, 1]) > 0.5  # 0.96-0.98 measured on v5
    # an update moving every edge's log-ratio by the mean size, each along its advantage's sign, would lower the
    # surrogate by mean|A| mean|log r|; these lower it by about half of that
    assert first["policy_loss"] - last["policy_loss"] > 0.25 * float(a.abs().mean() * log_ratio.abs().mean())


def _log_ratios(run, batch, mask) -> torch.Tensor:
    """log pi_now(x_next | x) - log pi_rollout(x_next | x) of the batch's trained edges ``[E_trained]``."""
    from diffrl.sde import sde_step

    tr, s, ad = batch.rollout.transitions, run.cfg.sampler, run.adapter
    edges = mask.nonzero().flatten()
    cond = {k: v[tr.tree[edges]] for k, v in ad.encode(batch.prompts).items()}
    with torch.no_grad():
        v = ad.velocity(tr.x[edges], tr.sigma[edges], cond, s.guidance_scale)
        out = sde_step(tr.x[edges], v, tr.sigma[edges], tr.sigma_next[edges], x_next=tr.x_next[edges], kind=s.kind,
                       noise_level=s.noise_level, noise_scale=tr.noise_scale[edges])
    return out.log_prob - tr.log_prob[edges]


def test_the_main_job_recipe_trains_nft_on_flat_chains_and_only_its_lora_targets(tmp_path):
    """configs/tiny_shapes.yaml itself at a tiny budget (its objective, flat groups and LoRA targets kept): one
    DiffusionNFT update exactly on policy, every valid leaf trained, LoRA pairs only on the modulation pathway and the
    output projection, and the update moved them."""
    from safetensors.torch import load_file

    cfg = load_config(str(ROOT / "configs" / "tiny_shapes.yaml"), [
        f"model.path={MODEL}", "sampler.num_steps=4", "sampler.eval_steps=4", "train.prompts_per_step=2",
        "train.trees_per_prompt=2", "data.eval_size=4", "log.eval_every=0", "log.sample_every=0",
        "log.tensorboard=false", "train.steps=1", BRIGHT])
    assert (cfg.train.objective, cfg.train.advantage, cfg.sampler.split_steps) == ("nft", "grpo", [])
    train(cfg, out=str(tmp_path))
    m = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert m["old_dev"] == 0.0 and m["trained_edges"] == 4  # 2 prompts x 2 chains
    lora = load_file(str(tmp_path / "checkpoint-000001" / "lora.safetensors"))
    modules = {k.split(".lora_")[0] for k in lora}
    assert modules and all(("time_text_embed" in k) or k.endswith(("norm_out.linear", "proj_out")) for k in modules)
    assert any("timestep_embedder" in k for k in modules) and any("text_embedder" in k for k in modules)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)


def test_updates_per_epoch_takes_one_optimizer_step_per_group_of_trees(tmp_path):
    from diffrl import checkpoint

    train(tiny_cfg("train.steps=1", "train.updates_per_epoch=2", "train.inner_epochs=2", BRIGHT), out=str(tmp_path))
    _, optimizer, _ = checkpoint.load(checkpoint.latest(tmp_path))
    assert {float(s["step"]) for s in optimizer["state"].values()} == {4.0}  # 2 epochs x 2 groups of trees
    m = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert m["first_ratio_dev"] < 1e-5  # the first group starts on policy (its batches differ from the rollout's)
    assert m["approx_kl"] > 0  # the second group's ratios saw the first group's update


def test_nft_updates_fit_the_positive_leaves_and_unfit_the_negative_ones(tmp_path):
    """DiffusionNFT direction end to end: after three updates on one batch, the model reconstructs the clean latents
    of the leaves with positive advantage better (flow-matching error at the same noisy points falls) and those
    with negative advantage worse."""
    from diffrl import trainer, update

    cfg = tiny_cfg("rewards={'tests_helpers:brightness': 1.0}", "train.prompts_per_step=4", "train.lr=3e-3",
                   "train.kl_weight=0", "train.advantage=grpo", "train.objective=nft", "sampler.timestep_fraction=1.0")
    run = trainer.build(cfg, tmp_path)
    batch = trainer.collect(run, 0)
    leaf_r, valid, scores = trainer.score(run, batch)
    adv, mask = trainer.advantage(run, batch, leaf_r, valid, 0, scores)
    leaf, sigma, eps = update.nft_points(run, batch, mask, 0)
    x0 = batch.rollout.leaves.flatten(0, 1)[leaf]
    cond = {k: v[leaf // mask.shape[1]] for k, v in run.adapter.encode(batch.prompts).items()}
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps

    def error():
        with torch.no_grad():
            v = run.adapter.velocity(x_t, sigma, cond, cfg.sampler.guidance_scale)
        return (x_t - s * v - x0).square().flatten(1).mean(1)

    before = error()
    for _ in range(3):
        trainer.optimize(run, batch, adv, mask, 0)
    change, a = error() - before, adv.flatten()[leaf]
    assert change[a > 0].mean() < 0 < change[a < 0].mean()


def test_nft_starts_on_policy_and_later_updates_score_against_the_rollout_policy(tmp_path):
    """DiffusionNFT: one update per step trains exactly at v_old (old_dev 0); with 2 epochs x 2 groups the later
    updates recompute v_old with the rollout-time LoRA while the trained one has moved (old_dev > 0), 4 AdamW steps."""
    from diffrl import checkpoint

    nft = ("train.objective=nft", "train.advantage=grpo", "sampler.timestep_fraction=0.5")
    train(tiny_cfg("train.steps=1", BRIGHT, *nft), out=str(tmp_path / "one"))
    m = json.loads((tmp_path / "one" / "metrics.jsonl").read_text())
    assert m["old_dev"] == 0.0 and m["trained_edges"] == 4  # 2 trees x 2 leaves, every leaf valid
    train(tiny_cfg("train.steps=1", "train.updates_per_epoch=2", "train.inner_epochs=2", BRIGHT, *nft),
          out=str(tmp_path / "four"))
    _, optimizer, _ = checkpoint.load(checkpoint.latest(tmp_path / "four"))
    assert {float(s["step"]) for s in optimizer["state"].values()} == {4.0}
    assert json.loads((tmp_path / "four" / "metrics.jsonl").read_text())["old_dev"] > 0


def test_bf16_weights_train_with_fp32_lora_and_log_prob_math(tmp_path):
    import torch

    from diffrl import trainer

    cfg = tiny_cfg("train.steps=1", "model.dtype=bfloat16", BRIGHT)
    run = trainer.build(cfg, tmp_path / "probe")
    dtypes = {n: p.dtype for n, p in run.adapter.transformer.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    batch = trainer.collect(run, 0)
    assert batch.rollout.transitions.log_prob.dtype == torch.float32
    train(cfg, out=str(tmp_path / "run"))
    m = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert m["first_ratio_dev"] == 0.0 and m["trained_edges"] > 0


MAIN_JOB_TARGETS = "model.lora_targets=[linear_1,linear_2,norm_out.linear,proj_out]"


@pytest.mark.parametrize("targets", ["model.lora_targets=[to_q,to_k,to_v,to_out.0]", MAIN_JOB_TARGETS])
def test_lora_export_loads_into_a_plain_diffusers_pipeline(tmp_path, targets):
    """The attention LoRA of the tree recipe and the main job's LoRA on the modulation pathway and output both."""
    from diffusers import StableDiffusion3Pipeline

    from diffrl.inference import load_for_inference, sample
    from diffrl.seeding import mix_seed, step_noise

    train(tiny_cfg("train.steps=1", "train.lr=0.05", BRIGHT, targets), out=str(tmp_path))
    prompts = ["a red circle to the left of a blue square", "three green triangles"]
    ours = sample(load_for_inference(MODEL, str(tmp_path / "lora")), prompts, seed=7, steps=6, guidance=4.5)
    pipe = StableDiffusion3Pipeline.from_pretrained(MODEL)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    latents = torch.cat([step_noise(mix_seed(7, i), -1, 1, (4, 32, 32)) for i in range(2)])
    theirs = pipe(prompts, num_inference_steps=6, guidance_scale=4.5, latents=latents, height=32, width=32,
                  output_type="pt", max_sequence_length=16).images
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)
    base = StableDiffusion3Pipeline.from_pretrained(MODEL)(prompts, num_inference_steps=6, guidance_scale=4.5,
                                                           latents=latents, height=32, width=32, output_type="pt",
                                                           max_sequence_length=16).images
    assert (base - theirs).abs().max() > 1e-2  # the LoRA really changes the samples


def _metrics(run_dir):
    drop = ("rollout_s", "train_s")
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_run_killed_mid_step_resumes_to_the_same_metrics(tmp_path):
    args = TINY + ["train.steps=4", "log.checkpoint_every=1", "train.lr_schedule=cosine", "train.warmup_steps=1",
                   BRIGHT]
    cmd = [sys.executable, "-m", "diffrl", "train", str(ROOT / "configs" / "tiny_shapes_tree.yaml"), *args]
    subprocess.run(cmd + ["--out", str(tmp_path / "a")], check=True, capture_output=True, timeout=600,
                   env=SUBPROCESS_ENV)
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "b")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=SUBPROCESS_ENV)
    deadline = time.time() + 600
    while not (tmp_path / "b" / "checkpoint-000002").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # now somewhere inside step 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "b" / "run.lock").exists()  # the killed run's lock is left behind; resume sees it is stale
    subprocess.run(cmd + ["--out", str(tmp_path / "b"), "--resume"], check=True, capture_output=True, timeout=600,
                   env=SUBPROCESS_ENV)
    assert not (tmp_path / "b" / "run.lock").exists()
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    assert len(_metrics(tmp_path / "b")) == 4
    lr = load_config(str(ROOT / "configs" / "tiny_shapes_tree.yaml"), args).train.lr
    assert [m["lr"] for m in _metrics(tmp_path / "b")] == pytest.approx([lr / 2, lr, 0.75 * lr, 0.25 * lr])


def test_a_reward_that_fails_on_one_sample_drops_it_and_the_run_continues(tmp_path, caplog, monkeypatch):
    (tmp_path / "flaky_reward.py").write_text(
        "import math, torch\n"
        "from rewards.shapes import shapes_reward\n"
        "def reward(media, prompts):\n"
        "    out = shapes_reward(media, prompts)['partial']\n"
        "    out[0] = math.nan\n"
        "    return {'partial': out}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tiny_cfg("train.steps=1", "rewards={'flaky_reward:reward': 1.0}")
    train(cfg, out=str(tmp_path / "run"))
    m = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert m["invalid"] == 1 and m["trained_edges"] > 0
    assert "reward 'flaky_reward:reward' gave nan for prompt" in caplog.text


def test_cli_config_errors_are_one_sentence_before_any_model_loads(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\nmodel:\n  path: /nonexistent/model\n")
    out = subprocess.run([sys.executable, "-m", "diffrl", "train", str(bad)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert f"{bad}: unknown key 'train.stepz' (did you mean 'train.steps'?)" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("after_out", [False, True], ids=["override-first", "override-after-out"])
def test_cli_missing_model_path_is_one_sentence(tmp_path, after_out):
    """The override is read wherever it stands: argparse stops collecting positionals at --out."""
    override, out_flag = ["model.path=/nonexistent/model"], ["--out", str(tmp_path)]
    args = out_flag + override if after_out else override + out_flag
    out = subprocess.run([sys.executable, "-m", "diffrl", "train", str(ROOT / "configs" / "tiny_shapes_tree.yaml"),
                          *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "model path '/nonexistent/model' does not exist" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_stray_flags_are_still_an_error(capsys):
    from diffrl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", str(ROOT / "configs" / "tiny_shapes_tree.yaml"), "--out", "x", "--stepz", "3"])
    assert e.value.code == 2 and "unrecognized arguments: --stepz 3" in capsys.readouterr().err


def test_chunked_rollouts_scored_in_the_background_match_one_batch(tmp_path):
    from diffrl.trainer import build, collect, score

    results = []
    for chunks in (1, 3):
        cfg = tiny_cfg(f"train.rollout_chunks={chunks}", "train.prompts_per_step=3", BRIGHT)
        run = build(cfg, tmp_path / str(chunks))
        batch = collect(run, 0)
        assert len(batch.pending_scores) == (0 if chunks == 1 else 3)
        leaf_r, valid, _ = score(run, batch)
        results.append((batch, leaf_r, valid))
    (b1, r1, v1), (b3, r3, v3) = results
    assert b1.rollout.nfe == b3.rollout.nfe
    assert torch.equal(b1.rollout.transitions.tree.sort().values, b3.rollout.transitions.tree.sort().values)
    # Same seeds, other batch sizes: matmul rounding (~1e-6) grows through the steps and CFG 4.5 to ~2e-4 at most.
    torch.testing.assert_close(b3.rollout.leaves, b1.rollout.leaves, atol=1e-3, rtol=0)
    torch.testing.assert_close(r3, r1, atol=1e-4, rtol=0)
    assert v1.all() and v3.all()


def test_reward_routing_trains_each_stream_with_its_own_advantage(tmp_path):
    """Per-stream log-probs (OmniNFT modality routing), at the first update where every ratio is 1: routing the reward
    to both streams gives the plain GRPO gradient (the streams' D_m / D-weighted losses add up to the whole-latent
    one), and the gradients of the reward routed to each stream alone add up to it."""
    from diffrl import trainer

    cfg = tiny_cfg(BRIGHT, "model.family=tests_helpers:TwoStreamSD3", "train.advantage=grpo", "train.kl_weight=0",
                   "train.max_grad_norm=1e9", "train.prompts_per_step=4")
    run = trainer.build(cfg, tmp_path)
    batch = trainer.collect(run, 0)
    leaf_r, valid, scores = trainer.score(run, batch)
    saved = run.adapter.trained_state_dict()

    def gradient(routing):
        run.cfg.train.reward_routing = routing
        adv, mask = trainer.advantage(run, batch, leaf_r, valid, 0, scores)
        run.adapter.load_trained_state_dict(saved)
        stats = trainer.optimize(run, batch, adv, mask)
        assert stats["ratio_dev"] == 0.0
        return torch.cat([p.grad.flatten() for p in run.adapter.trainable_parameters()])

    plain = gradient({})
    both = gradient({"tests_helpers:brightness": ["video", "audio"]})
    video, audio = gradient({"tests_helpers:brightness": ["video"]}), gradient({"tests_helpers:brightness": ["audio"]})
    tol = 1e-4 * float(plain.abs().max())
    torch.testing.assert_close(both, plain, rtol=1e-4, atol=tol)
    torch.testing.assert_close(video + audio, both, rtol=1e-4, atol=tol)
    assert video.abs().sum() > 0 and audio.abs().sum() > 0 and not torch.allclose(video, audio)


def test_reward_routing_to_a_stream_the_model_lacks_is_one_sentence(tmp_path):
    from diffrl import trainer
    from diffrl.config import ConfigError

    cfg = tiny_cfg(BRIGHT, "train.advantage=grpo", "train.reward_routing={'tests_helpers:brightness': [audio]}")
    with pytest.raises(ConfigError, match=r"routes rewards to \['audio'\], but the sd3 model's latent streams are one"):
        trainer.build(cfg, tmp_path)


def test_held_out_evaluation_draws_eval_seeds_samples_per_prompt(tmp_path, monkeypatch):
    """data.eval_seeds = 3: every held-out prompt is sampled three times, each from its own seed (the sampler gives
    sample i the seed mix_seed(999, i)), so the accuracy is over eval_size x 3 samples; 0 is a config error."""
    from diffrl import inference, trainer

    run = trainer.build(tiny_cfg("data.eval_seeds=3"), tmp_path)
    seen = []
    real = inference.sample

    def spy(adapter, prompts, seed, *args, **kwargs):
        seen.append(list(prompts))
        return real(adapter, prompts, seed, *args, **kwargs)

    monkeypatch.setattr(inference, "sample", spy)
    trainer.evaluate(run)
    assert seen == [run.eval_prompts * 3] and len(run.eval_prompts) == 4
    with pytest.raises(Exception, match=r"'data.eval_seeds' must be a finite number in \[1, 1000\]"):
        tiny_cfg("data.eval_seeds=0")


def test_exclude_eval_false_trains_on_the_evaluation_prompts(tmp_path):
    """One prompt as both training and evaluation file: held out (the default), nothing is left to train on and the
    error says so; with data.exclude_eval=false the run trains on exactly that prompt."""
    from diffrl import trainer
    from diffrl.prompts import PromptError

    one = tmp_path / "one.txt"
    one.write_text("two red circles\n")
    files = [f"data.prompts={one}", f"data.eval_prompts={one}", "data.eval_size=1"]
    with pytest.raises(PromptError, match="no prompts left once the held-out ones are excluded"):
        trainer.build(tiny_cfg(*files), tmp_path / "a").prompts.at(0, 2)
    run = trainer.build(tiny_cfg(*files, "data.exclude_eval=false"), tmp_path / "b")
    assert run.prompts.at(0, 2) == ["two red circles"] * 2 and run.eval_prompts == ["two red circles"]


def test_held_out_prompt_files_in_the_grammar_are_scored_by_the_strict_verifier(tmp_path, monkeypatch):
    """A held-out prompt file whose every line is a shapes-grammar prompt is scored like the generated ones (the
    verifier's strict score, per kind); one line outside the grammar and the first reward's mean is used instead."""
    from diffrl import inference, trainer
    from rewards.shapes import shapes_reward

    images = torch.rand(2, 3, 32, 32)
    monkeypatch.setattr(inference, "sample", lambda adapter, prompts, *a, **k: images[: len(prompts)])
    two = ("data.eval_size=2", "data.eval_seeds=1", "data.exclude_eval=false")
    grammar = tmp_path / "grammar.txt"
    grammar.write_text("two red circles\na blue square above a green triangle\n")
    run = trainer.build(tiny_cfg(f"data.eval_prompts={grammar}", *two), tmp_path / "a")
    strict = shapes_reward(images, run.eval_prompts)["strict"]
    assert trainer.evaluate(run) == {"accuracy": float(strict.mean()), "accuracy_count": float(strict[0]),
                                     "accuracy_relation": float(strict[1])}
    free = tmp_path / "free.txt"
    free.write_text("two red circles\na photo of a cat\n")
    run = trainer.build(tiny_cfg(f"data.eval_prompts={free}", *two, BRIGHT), tmp_path / "b")
    assert trainer.evaluate(run) == {"accuracy": pytest.approx(float(images.flatten(1).mean()))}
