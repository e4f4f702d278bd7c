"""Features reachable from a config, each changing exactly what it should in a real run of the tiny model: width and
depth pruning, path-probability reward fusion, the single GDPO, GRPO-Guard's ratio normalisation; and the
contract keys run one step of the shipped configs."""
import json
import math

import pytest
import torch

from diffrl import trainer
from diffrl.advantages import gdpo_advantages
from diffrl.config import ConfigError, load_config
from diffrl.trainer import train
from tests_helpers import BRIGHT, MODEL, ROOT, TINY

TREE = str(ROOT / "configs" / "tiny_shapes_tree.yaml")
MAIN = str(ROOT / "configs" / "tiny_shapes.yaml")
TWO_REWARDS = "rewards={shapes_partial: 1.0, 'tests_helpers:brightness': 0.5}"


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# TINY's tree: 4 steps, one split at step 1 into 2: per tree the edges are root -> a (step 0, depth 1), a -> b1, b2
# (step 1, depth 2), then one chain per leaf for steps 2 and 3 (depths 3 and 4): 1 + 2 + 2 + 2 = 7 edges.
@pytest.mark.parametrize("pruning, per_tree", [
    ("{}", 7),
    ("{width: topk, width_ratio: 0.5}", 5),  # after the split only the better chain: steps 2, 3 lose one edge each
    ("{depths: [4]}", 5),  # the last step's two edges
    ("{width: topk, depths: [4]}", 4),  # step 2 keeps one edge, step 3 none
    ("{width: best_worst, width_ratio: 1.0}", 7),  # best and worst of two leaves: both
    ("{width: topk, depths: [4], until: 0.0}", 7),  # pruning over before step 0
])
def test_pruning_trains_the_hand_counted_edges(pruning, per_tree, tmp_path):
    train(load_config(TREE, [*TINY, BRIGHT, "train.steps=1", f"train.pruning={pruning}"]), out=str(tmp_path))
    assert metrics(tmp_path)[0]["trained_edges"] == 2 * per_tree  # 2 prompts, one tree each


def test_a_sliding_depth_window_moves_one_depth_per_interval(tmp_path):
    """depths [2], interval 1, stop 1: the first step prunes depth 2 (the split's 2 edges), the second depth 1 (the
    root's edge), the third stays at depth 1."""
    train(load_config(TREE, [*TINY, BRIGHT, "train.steps=3",
                             "train.pruning={depths: [2], depth_interval: 1, depth_stop: 1}"]), out=str(tmp_path))
    assert [m["trained_edges"] for m in metrics(tmp_path)] == [2 * 5, 2 * 6, 2 * 6]


def _one_step(cfg, tmp_path):
    run = trainer.build(cfg, tmp_path)
    batch = trainer.collect(run, 0)
    leaf_r, valid, scores = trainer.score(run, batch)
    return run, batch, leaf_r, valid, scores


def test_path_prob_fusion_through_the_trainer_equals_a_hand_worked_example(tmp_path):
    """Two trees of one prompt, split at steps 0 and 1 (4 leaves each): a depth-1 node's value is its two leaves'
    rewards weighted by the softmax of their edges' log-probs; depth-1 advantages are the z-scores of the four
    depth-1 values over both trees (the depth-2 leaves: of their 8 rewards)."""
    cfg = load_config(TREE, [*TINY, BRIGHT, "train.prompts_per_step=1", "train.trees_per_prompt=2",
                             "sampler.split_steps=[0, 1]", "train.tree_fusion=path_prob", "train.adv_clip=100"])
    run, batch, leaf_r, valid, scores = _one_step(cfg, tmp_path)
    adv, mask = trainer.advantage(run, batch, leaf_r, valid, 0, scores)
    tr = batch.rollout.transitions
    lp = {(int(t), int(c)): float(v) for t, c, v in zip(tr.tree, tr.child, tr.log_prob)}
    sched = run.schedule
    fused = {}
    for t in range(2):
        for i, node in enumerate(sched.step_nodes[1].tolist()):  # the depth-1 nodes (they split at step 1)
            kids = sched.step_children[1].reshape(-1, 2)[i].tolist()
            w = [math.exp(lp[(t, c)]) for c in kids]
            r = [float(leaf_r[t, int(sched.leaf_matrix[c].float().argmax())]) for c in kids]  # each kid's one leaf
            fused[(t, node)] = sum(wi * ri for wi, ri in zip(w, r)) / sum(w)
    vals = list(fused.values())
    mean = sum(vals) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 4)
    for e in range(len(tr.step)):
        if int(tr.step[e]) == 0:
            expected = (fused[(int(tr.tree[e]), int(tr.child[e]))] - mean) / (std + 1e-8)
            assert float(adv[e]) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    mean_fused = load_config(TREE, [*TINY, BRIGHT, "train.prompts_per_step=1", "train.trees_per_prompt=2",
                                    "sampler.split_steps=[0, 1]", "train.adv_clip=100"])
    run.cfg = mean_fused
    adv_mean, _ = trainer.advantage(run, batch, leaf_r, valid, 0, scores)
    assert not torch.allclose(adv[tr.step == 0], adv_mean[tr.step == 0])  # the fusion changed the depth-1 values


def test_gdpo_is_the_libraries_gdpo_advantage_on_the_same_rewards(tmp_path):
    cfg = load_config(MAIN, [*TINY, TWO_REWARDS, "sampler.split_steps=[]", "train.trees_per_prompt=4",
                             "train.reward_aggregation=gdpo"])
    run, batch, leaf_r, valid, scores = _one_step(cfg, tmp_path)
    adv, mask = trainer.advantage(run, batch, leaf_r, valid, 0, scores)
    groups = trainer._prompt_groups(batch.all_prompts, leaf_r.device).repeat_interleave(run.schedule.num_leaves)
    expected = gdpo_advantages(scores, groups, cfg.rewards)
    torch.testing.assert_close(adv.flatten(), expected)
    assert float(expected.std()) > 0.5  # batch-renormalised: unit spread, not the raw rewards


def test_a_per_leaf_objective_on_trees_trains_the_depth_wise_advantages_of_its_leaves(tmp_path):
    """nft with ``advantage: tree``: a leaf's advantage is its value's z-score among its prompt's leaves (the leaves'
    depth), by hand from the rewards."""
    cfg = load_config(TREE, [*TINY, BRIGHT, "train.objective=nft", "train.advantage=tree", "train.adv_clip=100"])
    run, batch, leaf_r, valid, scores = _one_step(cfg, tmp_path)
    adv, mask = trainer.advantage(run, batch, leaf_r, valid, 0, scores)
    assert adv.shape == leaf_r.shape and mask.all()
    mean, std = leaf_r.mean(1, keepdim=True), leaf_r.std(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(adv, (leaf_r - mean) / (std + 1e-8), rtol=1e-4, atol=1e-5)


def test_an_estimator_added_to_the_registry_is_what_the_trainer_uses(tmp_path, monkeypatch):
    """The seam: a new ``advantages.ESTIMATORS`` entry is a valid ``train.advantage`` and its node advantages are the
    ones the edges train with (each edge the child's)."""
    from diffrl import advantages

    monkeypatch.setitem(advantages.ESTIMATORS, "depth", lambda leaves, trees: trees.schedule.depth.float().expand(
        len(leaves.groups), -1).to(leaves.values.device))
    cfg = load_config(TREE, [*TINY, BRIGHT, "train.advantage=depth", "train.adv_clip=100"])
    run, batch, leaf_r, valid, scores = _one_step(cfg, tmp_path)
    adv, _ = trainer.advantage(run, batch, leaf_r, valid, 0, scores)
    torch.testing.assert_close(adv, batch.rollout.transitions.depth.float())


@pytest.mark.parametrize("overrides", [
    ["train.advantage=rloo", "explore.enabled=true", "explore.candidates=2", "explore.keep=2"],
    ["model.family=tests_helpers:TwoStreamSD3", "train.advantage=tree",
     "train.reward_routing={'tests_helpers:brightness': [video, audio]}"],
], ids=["rloo-with-exploration", "routing-with-tree-advantages"])
def test_pairs_the_seams_made_compose_run_one_step(overrides, tmp_path):
    train(load_config(TREE, [*TINY, BRIGHT, "train.steps=1", *overrides]), out=str(tmp_path))
    m = metrics(tmp_path)[0]
    assert m["trained_edges"] > 0 and m["first_ratio_dev"] == 0.0


def test_gdpo_logs_the_reward_not_its_advantage(tmp_path):
    train(load_config(TREE, [*TINY, TWO_REWARDS, "train.steps=1", "train.reward_aggregation=gdpo"]), out=str(tmp_path))
    m = metrics(tmp_path)[0]
    assert m["reward_mean"] == pytest.approx(m["reward_shapes_partial"] + 0.5 * m["reward_tests_helpers:brightness"])


def test_ratio_norm_rescales_the_log_ratio_as_grpo_guard_says(tmp_path):
    """GRPO-Guard's RatioNorm multiplies the (bias-corrected) log-ratio by the step's std s < 1, so the spread of
    the second update's log-ratio, approx_kl = mean(log_ratio^2) / 2, shrinks; the first ratio stays exactly 1."""
    stats = {}
    for norm in ("false", "true"):
        out = tmp_path / norm
        train(load_config(TREE, [*TINY, BRIGHT, "train.steps=1", "train.updates_per_epoch=2", "train.lr=1e-2",
                                 f"train.ratio_norm={norm}"]), out=str(out))
        stats[norm] = metrics(out)[0]
    assert stats["true"]["first_ratio_dev"] < 1e-6 and stats["false"]["first_ratio_dev"] < 1e-6
    assert 0 < stats["true"]["approx_kl"] < 0.5 * stats["false"]["approx_kl"]
    with pytest.raises(ConfigError, match="'train.ratio_norm' normalises the clipped ratio"):
        load_config(MAIN, ["train.ratio_norm=true"])


@pytest.mark.parametrize("config, key", [
    (MAIN, "train.objective=awm"), (MAIN, "train.objective=nft"), (TREE, "train.objective=ppo"),
    (TREE, "train.tree_fusion=path_prob"), (TREE, "train.tree_fusion=mean"),
    (TREE, "train.pruning={width: best_worst, depths: [9]}"), (TREE, "train.ratio_norm=true"),
    (TREE, "train.ratio_norm=false"), (MAIN, "train.reward_aggregation=gdpo"), (TREE, "train.reward_aggregation=sum"),
])
def test_the_contract_keys_run_one_step_of_the_shipped_configs(config, key, tmp_path):
    """``diffrl train CONFIG train.steps=1 train.prompts_per_step=4 KEY`` (the held-out set cut to 4 prompts and the
    evaluation to 4 steps, to keep CI short)."""
    from diffrl import cli

    code = cli.main(["train", config, "--out", str(tmp_path / "r"), f"model.path={MODEL}", "train.steps=1",
                     "train.prompts_per_step=4", key, "data.eval_size=4", "sampler.eval_steps=4",
                     "log.tensorboard=false", "log.sample_every=0"])
    assert code == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "finished"


def test_flow_grpo_kl_convention_weighs_each_step_s_kl_by_its_dsigma(tmp_path):
    """Same run, same updates: Flow-GRPO's convention logs the exact KL scaled by each step's |dsigma| < 1."""
    kl = {}
    for convention in ("exact", "flow_grpo"):
        out = tmp_path / convention
        train(load_config(TREE, [*TINY, BRIGHT, "train.steps=1", "train.updates_per_epoch=2", "train.lr=1e-2",
                                 f"train.kl_convention={convention}"]), out=str(out))
        kl[convention] = metrics(out)[0]["kl"]
    assert 0 < kl["flow_grpo"] < 0.9 * kl["exact"]
    with pytest.raises(ConfigError, match="'train.kl_convention' scales the per-step Gaussian KL of ppo"):
        load_config(MAIN, ["train.kl_convention=flow_grpo"])


def test_a_progressive_sde_window_moves_the_stochastic_and_trained_steps(tmp_path):
    """MixGRPO's progressive window of 2 of 4 steps, moving every RL step: the rollouts' stochastic steps and the
    trained steps are [0, 2), [1, 3), [2, 4), then back at [0, 2); the metrics log each window."""
    from diffrl.schedule import mix_window_start

    cfg = load_config(MAIN, [*TINY, BRIGHT, "sampler.split_steps=[]", "train.trees_per_prompt=2",
                             "sampler.sde_window=[0, 2]", "sampler.window_schedule=progressive",
                             "sampler.window_steps=1", "train.steps=4"])
    run = trainer.build(cfg, tmp_path / "pieces")
    run.cfg.train.objective = "ppo"  # per-edge masks, to read the trained steps
    for step in range(4):
        start = mix_window_start(step, 4, 2, strategy="progressive", iters_per_move=1)
        assert start == [0, 1, 2, 0][step]
        batch = trainer.collect(run, step)
        tr = batch.rollout.transitions
        assert sorted(set(tr.step[tr.stochastic].tolist())) == [start, start + 1]
        mask = trainer._train_mask(run, batch, step)
        assert sorted(set(tr.step[mask].tolist())) == [start, start + 1]
    train(cfg, out=str(tmp_path / "run"))
    assert [m["sde_window"] for m in metrics(tmp_path / "run")] == [[0, 2], [1, 2], [2, 2], [0, 2]]
    with pytest.raises(ConfigError, match="'sampler.window_schedule' progressive moves 'sampler.sde_window'"):
        load_config(TREE, ["sampler.window_schedule=progressive"])


MATRIX = [(r, o, a, e) for r in ("tree", "flat") for o in ("ppo", "nft", "awm") for a in ("sum", "gdpo")
          for e in (False, True)]


@pytest.mark.slow
@pytest.mark.parametrize("rollout, objective, aggregation, explore", MATRIX,
                         ids=["-".join(map(str, m)) for m in MATRIX])
def test_every_combination_runs_one_step_or_is_refused_in_one_sentence(rollout, objective, aggregation, explore,
                                                                      tmp_path, capsys):
    """{tree, flat} x {clipped-ratio, NFT, AWM} x {sum, gdpo} x {exploration off, on}: all 24 compose (tree
    rollouts with the depth-wise estimator; the per-leaf objectives train on its leaves' advantages); a refusal
    would have to be one sentence."""
    from diffrl import cli

    args = [*TINY, TWO_REWARDS, "train.steps=1", f"train.objective={objective}",
            f"train.reward_aggregation={aggregation}"]
    if rollout == "flat":
        args += ["sampler.split_steps=[]", "train.trees_per_prompt=2", "train.advantage=grpo"]
    else:
        args += ["train.advantage=tree"]
    if explore:
        args += ["explore.enabled=true", "explore.candidates=2", "explore.keep=2", "train.trees_per_prompt=1"]
    code = cli.main(["train", TREE, "--out", str(tmp_path / "r"), *args])
    assert code == 0, capsys.readouterr().err.strip().splitlines()[-1]
    m = metrics(tmp_path / "r")[0]
    assert m["trained_edges"] > 0 and math.isfinite(m["reward_mean"])
