"""Advantages against hand-worked tables."""
import math

import pytest
import torch

from diffrl.advantages import (
    AGGREGATIONS,
    ESTIMATORS,
    LeafValues,
    Trees,
    batch_normalize,
    depthwise_advantages,
    gdpo_advantages,
    group_advantages,
    node_advantages,
    rloo_advantages,
    routed_advantages,
    tree_node_values,
)
from diffrl.tree import TreeSchedule


def test_group_zscore_hand_worked():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    g = torch.tensor([7, 7, 7, 3, 3, 3])
    std = math.sqrt(2 / 3)  # population std of 1, 2, 3
    expected = torch.tensor([-1 / (std + 1e-4), 0.0, 1 / (std + 1e-4), 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(r, g), expected)


def test_group_ids_need_not_be_contiguous_or_sorted():
    r = torch.tensor([1.0, 10.0, 3.0, 20.0])
    a = group_advantages(r, torch.tensor([4, 9, 4, 9]))
    torch.testing.assert_close(a, torch.tensor([-1.0, -1.0, 1.0, 1.0]), atol=1e-3, rtol=0)


def test_global_std_uses_the_whole_batch():
    r = torch.tensor([0.0, 2.0, 10.0, 12.0])
    a = group_advantages(r, torch.tensor([0, 0, 1, 1]), global_std=True, eps=0.0)
    std = torch.tensor([0.0, 2.0, 10.0, 12.0]).std(unbiased=False)
    torch.testing.assert_close(a, torch.tensor([-1.0, 1.0, -1.0, 1.0]) / std)


def test_zero_variance_and_singleton_groups_give_zero_not_nan():
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.3])
    a = group_advantages(r, torch.tensor([0, 0, 0, 1, 2]))
    assert torch.equal(a, torch.zeros(5))
    assert torch.equal(rloo_advantages(r, torch.tensor([0, 0, 0, 1, 2])), torch.zeros(5))


def test_rloo_hand_worked():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 8.0])
    a = rloo_advantages(r, torch.tensor([0, 0, 0, 1, 1]))
    torch.testing.assert_close(a, torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5, 4 - 8.0, 8 - 4.0]))


def test_clip():
    r = torch.tensor([0.0] * 9 + [1.0])
    assert group_advantages(r, torch.zeros(10, dtype=torch.long)).max() > 2.9
    assert group_advantages(r, torch.zeros(10, dtype=torch.long), clip=2.0).max() == 2.0


def small_tree():
    # root 0 -> {1, 2} at step 0; 1 -> {3, 4}, 2 -> {5, 6} at step 1; leaves 3, 4, 5, 6 at depth 2
    return TreeSchedule(2, [0, 1])


def test_tree_mean_fusion_and_depthwise_advantages_hand_worked():
    tree = small_tree()
    assert tree.parent.tolist() == [-1, 0, 0, 1, 1, 2, 2] and tree.leaves.tolist() == [3, 4, 5, 6]
    values = tree_node_values(torch.tensor([[1.0, 3.0, 5.0, 7.0]]), tree)
    torch.testing.assert_close(values, torch.tensor([[4.0, 2.0, 6.0, 1.0, 3.0, 5.0, 7.0]]))
    adv = depthwise_advantages(values, tree)
    s5 = math.sqrt(5.0)  # population std of 1, 3, 5, 7
    expected = torch.tensor([[0.0, -1.0, 1.0, -3 / s5, -1 / s5, 1 / s5, 3 / s5]])
    torch.testing.assert_close(adv, expected)


def test_path_probability_fusion_hand_worked():
    tree = small_tree()
    log_probs = torch.log(torch.tensor([[1.0, 1.0, 3.0, 1.0, 3.0, 2.0, 2.0]]))  # node's log-prob given its parent
    values = tree_node_values(torch.tensor([[1.0, 3.0, 5.0, 7.0]]), tree, fusion="prob", edge_log_probs=log_probs)
    n1 = 0.25 * 1 + 0.75 * 3  # softmax(log 1, log 3) = (1/4, 3/4)
    n2 = 0.5 * 5 + 0.5 * 7
    root = 0.25 * n1 + 0.75 * n2
    torch.testing.assert_close(values, torch.tensor([[root, n1, n2, 1.0, 3.0, 5.0, 7.0]]))


def test_depthwise_groups_trees_of_the_same_prompt_together():
    tree = small_tree()
    values = tree_node_values(torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]]), tree)
    alone = depthwise_advantages(values, tree)
    assert torch.equal(alone, torch.zeros_like(alone))  # each tree constant: no signal, no NaN
    together = depthwise_advantages(values, tree, tree_groups=torch.tensor([0, 0]))
    torch.testing.assert_close(together[:, 0], torch.tensor([-1.0, 1.0]))  # roots compared across the two trees
    torch.testing.assert_close(together[:, 3], torch.tensor([-1.0, 1.0]))


def test_gdpo_keeps_distinctions_that_summed_grpo_collapses():
    """Two binary rewards: GRPO on the sum ties samples 0 and 3; GDPO separates them (GDPO paper's argument)."""
    r = {"format": torch.tensor([1.0, 1.0, 0.0, 0.0]), "correct": torch.tensor([0.0, 0.0, 0.0, 1.0])}
    g = torch.zeros(4, dtype=torch.long)
    summed = group_advantages(r["format"] + r["correct"], g)
    assert summed[0] == summed[3]
    gdpo = gdpo_advantages(r, g, batch_norm=False, eps=0.0)
    z_format = torch.tensor([1.0, 1.0, -1.0, -1.0])
    z_correct = (r["correct"] - 0.25) / math.sqrt(0.1875)
    torch.testing.assert_close(gdpo, z_format + z_correct)
    assert gdpo[3] > gdpo[0]
    bn = gdpo_advantages(r, g)
    assert abs(bn.mean()) < 1e-6 and abs(bn.std(unbiased=False) - 1) < 1e-3


def test_gdpo_weights_and_errors():
    r = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([1.0, 0.0])}
    g = torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(gdpo_advantages(r, g, {"a": 2.0, "b": 1.0}, batch_norm=False, eps=0.0),
                               torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match="unknown \\['c'\\]"):
        gdpo_advantages(r, g, {"a": 1.0, "b": 1.0, "c": 1.0})


FLAT = Trees(TreeSchedule(3))  # one chain per tree: every tree is one leaf, the node of depth 3


@pytest.mark.parametrize("aggregation", ["sum", "gdpo"])
def test_modality_routing_gives_each_stream_the_advantage_of_its_own_rewards(aggregation):
    """Two flat samples of one prompt: video sees aesthetic + sync (sync constant), audio sees audio_q + sync."""
    r = {"aesthetic": torch.tensor([[1.0], [0.0]]), "audio_q": torch.tensor([[0.0], [1.0]]),
         "sync": torch.tensor([[1.0], [1.0]])}
    w, valid, g = {k: 1.0 for k in r}, torch.ones(2, 1, dtype=torch.bool), torch.zeros(2, dtype=torch.long)
    routing = {"aesthetic": ["video"], "audio_q": ["audio"], "sync": ["video", "audio"]}
    out = routed_advantages(r, w, valid, g, FLAT, routing, aggregation=aggregation)
    assert sorted(out) == ["audio", "video"]
    torch.testing.assert_close(out["video"][:, -1], torch.tensor([1.0, -1.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(out["audio"][:, -1], torch.tensor([-1.0, 1.0]), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="not routed"):
        routed_advantages(r, w, valid, g, FLAT, {"aesthetic": ["video"]})


def test_routing_composes_with_the_tree_estimator():
    """One reward routed to a stream through the depth-wise estimator gives exactly the unrouted advantages."""
    tree = Trees(small_tree())
    r = {"a": torch.tensor([[1.0, 3.0, 5.0, 7.0]]), "b": torch.tensor([[0.0, 1.0, 0.0, 0.0]])}
    valid, g = torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, dtype=torch.long)
    out = routed_advantages(r, {"a": 2.0, "b": 1.0}, valid, g, tree, {"a": ["video"], "b": ["audio"]},
                            estimator="tree")
    s5 = math.sqrt(5.0)
    torch.testing.assert_close(out["video"], torch.tensor([[0.0, -1.0, 1.0, -3 / s5, -1 / s5, 1 / s5, 3 / s5]]))
    torch.testing.assert_close(out["audio"], node_advantages({"b": r["b"]}, {"b": 1.0}, valid, g, tree,
                                                             estimator="tree"))


def test_every_registered_estimator_and_aggregation_by_hand():
    """Four flat samples of one prompt, the last one's reward failed (invalid): it moves no statistic and gets 0."""
    values = torch.tensor([[1.0], [2.0], [6.0], [100.0]])
    valid = torch.tensor([[True], [True], [True], [False]])
    g = torch.zeros(4, dtype=torch.long)
    leaves = AGGREGATIONS["sum"]({"r": values}, {"r": 1.0}, valid, g)
    torch.testing.assert_close(leaves.values.flatten(), torch.tensor([1.0, 2.0, 6.0, 3.0]))  # group mean filled in
    std = math.sqrt(14 / 3)  # population std of 1, 2, 6 (mean 3)
    torch.testing.assert_close(ESTIMATORS["grpo"](leaves, FLAT)[:, -1],
                               torch.tensor([-2.0, -1.0, 3.0, 0.0]) / (std + 1e-4))
    torch.testing.assert_close(ESTIMATORS["rloo"](leaves, FLAT)[:, -1], torch.tensor([-3.0, -1.5, 4.5, 0.0]))
    torch.testing.assert_close(ESTIMATORS["tree"](leaves, FLAT)[:, -1], torch.tensor([-2.0, -1.0, 3.0, 0.0]) / std)
    gdpo = AGGREGATIONS["gdpo"]({"r": values}, {"r": 1.0}, valid, g)
    assert gdpo.normalized and gdpo.values[3, 0] == 0
    expected = batch_normalize(group_advantages(values[:3, 0], g[:3]))
    torch.testing.assert_close(gdpo.values[:3, 0], expected)
    torch.testing.assert_close(ESTIMATORS["grpo"](gdpo, FLAT)[:3, -1], expected)  # not normalised a second time


def test_leaf_values_know_their_groups():
    lv = LeafValues(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.tensor([5, 7]))
    assert lv.leaf_groups.tolist() == [[5, 5, 5], [7, 7, 7]]


def test_batch_normalize_constant_is_zero():
    assert torch.equal(batch_normalize(torch.full((4,), 3.0)), torch.zeros(4))
