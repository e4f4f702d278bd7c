"""Reward hacking: guard rewards scored beside training and never trained on, the alarm's rule (hand-worked sequences
and bounded noise), its actions (rollback restores the checkpoint's weights exactly and goes on with the new setting;
stop exports the checkpoint at the guard's best), the min/mean ensembles, groupwise rewards (one group per call, its
scores reach the advantages), and the resolution warning."""
import json
import math
import random

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import tests_helpers
from diffrl import checkpoint, cli, trainer
from diffrl.advantages import AGGREGATIONS
from diffrl.config import ConfigError, load_config
from diffrl.guards import SEED_STRIDE
from diffrl.hacking import HackingAlarm, export_step
from rewards.pairwise import win_rates
from tests_helpers import BRIGHT, MODEL, ROOT, TINY

TREE = str(ROOT / "configs" / "tiny_shapes_tree.yaml")
MAIN = str(ROOT / "configs" / "tiny_shapes.yaml")
SCRIPTED = "tests_helpers:scripted_guard"


@pytest.fixture(autouse=True)
def _reset_helpers():
    tests_helpers.GUARD["value"] = 1.0
    tests_helpers.GROUPS.clear()


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------------ the rule
def test_the_alarm_fires_on_a_hand_worked_drop():
    """0.6 for 20 steps, then 0.3; window 5, threshold 0.1: the window means are 0.6 up to step 20, 0.54 at step 21
    (a drop of 0.06) and 0.48 at step 22 (0.12 > 0.1), so it fires at step 22, best 0.6 last reached at step 20;
    that window scored the policies of checkpoints 15-19, so the return step is the middle one, 17."""
    alarm = HackingAlarm({"g": 0.1}, "absolute", window=5)
    fired = [alarm.observe(step, {"g": (0.6 if step <= 20 else 0.3, 0.0)}) for step in range(1, 31)]
    firing = [(step, a) for step, a in zip(range(1, 31), fired) if a is not None]
    assert len(firing) == 1  # once per running best, not once a step
    step, a = firing[0]
    assert step == 22 and a.best == pytest.approx(0.6) and a.best_step == 20 and a.current == pytest.approx(0.48)
    assert a.return_step == 17
    assert a.recent[22] == 0.3 and a.recent[20] == 0.6
    assert alarm.return_step() == 17


def test_patience_waits_for_consecutive_steps_past_the_threshold():
    """Window 1, threshold 0.1, patience 2: one low step (0.45 after 0.6) is forgiven, two in a row fire."""
    alarm = HackingAlarm({"g": 0.1}, "absolute", window=1, patience=2)
    values = [0.6, 0.45, 0.6, 0.45, 0.45, 0.45]
    fired = [alarm.observe(i + 1, {"g": (v, 0.0)}) for i, v in enumerate(values)]
    assert [i + 1 for i, a in enumerate(fired) if a is not None] == [5]


def test_bounded_noise_below_the_threshold_never_fires_and_a_drop_past_it_does():
    """Uniform noise in [-a, a] around a level, a = 0.45 x threshold: every window mean lies within a of the level, so
    best minus current is at most 2a < threshold whatever the run length; then a drop of 1.5 x threshold fires."""
    threshold, rng = 0.1, random.Random(0)
    for seed in range(5):
        rng.seed(seed)
        alarm = HackingAlarm({"g": threshold}, "absolute", window=3)
        noise = [0.5 + rng.uniform(-0.45, 0.45) * threshold for _ in range(2000)]
        assert all(alarm.observe(i, {"g": (v, 0.01)}) is None for i, v in enumerate(noise))
        dropped = [alarm.observe(2000 + i, {"g": (0.5 - 1.5 * threshold, 0.01)}) for i in range(3)]
        assert any(a is not None for a in dropped)  # by the time the window holds only the drop


def test_in_standard_errors_the_rule_scales_with_the_guard_s_spread():
    """units stderr, threshold 3, window 1: the same drop of 0.1 fires when the standard errors are 0.01 (0.1 > 3 x
    sqrt(2) x 0.01 = 0.042) and not when they are 0.05 (3 x sqrt(2) x 0.05 = 0.21)."""
    for se, fires in ((0.01, True), (0.05, False)):
        alarm = HackingAlarm({"g": 3.0}, "stderr", window=1)
        alarm.observe(1, {"g": (0.6, se)})
        assert (alarm.observe(2, {"g": (0.5, se)}) is not None) == fires


def test_gaussian_noise_of_the_stated_standard_error_stays_quiet_at_6_standard_errors():
    """Per-step means drawn around a level with exactly their stated standard error, 300 steps, 20 seeds: a
    threshold of 6 standard errors (window 5, patience 2) never fires (the running best is the maximum of many noisy
    window means, so smaller thresholds do: ``bench_reward_hacking.py --false-alarms``); the same rule fires within
    7 steps (a window and the patience) of a drop of 10 standard errors of the difference."""
    se, window = 0.02, 5
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        alarm = HackingAlarm({"g": 6.0}, "stderr", window=window, patience=2)
        draws = (0.5 + se * torch.randn(300, generator=g)).tolist()
        assert all(alarm.observe(i, {"g": (v, se)}) is None for i, v in enumerate(draws)), seed
        drop = 0.5 - 10 * se / math.sqrt(window) * math.sqrt(2)
        late = [alarm.observe(300 + i, {"g": (drop, se)}) for i in range(window + 2)]
        assert any(a is not None for a in late), seed


def test_a_stop_exports_the_newest_evaluation_within_the_threshold_of_the_best():
    """Held-out evaluations 0.40 (step 0), 0.50 (5), 0.45 (10), 0.20 (15), threshold 0.08: the best is 0.50; 0.45
    is 0.05 below it (within), 0.40 and 0.20 are not, so the stop exports step 10 (step 5 when it stops at step 9).
    In standard errors (0.02 each, so sqrt(2) * 0.02 = 0.028 per unit): 1 unit leaves 0.45 out (step 5), 4 units
    (0.113) let 0.40 in but not 0.20 (step 10). A guard no evaluation scored: None (the alarm's return step)."""
    evals = [{"step": s, "guard_g": v, "guard_g_se": 0.02} for s, v in ((0, 0.40), (5, 0.50), (10, 0.45), (15, 0.20))]
    assert export_step(evals, "g", 0.08, "absolute", 15) == 10
    assert export_step(evals, "g", 0.08, "absolute", 9) == 5
    assert export_step(evals, "g", 1.0, "stderr", 15) == 5
    assert export_step(evals, "g", 4.0, "stderr", 15) == 10
    assert export_step(evals, "other", 0.08, "absolute", 15) is None
    assert export_step(evals, "g", 0.08, "absolute", 15, since=6) == 10  # after a rollback to step 6
    assert export_step(evals, "g", 0.08, "absolute", 15, since=11) == 15
    alarm = HackingAlarm({"g": 0.08, "h": 0.1})
    assert alarm.export_steps(evals, 15) == [10]  # h has no evaluations


def test_the_alarm_s_state_round_trips():
    a = HackingAlarm({"g": 0.1}, window=2)
    for i, v in enumerate([0.5, 0.7, 0.6]):
        a.observe(i + 1, {"g": (v, 0.01)})
    b = HackingAlarm({"g": 0.1}, window=2)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.observe(4, {"g": (0.4, 0.01)}) is not None and a.observe(4, {"g": (0.4, 0.01)}) is not None


# ------------------------------------------------------------------------------------------------ the ensembles
def test_min_and_mean_aggregations_by_hand():
    """Two rewards on one tree of three leaves, weights 1 and 2: mean = (a + 2b) / 3, min = min(a, 2b); the invalid
    leaf takes its group's mean valid value."""
    a, b = torch.tensor([[0.9, 0.2, 0.5]]), torch.tensor([[0.1, 0.4, 0.0]])
    valid, groups = torch.tensor([[True, True, False]]), torch.tensor([0])
    mean = AGGREGATIONS["mean"]({"a": a, "b": b}, {"a": 1.0, "b": 2.0}, valid, groups).values
    low = AGGREGATIONS["min"]({"a": a, "b": b}, {"a": 1.0, "b": 2.0}, valid, groups).values
    assert mean.tolist()[0][:2] == pytest.approx([(0.9 + 0.2) / 3, (0.2 + 0.8) / 3])
    assert mean[0, 2] == pytest.approx((mean[0, 0] + mean[0, 1]) / 2)
    assert low.tolist()[0][:2] == pytest.approx([0.2, 0.2]) and low[0, 2] == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="mean divides by the sum of the reward weights"):
        load_config(MAIN, ["train.reward_aggregation=mean", "rewards={shapes: 1.0, shapes_partial: -1.0}"])


def test_pairwise_win_rates_by_hand():
    """Scores [0.2, 0.5, 0.5, 0.9]: 0.2 beats nobody (0), each 0.5 beats 0.2 and ties the other ((1 + 0.5) / 3),
    0.9 beats all three (1); a group of one is 0.5."""
    assert win_rates(torch.tensor([0.2, 0.5, 0.5, 0.9])).tolist() == pytest.approx([0.0, 0.5, 0.5, 1.0])
    assert win_rates(torch.tensor([3.0])).tolist() == [0.5]


# ------------------------------------------------------------------------------------------ guards in the trainer
def test_the_contract_guard_is_logged_plotted_and_never_trained_on(tmp_path):
    """``diffrl train ... 'train.guard_rewards={"shapes": 1.0}'``: metrics.jsonl carries the guard's per-step mean
    under a key naming it, the evaluations carry it too, curves.png gains the guard panel, and the run trains
    exactly what the same run without the guard trains (same rewards, same exported LoRA)."""
    args = [*TINY, BRIGHT, "train.steps=2"]
    for name, extra in (("plain", []), ("guarded", ['train.guard_rewards={"shapes": 1.0}'])):
        assert cli.main(["train", TREE, "--out", str(tmp_path / name), *args, *extra]) == 0
    plain, guarded = metrics(tmp_path / "plain"), metrics(tmp_path / "guarded")
    for m in guarded:
        assert 0.0 <= m["guard_shapes"] <= 1.0 and m["guard_shapes_se"] >= 0.0
    drop = ("rollout_s", "train_s")
    assert [{k: v for k, v in m.items() if not k.startswith("guard_") and k not in drop} for m in guarded] == \
        [{k: v for k, v in m.items() if k not in drop} for m in plain]
    a, b = (load_file(str(tmp_path / r / "lora" / "pytorch_lora_weights.safetensors")) for r in ("plain", "guarded"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((tmp_path / "guarded" / "summary.json").read_text())
    assert all("guard_shapes" in e for e in summary["evals"]) and summary["guard"]["rollbacks"] == 0
    heights = [Image.open(tmp_path / r / "curves.png").size[1] for r in ("plain", "guarded")]
    assert heights[1] > heights[0]  # the guard panel


def _guarded(action: str, *extra: str):
    return load_config(TREE, [*TINY, BRIGHT, "train.steps=4", "log.checkpoint_every=1", "train.kl_weight=0.01",
                              f"train.guard_rewards={{'{SCRIPTED}': 1.0}}",
                              f"train.guard.thresholds={{'{SCRIPTED}': 0.5}}", "train.guard.window=1",
                              f"train.guard.action={action}", *extra])


def test_rollback_restores_the_checkpoint_s_weights_exactly_and_goes_on_with_the_new_setting(tmp_path):
    """The guard scores 1 until step 2, then 0 at step 3: the alarm fires at step 3 (best 1 at step 2, which scored
    the policy of checkpoint 1), the run returns to checkpoint-000001 (weights, optimizer, history), halves the
    learning rate, doubles the KL weight, moves the seed on and trains steps 2 to 4 again; a resume from the last
    checkpoint keeps the new setting."""
    cfg = _guarded("rollback", "train.guard.kl_factor=2")
    lr = cfg.train.lr
    run = trainer.build(cfg, tmp_path)
    state = trainer.begin(run, False)
    seen, restored = [], {}

    def on_step(s):
        seen.append((s.step, run.guards.rollbacks))
        if s.step == 2 and run.guards.rollbacks == 0:
            tests_helpers.GUARD["value"] = 0.0  # step 3's rollouts score 0
        elif run.guards.rollbacks == 1 and tests_helpers.GUARD["value"] == 0.0:
            restored["now"] = {k: v.clone() for k, v in run.adapter.trained_state_dict().items()}
            restored["saved"] = load_file(str(tmp_path / "checkpoint-000001" / "lora.safetensors"))
            tests_helpers.GUARD["value"] = 1.0

    assert trainer.loop(run, state, on_step) is None
    assert seen == [(1, 0), (2, 0), (1, 1), (2, 1), (3, 1), (4, 1)]
    now, saved = restored["now"], restored["saved"]
    assert now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4]
    assert [m["lr"] for m in metrics(tmp_path)] == pytest.approx([lr, lr / 2, lr / 2, lr / 2])
    assert run.cfg.train.kl_weight == pytest.approx(0.02)
    (event,) = [json.loads(x) for x in (tmp_path / "guard_events.jsonl").read_text().splitlines()]
    assert event["action"] == "rollback" and event["restored"] == "checkpoint-000001" and event["step"] == 3
    assert event["best_step"] == 2 and event["return_step"] == 1
    assert event["best"] == 1.0 and event["current"] == 0.0 and event["lr"] == pytest.approx(lr / 2)
    assert [m["step"] for m in event["abandoned"]] == [2, 3] and set(event["reward_mean"]) == {"2", "3"}

    again = trainer.build(_guarded("rollback", "train.guard.kl_factor=2"), tmp_path / "again")  # as --resume does
    trainer.restore(again, checkpoint.latest(tmp_path), rewrite_metrics=False)
    assert again.guards.rollbacks == 1 and again.cfg.train.lr == pytest.approx(lr / 2)
    assert again.cfg.train.kl_weight == pytest.approx(0.02)
    assert again.cfg.train.seed == _guarded("rollback").train.seed + SEED_STRIDE  # new samples after a rollback


def test_stop_exports_the_checkpoint_at_the_guard_s_best(tmp_path):
    """The same drop with ``action: stop``: the run ends at step 3 and the weights it exports are checkpoint-000001's
    (the policy that scored the best value), which the checkpoint pruning kept."""
    cfg = _guarded("stop")
    run = trainer.build(cfg, tmp_path)
    state = trainer.begin(run, False)

    def on_step(s):
        if s.step == 2:
            tests_helpers.GUARD["value"] = 0.0

    stopped = trainer.loop(run, state, on_step)
    assert stopped["exported_step"] == 1 and "fell from its best 1.0000 (step 2)" in stopped["reason"]
    saved = load_file(str(tmp_path / "checkpoint-000001" / "lora.safetensors"))
    now = run.adapter.trained_state_dict()
    assert all(torch.equal(now[k], saved[k]) for k in saved)
    summary = trainer.finish(run, state, 0.0, stopped)
    assert summary["status"] == "stopped_by_guard" and summary["steps"] == 3 and summary["exported_step"] == 1


def test_with_evaluations_a_stop_exports_the_newest_checkpoint_the_held_out_guard_calls_as_good(tmp_path):
    """Evaluations every step; the guard scores 1 up to step 4 and 0 after (rollouts and evaluations alike); window 4,
    threshold 0.5: the window means fall to 0.75, 0.5, 0.25, so the alarm fires at step 7 (return step 2). The
    evaluations say 1 up to step 4 and 0 after, so the stop exports checkpoint-000004, which the pruning (2 newest)
    kept, and its final evaluation is the one step 4's evaluation recorded."""
    run = trainer.build(_guarded("stop", "train.steps=9", "train.guard.window=4", "log.eval_every=1"), tmp_path)
    state = trainer.begin(run, False)

    def on_step(s):
        if s.step == 4:
            tests_helpers.GUARD["value"] = 0.0

    stopped = trainer.loop(run, state, on_step)
    (event,) = [json.loads(x) for x in (tmp_path / "guard_events.jsonl").read_text().splitlines()]
    assert (event["step"], event["best_step"], event["return_step"]) == (7, 4, 2)
    assert event["restored"] == "checkpoint-000004" and stopped["exported_step"] == 4
    assert [e["guard_tests_helpers:scripted_guard"] for e in state.evals] == [1, 1, 1, 1, 1, 0, 0, 0]
    saved = load_file(str(tmp_path / "checkpoint-000004" / "lora.safetensors"))
    now = run.adapter.trained_state_dict()
    assert all(torch.equal(now[k], saved[k]) for k in saved)
    at_four = state.evals[4]["accuracy"]
    summary = trainer.finish(run, state, 0.0, stopped)
    assert summary["exported_step"] == 4 and summary["final_accuracy"] == at_four


def test_an_alarm_after_a_rollback_returns_no_further_back_than_the_checkpoint_rolled_back_to(tmp_path):
    """The guard drops at step 3 and stays down: the run rolls back to checkpoint-000001, whose saved alarm state has
    its best at step 1 (natural return step 0, a checkpoint pruned at step 2), so the next drop, at the repeated
    step 2, fires again; with the rollbacks used up it stops, at checkpoint-000001 (the floor), not at a missing
    checkpoint."""
    run = trainer.build(_guarded("rollback", "train.guard.max_rollbacks=1"), tmp_path)
    state = trainer.begin(run, False)

    def on_step(s):
        if s.step == 2 and run.guards.rollbacks == 0:
            tests_helpers.GUARD["value"] = 0.0

    stopped = trainer.loop(run, state, on_step)
    first, second = [json.loads(x) for x in (tmp_path / "guard_events.jsonl").read_text().splitlines()]
    assert (first["action"], first["step"], first["restored"]) == ("rollback", 3, "checkpoint-000001")
    assert (second["action"], second["step"], second["best_step"]) == ("stop", 2, 1)
    assert second["return_step"] == 1 and second["restored"] == "checkpoint-000001" and stopped["exported_step"] == 1
    assert not (tmp_path / "checkpoint-000000").exists()  # the natural return step's checkpoint is gone


def test_a_stop_after_a_rollback_exports_no_further_back_than_the_checkpoint_rolled_back_to(tmp_path):
    """Evaluations every step; the guard scores 1.0 (base), 0.4, 1.0, 0.0 at steps 0-3: the alarm fires at step 3
    and rolls back to checkpoint 1 (return step of the best, step 2); checkpoint 0 was pruned at step 2 (the held-out
    choice was step 2 by then). The repeated step 2 scores -1: the next alarm stops. Of the evaluations the best is
    the base's, but a stop exports no further back than the rollback went: checkpoint 1 (it crashed on the missing
    checkpoint 0 before)."""
    run = trainer.build(_guarded("rollback", "train.guard.max_rollbacks=1", "log.eval_every=1"), tmp_path)
    state = trainer.begin(run, False)
    tests_helpers.GUARD["value"] = 0.4

    def on_step(s):
        after = {1: 1.0, 2: 0.0} if run.guards.rollbacks == 0 else {1: -1.0}
        tests_helpers.GUARD["value"] = after.get(s.step, tests_helpers.GUARD["value"])

    stopped = trainer.loop(run, state, on_step)
    first, second = [json.loads(x) for x in (tmp_path / "guard_events.jsonl").read_text().splitlines()]
    assert (first["action"], first["step"], first["restored"]) == ("rollback", 3, "checkpoint-000001")
    assert (second["action"], second["step"]) == ("stop", 2)
    assert [e["step"] for e in state.evals] == [0, 1, 2]
    assert [e["guard_tests_helpers:scripted_guard"] for e in state.evals] == pytest.approx([1.0, 0.4, -1.0])
    assert second["restored"] == "checkpoint-000001" and stopped["exported_step"] == 1
    assert not (tmp_path / "checkpoint-000000").exists()


def test_warn_logs_the_evidence_and_trains_on(tmp_path):
    cfg = _guarded("warn")
    run = trainer.build(cfg, tmp_path)
    state = trainer.begin(run, False)
    trainer.loop(run, state, lambda s: tests_helpers.GUARD.update(value=0.0) if s.step == 2 else None)
    assert state.step == 4 and not (tmp_path / "checkpoint-000000").exists()
    (event,) = [json.loads(x) for x in (tmp_path / "guard_events.jsonl").read_text().splitlines()]
    assert event["action"] == "warn" and event["guard_values"] == {"2": 1.0, "3": 0.0}


@pytest.mark.parametrize("overrides, message", [
    (["train.guard.thresholds={shapes: 0.1}"], "'train.guard.thresholds.shapes' names no guard"),
    (['train.guard_rewards={"shapes": 1.0}', "train.guard.action=rollback"], "set 'train.guard.thresholds'"),
    (['train.guard_rewards={"shapes": 1.0}', "train.guard.thresholds={shapes: 0.1}", "train.guard.action=rollback",
      "train.guard.lr_factor=1"], "would replay the same drop"),
    (['train.guard_rewards={"shapez": 1.0}'], "unknown reward 'train.guard_rewards.shapez'"),
    (['train.guard_rewards={"shapes": 1.0}', "train.guard.units=sigma"], "'train.guard.units' must be one of"),
])
def test_guard_config_errors_are_one_sentence(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(MAIN, overrides)


# ---------------------------------------------------------------------------------------------- groupwise rewards
def test_a_groupwise_reward_gets_one_group_per_call_and_its_scores_reach_the_advantages(tmp_path):
    """Flat chains, 4 per prompt, 2 prompts, rolled out in 2 background-scored chunks: the groupwise reward is called
    once per prompt with that prompt's 4 samples, and the saved advantages are each group's z-score of what it
    returned ((s - mean) / (population std + 1e-4), by hand)."""
    cfg = load_config(MAIN, [*TINY, "rewards={'tests_helpers:recording_group_reward': 1.0}", "train.steps=1",
                             "sampler.split_steps=[]", "train.trees_per_prompt=4", "train.rollout_chunks=2",
                             "train.objective=nft", "train.advantage=grpo", "log.save_advantages=true"])
    trainer.train(cfg, out=str(tmp_path))
    training = [g for g in tests_helpers.GROUPS if g[0] == 4]
    assert len(training) == 2 and all(n == 4 for n, _, _ in tests_helpers.GROUPS)
    assert len({p for _, p, _ in training}) == 2
    adv = load_file(str(tmp_path / "advantages_step00001.safetensors"))["node_advantages"]
    for i, (_, _, s) in enumerate(training):
        s = s.double()
        expected = (s - s.mean()) / (s.std(unbiased=False) + 1e-4)
        torch.testing.assert_close(adv[4 * i : 4 * i + 4, -1].double(), expected, atol=1e-4, rtol=0)


def test_the_pairwise_reward_scores_win_rates_within_each_group(tmp_path):
    """``rewards: {pairwise: 1}`` with its base reward's options: one training step, and every group's rewards are
    win rates (each group of 4 sums to 4 x 3 / 2 / 3 = 2)."""
    out = tmp_path / "r"
    assert cli.main(["train", MAIN, "--out", str(out), *TINY, "rewards={pairwise: 1.0}",
                     "reward_options={pairwise: {base: 'tests_helpers:brightness'}}", "train.steps=1",
                     "sampler.split_steps=[]", "train.trees_per_prompt=4", "log.save_advantages=true"]) == 0
    m = metrics(out)[0]
    assert m["reward_mean"] == pytest.approx(0.5)  # win rates average 1/2 in every group


def test_training_below_the_native_resolution_warns(tmp_path, caplog):
    """The tiny SD3 model's native size is 32 px (sample size 32 x VAE factor 1): training at 16 px warns once."""
    cfg = load_config(MAIN, [*TINY, "model.resolution=16", "train.steps=1", f"model.path={MODEL}"])
    with caplog.at_level("WARNING", logger="diffrl"):
        trainer.build(cfg, tmp_path)
    assert sum("below sd3's native 32 px" in r.getMessage() for r in caplog.records) == 1
