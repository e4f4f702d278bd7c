"""Branching trees and the rollout engine against brute-force counts and flat trajectories."""
import math

import pytest
import torch

from diffrl.rollout import trained_edges, tree_rollout
from diffrl.schedule import flow_sigmas, window_mask
from diffrl.sde import sde_step
from diffrl.seeding import step_noise
from diffrl.tree import TreeSchedule, depth_prune_mask, node_leaf_index, width_prune_mask

SCHEDULES = [
    (20, [0, 3, 6, 9], 2),
    (10, [], 2),
    (6, [1, 4], [3, 2]),
    (5, [0, 1, 2, 3, 4], 2),
    (8, [7], 4),
]


def brute_force_tree(num_steps, splits, factors):
    """Simulate the tree with a plain list of (node, depth); count velocity evaluations and leaves."""
    factors = [factors] * len(splits) if isinstance(factors, int) else factors
    branch = dict(zip(splits, factors))
    active, evaluations = [0], 0
    for k in range(num_steps):
        evaluations += len(active)
        active = [n for n in active for _ in range(branch.get(k, 1))]
    return evaluations, len(active)


@pytest.mark.parametrize("num_steps,splits,factors", SCHEDULES)
def test_leaves_and_nfe_match_brute_force_and_formula(num_steps, splits, factors):
    tree = TreeSchedule(num_steps, splits, factors)
    nfe, leaves = brute_force_tree(num_steps, splits, factors)
    fs = [factors] * len(splits) if isinstance(factors, int) else factors
    assert tree.num_leaves == leaves == math.prod(fs)
    formula = sum(math.prod(b for s, b in zip(splits, fs) if s < k) for k in range(num_steps))
    assert tree.nfe == nfe == formula
    assert tree.num_nodes == 1 + sum(a * tree.branch[k] for k, a in enumerate(tree.active_counts))


def test_branchgrpo_launcher_schedule_costs_203_evaluations():
    tree = TreeSchedule(20, [0, 3, 6, 9])
    assert (tree.num_leaves, tree.nfe) == (16, 203)  # BranchGRPO's example: 203 / 16 ~ 12.7 per leaf


def test_leaf_matrix_matches_walking_parents():
    tree = TreeSchedule(6, [1, 4], [3, 2])
    m = tree.leaf_matrix
    for j, leaf in enumerate(tree.leaves.tolist()):
        ancestors, n = set(), leaf
        while n >= 0:
            ancestors.add(n)
            n = int(tree.parent[n])
        assert set(m[:, j].nonzero().flatten().tolist()) == ancestors
        assert int(tree.depth[leaf]) == 6


def test_invalid_schedules_raise():
    with pytest.raises(ValueError, match="past the last step"):
        TreeSchedule(10, [3, 10])
    with pytest.raises(ValueError, match="increasing"):
        TreeSchedule(10, [3, 3])
    with pytest.raises(ValueError, match="branch factors given"):
        TreeSchedule(10, [1, 2], [2])
    with pytest.raises(ValueError, match=">= 2"):
        TreeSchedule(10, [1], 1)


class CountingVelocity:
    """Elementwise velocity field (no matmul, so batch composition cannot change a single bit); counts rows."""

    def __init__(self):
        self.rows = 0
        self.calls = 0

    def __call__(self, x, sigma):
        self.rows += x.shape[0]
        self.calls += 1
        return torch.tanh(x) * sigma.reshape(-1, *[1] * (x.ndim - 1)) - 0.3 * x


def test_shared_prefixes_are_evaluated_once_and_all_trees_advance_together():
    tree = TreeSchedule(20, [0, 3, 6, 9])
    f = CountingVelocity()
    out = tree_rollout(f, tree, flow_sigmas(20), [11, 12, 13], (2, 4, 4))
    assert f.rows == out.nfe == 3 * tree.nfe  # not 3 * 16 * 20 as 48 independent chains would cost
    assert f.calls == 20  # one batched call per step over every active node of every tree
    assert out.leaves.shape == (3, 16, 2, 4, 4)
    assert len(out.transitions) == 3 * (tree.num_nodes - 1)


@pytest.mark.parametrize("kind", ["flow", "dance", "cps"])
def test_every_leaf_path_reproduces_the_flat_trajectory_of_the_same_noises(kind):
    tree = TreeSchedule(8, [1, 4], [3, 2])
    sigmas, seeds, shape, lam = flow_sigmas(8, shift=3.0), [5, 9], (3, 2, 2), 2.5
    out = tree_rollout(CountingVelocity(), tree, sigmas, seeds, shape, kind=kind, split_noise_scale=lam)
    tr = out.transitions
    f = CountingVelocity()
    for t, seed in enumerate(seeds):
        for j, leaf in enumerate(tree.leaves.tolist()):
            path = [leaf]
            while tree.parent[path[-1]] > 0:
                path.append(int(tree.parent[path[-1]]))
            path = path[::-1]  # nodes created at steps 0 .. T-1
            x = step_noise(seed, -1, 1, shape)
            for k, node in enumerate(path):
                row = (tree.step_children[k] == node).nonzero().item()
                noise = step_noise(seed, k, len(tree.step_children[k]), shape)[row : row + 1]
                scale = lam if tree.branch[k] > 1 else 1.0
                step = sde_step(x, f(x, sigmas[k].expand(1)), float(sigmas[k]), float(sigmas[k + 1]), kind=kind,
                                noise=noise, noise_scale=scale)
                edge = ((tr.tree == t) & (tr.child == node)).nonzero().item()
                assert torch.equal(tr.x[edge], x[0]) and torch.equal(tr.x_next[edge], step.x_next[0])
                assert torch.equal(tr.log_prob[edge], step.log_prob[0]) and tr.step[edge] == k
                x = step.x_next
            assert torch.equal(out.leaves[t, j], x[0])


def test_split_children_are_drawn_and_scored_with_the_scaled_std():
    tree = TreeSchedule(4, [1], 3)
    out = tree_rollout(CountingVelocity(), tree, flow_sigmas(4), [0], (8,), kind="dance", noise_level=0.3,
                       split_noise_scale=4.0)
    tr = out.transitions
    split = tr.step == 1
    unscaled = 0.3 * torch.sqrt(tr.sigma - tr.sigma_next)
    torch.testing.assert_close(tr.std[split], 4.0 * unscaled[split])
    torch.testing.assert_close(tr.std[~split], unscaled[~split])
    z = (tr.x_next[split] - tr.mean[split]) / tr.std[split][:, None]
    expected = (-0.5 * z**2 - torch.log(tr.std[split])[:, None] - 0.5 * math.log(2 * math.pi)).mean(1)
    torch.testing.assert_close(tr.log_prob[split], expected)


def test_same_seeds_reproduce_and_other_seeds_differ():
    tree = TreeSchedule(5, [0, 2])
    a = tree_rollout(CountingVelocity(), tree, flow_sigmas(5), [1, 2], (4,))
    b = tree_rollout(CountingVelocity(), tree, flow_sigmas(5), [1, 2], (4,))
    c = tree_rollout(CountingVelocity(), tree, flow_sigmas(5), [3, 2], (4,))
    assert torch.equal(a.leaves, b.leaves)
    assert not torch.equal(a.leaves[0], c.leaves[0]) and torch.equal(a.leaves[1], c.leaves[1])


def test_flat_grpo_is_a_tree_without_splits():
    out = tree_rollout(CountingVelocity(), TreeSchedule(6), flow_sigmas(6), list(range(4)), (3,))
    assert out.leaves.shape == (4, 1, 3) and out.nfe == 24
    assert torch.all(out.transitions.depth == out.transitions.step + 1)


def test_ode_window_edges_are_not_stochastic_and_not_trained():
    sde = window_mask(10, 3, 4)
    tree = TreeSchedule(10, [3, 5])
    out = tree_rollout(CountingVelocity(), tree, flow_sigmas(10), [0], (2,), sde_steps=sde)
    tr = out.transitions
    assert torch.equal(tr.stochastic, sde[tr.step])
    assert torch.all(tr.log_prob[~tr.stochastic] == 0)
    train = torch.zeros(10, dtype=torch.bool)
    train[[3, 6, 8]] = True
    assert torch.equal(trained_edges(tr, train), sde[tr.step] & train[tr.step])
    with pytest.raises(ValueError, match="deterministic"):
        tree_rollout(CountingVelocity(), TreeSchedule(10, [1]), flow_sigmas(10), [0], (2,), sde_steps=sde)


def test_velocity_receives_each_rows_tree_condition():
    seen = []

    def f(x, sigma, cond):
        seen.append(cond.clone())
        return torch.zeros_like(x)

    cond = torch.tensor([10.0, 20.0])
    tree_rollout(f, TreeSchedule(3, [0]), flow_sigmas(3), [0, 1], (2,), cond=cond, max_batch=3)
    assert seen[0].tolist() == [10.0, 20.0]  # step 0: one root per tree
    assert torch.cat(seen[1:3]).tolist() == [10.0, 10.0, 20.0, 20.0]  # step 1: 4 rows in chunks of 3


def test_step_noise_is_deterministic_and_distinct_per_step():
    assert torch.equal(step_noise(3, 2, 4, (5,)), step_noise(3, 2, 4, (5,)))
    assert not torch.equal(step_noise(3, 2, 4, (5,)), step_noise(3, 3, 4, (5,)))
    assert not torch.equal(step_noise(3, 2, 4, (5,)), step_noise(4, 2, 4, (5,)))


def test_width_pruning_hand_worked():
    tree = TreeSchedule(4, [0, 1])  # 4 leaves; last split at step 1; siblings (leaf 0, 1) and (2, 3)
    out = tree_rollout(CountingVelocity(), tree, flow_sigmas(4), [0], (2,))
    tr = out.transitions
    leaf_adv = torch.tensor([[0.5, -1.0, 2.0, 0.1]])
    leaf_of = node_leaf_index(tree)
    keep = width_prune_mask(tree, tr.step, tr.child, tr.tree, leaf_adv, ratio=0.5, mode="topk")
    assert torch.all(keep[tr.step <= 1])
    kept_leaves = set(leaf_of[tr.child[keep & (tr.step > 1)]].tolist())
    assert kept_leaves == {0, 2}  # best of each sibling pair
    keep = width_prune_mask(tree, tr.step, tr.child, tr.tree, leaf_adv, ratio=0.5, mode="best_worst")
    assert set(leaf_of[tr.child[keep & (tr.step > 1)]].tolist()) == {2, 1}  # global best and worst


def test_depth_pruning_slides_towards_the_stop_depth():
    depth = torch.arange(1, 21)
    keep = depth_prune_mask(depth, [15, 16, 17])
    assert set(depth[~keep].tolist()) == {15, 16, 17}
    keep = depth_prune_mask(depth, [15, 16, 17], iteration=95, interval=30, stop_depth=9)  # offset 3
    assert set(depth[~keep].tolist()) == {12, 13, 14}
    keep = depth_prune_mask(depth, [15, 16, 17], iteration=10_000, interval=30, stop_depth=9)  # offset capped at 6
    assert set(depth[~keep].tolist()) == {9, 10, 11}


def test_rescoring_recorded_transitions_with_the_same_model_gives_ratio_exactly_one():
    """A matmul model. Re-scored the way the rollout batched it (per step, each parent once), the ratio is exactly 1;
    re-scored in one batch of all edges, matmul kernels may round differently per batch size (batch invariance)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(9, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8))
    velocity = lambda x, s: net(torch.cat([x, s[:, None]], dim=1))  # noqa: E731
    tree = TreeSchedule(6, [0, 2])
    with torch.no_grad():
        ro = tree_rollout(velocity, tree, flow_sigmas(6), [1, 2, 3], (8,), kind="flow")
        tr = ro.transitions
        for k in range(6):
            e = (tr.step == k).nonzero().flatten()
            b = tree.branch[k]
            parents = e[::b]  # siblings are consecutive rows sharing one parent
            v = velocity(tr.x[parents], tr.sigma[parents]).repeat_interleave(b, 0)
            again = sde_step(tr.x[e], v, tr.sigma[e], tr.sigma_next[e], x_next=tr.x_next[e],
                             noise_scale=tr.noise_scale[e])
            assert torch.equal(torch.exp(again.log_prob - tr.log_prob[e]), torch.ones(len(e)))
        one_batch = sde_step(tr.x, velocity(tr.x, tr.sigma), tr.sigma, tr.sigma_next, x_next=tr.x_next,
                             noise_scale=tr.noise_scale)
    assert (one_batch.log_prob - tr.log_prob).abs().max() < 1e-5
