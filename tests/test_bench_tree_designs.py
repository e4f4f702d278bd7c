"""scripts/bench_tree_designs.py: design parsing, the group spread by hand, NFE per leaf against the tree's formula,
and the table and JSON contract on a tiny run."""
import json
import sys

import pytest
import torch

from tests_helpers import ROOT, load_script

TINY = ["train.prompts_per_step=2", "sampler.num_steps=4", "sampler.sde_window=null", "data.eval_size=2"]

btd = load_script("bench_tree_designs")


def test_designs_keep_bracketed_lists_whole():
    assert btd.parse_design("flat") == ("flat", [])
    assert btd.parse_design("t:sampler.split_steps=[0,1,2],train.trees_per_prompt=1") == (
        "t", ["sampler.split_steps=[0,1,2]", "train.trees_per_prompt=1"])
    with pytest.raises(SystemExit, match="not key=value"):
        btd.parse_design("t:sampler.split_steps")


def test_group_spread_by_hand():
    # two prompts, two trees of two leaves each: prompt 0's leaves 0, 1, 0, 1 (sample std 1/sqrt(3)), prompt 1's all 3
    rewards = torch.tensor([[0.0, 1.0], [0.0, 1.0], [3.0, 3.0], [3.0, 3.0]])
    spread, share = btd.group_spread(rewards, prompts=2)
    assert spread == pytest.approx((3 ** -0.5 + 0.0) / 2)
    assert share == 0.5


@pytest.mark.slow
def test_table_and_json_contract_on_a_tiny_run(monkeypatch, capsys, tmp_path):
    """Flat (2 prompts x 8 chains of 4 steps: 4 NFE per leaf) against one tree per prompt splitting at steps 0 and
    1 into 4 leaves (active nodes 1, 2, 4, 4: 11 NFE over 4 leaves) and a forest of 2 such trees per prompt."""
    monkeypatch.chdir(ROOT)
    designs = ["flat", "tree:sampler.split_steps=[0,1],train.trees_per_prompt=1",
               "forest:sampler.split_steps=[0,1],train.trees_per_prompt=2"]
    monkeypatch.setattr(sys, "argv", ["bench_tree_designs.py", "--designs", *designs, "--batches", "2", *TINY])
    btd.main()
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    rows = {r["name"]: r for r in result["designs"]}
    assert result["baseline"] == "flat" and list(rows) == ["flat", "tree", "forest"]
    assert [rows[n]["leaves"] for n in rows] == [16, 8, 16]
    assert rows["flat"]["nfe_per_leaf"] == 4.0
    assert rows["tree"]["nfe_per_leaf"] == rows["forest"]["nfe_per_leaf"] == 2.75
    assert rows["flat"]["speedup"] == 1.0 and rows["tree"]["speedup"] > 0
    assert all(0.0 <= r["groups_with_spread"] <= 1.0 and r["group_std"] >= 0.0 for r in rows.values())
    assert "| forest | 16 | 2.75 |" in out
