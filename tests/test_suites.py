"""``diffrl eval --suite``: each suite runs on the shipped tiny model and writes a report whose numbers are recomputed
here from the per-sample results it saves; the columns, the flags that need a suite, and the OCR suite's prompts."""
import json
import subprocess
import sys

import pytest

from diffrl.cli import build_parser, main
from diffrl.eval_report import Column, plan_columns
from rewards.ocr import target_text
from tests_helpers import MODEL, ROOT, SUBPROCESS_ENV, random_lora

CHEAP = ["--model", MODEL, "--steps", "2"]


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A LoRA of the tiny model with random weights (so it samples differently), in the diffusers format."""
    folder = tmp_path_factory.mktemp("lora")
    random_lora(folder)
    return str(folder)


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values)


def check_report(out, columns, headline, overall_of_categories=False):
    """report.json's per-category and overall numbers, recomputed from its samples; report.md and a grid per
    category exist. Returns the report."""
    report = json.loads((out / "report.json").read_text())
    assert list(report["results"]) == columns and report["metric"] == headline
    for result in report["results"].values():
        samples = result["samples"]
        categories = list(dict.fromkeys(s["category"] for s in samples))
        assert list(result["categories"]) == categories
        for metric in samples[0]["scores"]:
            by_category = {c: mean([s["scores"][metric] for s in samples if s["category"] == c]) for c in categories}
            for c in categories:
                assert result["categories"][c][metric] == pytest.approx(by_category[c])
                assert result["categories"][c]["n"] == sum(s["category"] == c for s in samples)
            expected = (mean(list(by_category.values())) if overall_of_categories
                        else mean([s["scores"][metric] for s in samples]))
            assert result["overall"][metric] == pytest.approx(expected)
        assert all((out / "grids" / f"{c}.png").is_file() for c in categories)
    md = (out / "report.md").read_text()
    assert f"## {headline}" in md and "| category | n |" in md
    return report


def run(capsys, *argv):
    code = main(["eval", *argv])
    captured = capsys.readouterr()
    return code, captured


def test_the_shapes_suite_puts_the_base_model_and_a_lora_side_by_side(tmp_path, capsys, lora):
    code, out = run(capsys, "--suite", "shapes", *CHEAP, "--n", "4", "--lora", lora, "--out", str(tmp_path))
    assert code == 0, out.err
    report = check_report(tmp_path, ["base", lora], "strict")
    base, tuned = report["results"]["base"], report["results"][lora]
    assert list(base["categories"]) == ["single", "count", "pair", "relation"]
    assert [s["prompt"] for s in base["samples"]] == [s["prompt"] for s in tuned["samples"]]
    assert json.loads(out.out.strip().splitlines()[-1]) == {"suite": "shapes", "metric": "strict",
                                                            "base": base["overall"]["strict"],
                                                            lora: tuned["overall"]["strict"]}
    assert f"| **overall** (mean over samples) | 4 | {base['overall']['strict']:.3f} |" in (
        tmp_path / "report.md").read_text()


def test_the_geneval_suite_scores_shapes_metadata_per_tag(tmp_path, capsys):
    code, out = run(capsys, "--suite", "geneval", *CHEAP, "--n", "6", "--out", str(tmp_path))
    assert code == 0, out.err
    report = check_report(tmp_path, ["base"], "correct", overall_of_categories=True)
    samples = report["results"]["base"]["samples"]
    assert [s["category"] for s in samples] == ["single_object", "two_object", "counting", "colors", "position",
                                                "color_attr"]
    assert all((s["reason"] == "") == (s["scores"]["correct"] == 1.0) for s in samples)


def test_the_ocr_suite_scores_its_held_out_prompts(tmp_path, capsys):
    pytest.importorskip("rapidocr")
    code, out = run(capsys, "--suite", "ocr", *CHEAP, "--n", "3", "--out", str(tmp_path))
    assert code == 0, out.err
    report = check_report(tmp_path, ["base"], "ocr")
    assert [s["category"] for s in report["results"]["base"]["samples"]] == ["short", "medium", "long"]


def test_the_reward_suite_scores_any_rewards_per_category(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "category": c}) + "\n" for p, c in
                               [("a cat", "animals"), ("a lighthouse", "places"), ("a dog", "animals")]))
    code, out = run(capsys, "--suite", "reward", *CHEAP, "--prompts", str(prompts), "--reward", "jpeg_compressibility",
                    "--reward", "tests_helpers:brightness", "--out", str(tmp_path / "r"))
    assert code == 0, out.err
    report = check_report(tmp_path / "r", ["base"], "jpeg_compressibility")
    assert report["results"]["base"]["categories"]["animals"]["n"] == 2
    assert set(report["results"]["base"]["overall"]) == {"jpeg_compressibility", "tests_helpers:brightness"}


def test_flags_that_need_a_suite_and_suites_that_lack_what_they_need(capsys, tmp_path):
    assert run(capsys, "--compare", str(tmp_path))[0] == 2
    assert run(capsys, "--reward", "jpeg_compressibility", "--reward", "ocr")[1].err.startswith(
        "diffrl: a second --reward needs --suite")
    code, out = run(capsys, "--suite", "reward", *CHEAP)
    assert code == 2 and out.err == "diffrl: the reward suite needs at least one --reward NAME\n"
    code, out = run(capsys, "--suite", "shapes", *CHEAP, "--no-base")
    assert code == 2 and "--no-base needs --lora or --compare" in out.err
    code, out = run(capsys, "--suite", "shapes", *CHEAP, "--detector", "shapes")
    assert code == 2 and out.err == "diffrl: the shapes suite takes no --detector\n"


def test_eval_help_lists_the_suites(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    text = capsys.readouterr().out
    assert "--suite" in text and all(name in text for name in ("shapes", "ocr", "geneval", "reward"))


def test_columns_base_beside_the_loras():
    assert plan_columns(None, []) == [Column("base", None)]
    assert plan_columns("a", ["b"]) == [Column("base", "a", reference=True), Column("a", "a"), Column("b", "b")]
    assert plan_columns("a", [], base=False) == [Column("a", "a")]
    with pytest.raises(ValueError, match="nothing to evaluate"):
        plan_columns(None, [], base=False)


def test_the_ocr_suite_file_is_the_script_s_output_held_out_and_balanced(tmp_path):
    out = tmp_path / "o.jsonl"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_ocr_prompts.py"), "--out", str(out)], check=True,
                   capture_output=True)
    shipped = (ROOT / "prompts" / "ocr_suite.jsonl").read_text()
    assert out.read_text() == shipped
    records = [json.loads(line) for line in shipped.splitlines()]
    train = {target_text(line).replace(" ", "").lower() for line in (ROOT / "prompts" / "ocr_train.txt").read_text()
             .splitlines()}
    assert len(records) == 300 and len({r["text"] for r in records}) == 300
    assert [r["category"] for r in records[:6]] == ["short", "medium", "long"] * 2
    for r in records:
        size = len(r["text"].replace(" ", ""))
        assert target_text(r["prompt"]) == r["text"] and r["text"].replace(" ", "").lower() not in train
        assert r["category"] == ("short" if size <= 5 else "medium" if size <= 10 else "long") and size <= 20


@pytest.mark.slow
def test_two_processes_split_a_suite_and_report_what_one_process_reports(tmp_path, capsys):
    """Under torchrun each process samples its share of the items (5 over 2: the last one padded); the first one
    scores them all and writes the report, sample for sample the one-process report."""
    code, _ = run(capsys, "--suite", "shapes", *CHEAP, "--n", "5", "--out", str(tmp_path / "one"))
    assert code == 0
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "diffrl", "eval", "--suite", "shapes", *CHEAP, "--num-prompts", "5", "--out",
                           str(tmp_path / "two")], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**SUBPROCESS_ENV, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("wrote ") == 1  # the first process alone writes and prints
    one, two = (json.loads((tmp_path / r / "report.json").read_text())["results"]["base"] for r in ("one", "two"))
    assert two["samples"] == one["samples"] and len(one["samples"]) == 5
    assert two["overall"] == one["overall"]
