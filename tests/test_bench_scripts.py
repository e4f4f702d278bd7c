"""The GPU benchmark scripts stay runnable: their ``--tiny`` mode runs the same code on tiny configs on the CPU."""
import json
import subprocess
import sys

import pytest

from tests_helpers import ROOT, SUBPROCESS_ENV, load_script


def test_family_benchmark_runs_on_tiny_configs_eager_and_compiled():
    """Each family's blocks go through torch.compile (the aot_eager backend: traced forward and backward, no kernels
    generated, so the outputs equal the eager ones) and are timed beside the eager model."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_families_gpu.py"), "--tiny", "--repeats", "1",
                           "--steps", "2", "--trained", "1", "--compile", "--compile-backend", "aot_eager"],
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["model"] for r in result["results"]][::2] == ["SD3.5-Medium", "FLUX.1", "Wan 2.1 1.3B, 33 frames"]
    assert result["compile"] == "aot_eager"
    for r in result["results"]:
        assert r["iteration_s"] > 0 and r["train_s"] > 0 and r["compiled_train_s"] > 0
        assert r["compiled_speedup"] == pytest.approx(r["iteration_s"] / r["compiled_iteration_s"], rel=0.02)
        assert r["compiled_rel_diff"] < 1e-6
    assert result["results"][0]["compile_warmup_s"] > 10 * result["results"][0]["compiled_iteration_s"]  # traced


def _strict_json(line: str) -> dict:
    """Parse as strict JSON (no NaN/Infinity), as checks outside the repo and other languages' parsers do."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=refuse)


def test_explore_benchmark_ends_with_its_json_contract():
    """bench_explore.py's last line is strict JSON with the keys checks outside the repo read; on a tiny run (4
    steps, 2 prompts, N = 8, K = 2) regeneration is exact and the path is the emulated one (no GPU here)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_explore.py"), "--steps", "1", "--keep", "2",
                           "--prompts", "2", "--eval-every", "1", "--eval-prompts", "2", "sampler.num_steps=4",
                           "sampler.sde_window=[0,2]", "sampler.eval_steps=4", "data.eval_size=4"],
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = _strict_json(done.stdout.strip().splitlines()[-1])
    assert {"spearman", "regen_exact", "explore_s", "regen_s", "path"} <= set(result)
    assert result["regen_exact"] is True and result["path"] == "emulated"
    assert result["explore_s"] > 0 and result["regen_s"] > 0
    assert result["spearman"] is None or -1.0 <= result["spearman"] <= 1.0


@pytest.mark.slow
def test_fsdp_memory_benchmark_runs_one_and_two_processes(tmp_path):
    """bench_fsdp_memory.py at a tiny size: one unsharded process, then two FSDP processes, each reporting its peak
    RSS; the table and the JSON line come out (the README's numbers come from the full-size run)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_fsdp_memory.py"), "--layers", "2", "--dim",
                           "64", "--modes", "lora", "--out", str(tmp_path / "mem")], capture_output=True, text=True,
                          env=SUBPROCESS_ENV, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    row = result["rows"][0]
    assert row["unsharded"]["processes"] == 1 and row["fsdp2"]["processes"] == 2
    assert row["fsdp2"]["peak_mb"] >= row["fsdp2"]["imported_mb"] > 100
    assert "| LoRA |" in (tmp_path / "mem.md").read_text()


def test_objectives_benchmark_runs_each_objective_per_seed(tmp_path):
    """bench_objectives.py on one tiny step per run: a row per (seed, objective), interleaved, and the means."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_objectives.py"), "--seeds", "0",
                           "--objectives", "nft", "awm:train.lr=0.01,train.kl_weight=0", "--root", str(tmp_path),
                           "train.steps=1", "train.prompts_per_step=2", "data.eval_size=2",
                           "sampler.eval_steps=2", "log.tensorboard=false", "log.sample_every=0", "log.eval_every=0"],
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = _strict_json(done.stdout.strip().splitlines()[-1])
    variant = "awm:train.lr=0.01,train.kl_weight=0"
    assert [(r["objective"], r["seed"]) for r in result["runs"]] == [("nft", 0), (variant, 0)]
    assert set(result["means"]) == {"nft", variant} and all(r["train_wall_s"] > 0 for r in result["runs"])
    config = (tmp_path / "awm_train.lr-0.01_train.kl_weight-0-seed0" / "config.yaml").read_text()
    assert "lr: 0.01" in config and "kl_weight: 0" in config and "objective: awm" in config


def test_reward_hacking_benchmark_runs_each_variant_and_measures_false_alarms(tmp_path):
    """bench_reward_hacking.py at a tiny size: a row per (seed, variant) with the proxy and the strict verifier's
    base, best and final accuracy, the curves plot, ``--reuse`` of finished runs, and the false-alarm table on
    noise."""
    script = [sys.executable, str(ROOT / "scripts" / "bench_reward_hacking.py")]
    tiny = ["train.steps=2", "train.prompts_per_step=2", "train.trees_per_prompt=2", "sampler.num_steps=4",
            "data.eval_size=2", "sampler.eval_steps=2", "log.eval_every=1", "log.sample_every=0"]

    def bench(variants: list[str], *args: str) -> dict:
        done = subprocess.run([*script, "--variants", *variants, "--seeds", "0", "--root", str(tmp_path), *args],
                              capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        return _strict_json(done.stdout.strip().splitlines()[-1])

    result = bench(["none", "stop"], *tiny)
    # --reuse reads the finished runs of the same configuration; a changed setting trains again
    summaries = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/summary.json")}
    assert bench(["none", "stop"], "--reuse", *tiny)["runs"] == result["runs"]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/summary.json")} == summaries
    bench(["none"], "--reuse", *tiny[:-1], "log.sample_every=2")
    none = tmp_path / "none-seed0" / "summary.json"
    assert none.stat().st_mtime_ns != summaries[none]
    assert [(r["variant"], r["seed"]) for r in result["runs"]] == [("none", 0), ("stop", 0)]
    for r in result["runs"]:
        assert 0.0 <= r["best"] <= 1.0 and r["best"] >= r["base"] and [e["step"] for e in r["evals"]][:2] == [0, 1]
    assert set(result["means"]) == {"none", "stop"} and (tmp_path / "curves.png").is_file()
    noise = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_reward_hacking.py"), "--false-alarms",
                            "--noise-runs", "3"], capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600,
                           cwd=ROOT)
    rows = json.loads(noise.stdout.strip().splitlines()[-1])["false_alarms"]
    assert len(rows) == 12 and all(0.0 <= r["rate"] <= 1.0 for r in rows)


@pytest.mark.slow
def test_throughput_benchmark_compares_levers_with_eager_and_ends_with_its_json_contract():
    out = subprocess.run([sys.executable, "scripts/bench_throughput.py", "--levers", "eager:train.minibatch=4",
                          "--workloads", "rollout_flat", "rollout_tree", "train_nft", "--repeats", "1",
                          "train.prompts_per_step=2", "sampler.num_steps=4", "data.eval_size=4"],
                         cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"rollout_speedup", "train_speedup", "tree_vs_flat_rollout"} <= result.keys()
    rows = result["results"]
    assert all(r["eager"]["speedup"] == 1.0 and r["eager:train.minibatch=4"]["speedup"] > 0 for r in rows.values())
    # 2 prompts x 8 flat chains against 2 trees of 8 leaves; DiffusionNFT trains each leaf at round(0.7 x 4) levels
    assert rows["rollout_flat"]["eager"]["items"] == rows["rollout_tree"]["eager"]["items"] == 16
    assert rows["train_nft"]["eager"]["items"] == 16 * round(0.7 * 4)
    assert result["tree_vs_flat_rollout"] == round(rows["rollout_tree"]["eager"]["per_s"] /
                                                   rows["rollout_flat"]["eager"]["per_s"], 3)
    assert result["train_speedup"] is None  # train_ppo did not run


@pytest.mark.slow
def test_main_job_benchmark_compares_variants_and_two_processes_do_the_same_math(tmp_path):
    """bench_main_job.py at a tiny size with a one-process and a two-process variant: a row per (variant, seed), the
    ratios to the first variant, the JSON contract; the two processes draw the same rollouts, so the first step's
    rewards agree."""
    tiny = ["train.steps=1", "train.prompts_per_step=2", "train.trees_per_prompt=2", "sampler.num_steps=4",
            "sampler.eval_steps=2", "data.eval_size=2", "data.eval_seeds=1", "log.sample_every=0",
            "log.tensorboard=false"]
    done = subprocess.run([sys.executable, "scripts/bench_main_job.py", "--seeds", "0", "--variants", "one",
                           "two:processes=2", "--root", str(tmp_path), *tiny],
                          cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = _strict_json(done.stdout.strip().splitlines()[-1])
    assert [(r["variant"], r["processes"]) for r in result["all_runs"]] == [("one", 1), ("two", 2)]
    assert [r["variant"] for r in result["runs"]] == ["one"] and result["gain_mean"] == result["runs"][0]["gain"]
    assert result["variants"]["one"]["run_ratio"] == 1.0 and result["variants"]["two"]["run_ratio"] > 0
    first = [json.loads((tmp_path / f"{v}-seed0" / "metrics.jsonl").read_text().splitlines()[0])
             for v in ("one", "two")]
    assert first[0]["reward_mean"] == pytest.approx(first[1]["reward_mean"], abs=1e-6)
    bad = subprocess.run([sys.executable, "scripts/bench_main_job.py", "--variants", "x:processes=0"], cwd=ROOT,
                         env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "processes must be a whole number >= 1" in bad.stderr


def test_profile_classes_a_known_workload():
    """--profile's accounting on a hand-built call: two matmuls, one gelu, one copy; every class gets time only
    from its own operators and the classes add up to the total."""
    import torch

    bt = load_script("bench_throughput")
    assert [bt.op_class(n) for n in ("aten::addmm", "aten::mm", "aten::bmm", "aten::gelu_backward",
                                     "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::copy_",
                                     "aten::mul")] == ["matmul", "matmul", "matmul", "gelu", "attention", "copies",
                                                       "other"]
    a, b = torch.randn(256, 256), torch.empty(256, 256)

    def call() -> float:
        torch.nn.functional.gelu(a @ a @ a)
        b.copy_(a)
        return 0.0

    sec = bt.profile_shares(call)
    assert sec["matmul"] > 0 and sec["gelu"] > 0 and sec["copies"] > 0 and sec["attention"] == 0
    assert sec["total"] == pytest.approx(sum(v for k, v in sec.items() if k != "total"))


def test_variants_and_levers_keep_bracketed_values_whole():
    bmj, bt = load_script("bench_main_job"), load_script("bench_throughput")
    assert bmj.parse_variant("v:sampler.split_steps=[0,1],processes=2") == ("v", ["sampler.split_steps=[0,1]"], 2)
    assert bt.lever_overrides("compile:sampler.split_steps=[0,1]") == ["model.compile=true",
                                                                        "sampler.split_steps=[0,1]"]
    with pytest.raises(SystemExit, match="'train.lr' is not key=value"):
        bt.lever_overrides("eager:train.lr")
