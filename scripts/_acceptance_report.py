"""Helper of ``scripts/gpu_acceptance.sh``: reads what one step left behind (its log, run directory, JUnit XML) into
a status and its key numbers, and writes the final ``acceptance.json`` / ``acceptance.md``.

    python scripts/_acceptance_report.py installed SITE WHEEL...
    python scripts/_acceptance_report.py step OUTDIR NAME KIND RC SECONDS LIMIT_S
    python scripts/_acceptance_report.py final OUTDIR MODE

``installed`` (after ``pip install --target SITE``) prints the wheels' count and size as a JSON line, and fails
when the diffrl wheel lacks modules of this checkout. ``step`` appends one JSON line to ``OUTDIR/work/steps.jsonl``
and prints a one-line verdict. Every number comes from the step's own output: nothing here is a fixed result.
``final`` writes the two reports and prints, as its last line, one JSON line with ``"ok"`` (every step passed) and
each step's status and seconds; it exits 0 when ok, else 1.
Standard library only: it runs before anything is installed.
"""
from __future__ import annotations

import json
import math
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def json_lines(text: str) -> list[dict]:
    """Every line of ``text`` that is a JSON object (a benchmark's result lines), in order."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                found.append(json.loads(line))
            except ValueError:
                pass
    return found


def finite(x) -> bool:
    return not isinstance(x, float) or math.isfinite(x)


def last_error(text: str) -> str:
    """The line of a failed step's log most likely to say why (the last exception line, else the last line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error:" in ln or "Exception" in ln or ln.startswith(("FAILED", "diffrl:")):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def parse_probe(log: str, work: Path, rc: int) -> tuple[bool, dict, str]:
    """install / environment: the last JSON line the step printed (versions, GPUs, wheel sizes)."""
    found = json_lines(log)
    numbers = found[-1] if found else {}
    ok = rc == 0 and bool(found) and numbers.get("ok", True) is True
    return ok, {k: v for k, v in numbers.items() if k not in ("ok", "why")}, numbers.get("why", "")


def parse_tests(log: str, work: Path, rc: int) -> tuple[bool, dict, str]:
    """pytest -m gpu: counts from its JUnit XML; skip reasons and failed tests by name. A test module that cannot be
    imported here (a package this machine lacks) is listed, not failed: only the tests that ran decide."""
    xml = work / "gpu_tests.xml"
    numbers: dict = {"passed": 0, "failed": 0, "skipped": 0}
    skipped, failed, uncollected = [], [], []
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = case.get("name", "?")
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            if case.find("skipped") is not None:
                numbers["skipped"] += 1
                skipped.append(f"{name}: {case.find('skipped').get('message', '')}"[:200])
            elif problem is not None and problem.get("message") == "collection failure":
                uncollected.append(name)
            elif problem is not None:
                numbers["failed"] += 1
                failed.append(name)
            else:
                numbers["passed"] += 1
    for key, names in (("skip_reasons", skipped), ("failed_tests", failed), ("modules_not_imported", uncollected)):
        if names:
            numbers[key] = names[:10] + ([f"... and {len(names) - 10} more"] if len(names) > 10 else [])
    ok = xml.is_file() and numbers["passed"] > 0 and not failed
    why = "" if ok else ("no test passed" if xml.is_file() and not failed else last_error(log))
    return ok, numbers, why


def parse_train(log: str, work: Path, rc: int) -> tuple[bool, dict, str]:
    """diffrl train: summary.json and metrics.jsonl of the run directory."""
    run = work / "train"
    numbers: dict = {}
    summary_file, metrics_file = run / "summary.json", run / "metrics.jsonl"
    if not summary_file.is_file():
        return False, numbers, "no summary.json" + (f"; {last_error(log)}" if rc else "")
    summary = json.loads(summary_file.read_text())
    metrics = ([json.loads(ln) for ln in metrics_file.read_text().splitlines() if ln.strip()]
               if metrics_file.is_file() else [])
    numbers.update({k: summary.get(k) for k in ("steps", "base_accuracy", "final_accuracy", "wall_s")})
    if metrics:
        numbers["reward_first"] = round(metrics[0]["reward_mean"], 4)
        numbers["reward_last"] = round(metrics[-1]["reward_mean"], 4)
        numbers["step_s_mean"] = round(sum(m["rollout_s"] + m["train_s"] for m in metrics) / len(metrics), 3)
    bad = [f"step {m.get('step')}: {k}" for m in metrics for k, v in m.items() if not finite(v)]
    bad += [k for k, v in summary.items() if not finite(v)]
    ok = rc == 0 and len(metrics) == summary.get("steps") and not bad
    why = "" if ok else (f"non-finite: {', '.join(bad[:5])}" if bad else last_error(log))
    return ok, numbers, why


def parse_families(log: str, work: Path, rc: int) -> tuple[bool, dict, str]:
    """bench_families_gpu.py: its final JSON line (or, cut short, the per-model lines it printed so far)."""
    found = json_lines(log)
    final = next((d for d in reversed(found) if "results" in d), None)
    rows = final["results"] if final else [d for d in found if "iteration_s" in d]
    numbers: dict = {"device": final["device"]} if final else {}
    for r in rows:
        numbers[f"{r['model']} {r['px']}px"] = {"iteration_s": r["iteration_s"], "peak_gib": r.get("peak_gib")}
    ok = rc == 0 and final is not None and all(r["iteration_s"] > 0 for r in rows)
    return ok, numbers, "" if ok else last_error(log)


def parse_explore(log: str, work: Path, rc: int) -> tuple[bool, dict, str]:
    """bench_explore.py: its final JSON line (regen_exact, spearman, path, and on a GPU the per-resolution speedups);
    cut short, the per-resolution lines it printed so far (``512 {...}``)."""
    found = json_lines(log)
    final = next((d for d in reversed(found) if "regen_exact" in d), None)
    numbers: dict = {}
    if final:
        numbers.update({k: final.get(k) for k in ("regen_exact", "spearman", "path", "explore_s", "regen_s")
                        if k in final})
    keys = ("fp8_path", "fp8_speedup", "nvfp4_path", "nvfp4_speedup", "iteration_speedup", "bf16_forward_s")
    for px in ("512px", "1024px"):
        row = (final or {}).get(px)
        if row is None:  # a line "512 {...}" printed before the step was cut short
            prefix = px[:-2] + " {"
            line = next((ln for ln in log.splitlines() if ln.startswith(prefix)), None)
            row = json.loads(line.split(" ", 1)[1]) if line else None
        if row:
            numbers[px] = {k: row[k] for k in keys if k in row}
    if os.environ.get("ACCEPT_EXPLORE_COMPILE") == "0":
        numbers["torch_compile"] = False  # TORCHDYNAMO_DISABLE=1: eager forwards, not the benchmark's own numbers
    ok = rc == 0 and final is not None and final.get("regen_exact") is True
    why = "" if ok else ("regenerated trajectories differ from a direct rollout" if final else last_error(log))
    return ok, numbers, why


def parse_throughput(log: str, work: Path, rc: int) -> tuple[bool, dict, str]:
    """bench_throughput.py: its final JSON line. ``rollout_speedup`` (compiled over eager, ``rollout_flat``) and
    ``train_speedup`` (``train_ppo``; when that workload did not run, ``train_nft``'s compiled speed-up from
    ``results``), both finite and positive, and each workload's eager and compiled items/s."""
    found = json_lines(log)
    final = next((d for d in reversed(found) if "results" in d), None)
    if final is None:
        return False, {}, "no result line" + (f"; {last_error(log)}" if rc else "")
    results = final["results"]
    train = final.get("train_speedup")
    if train is None:
        train = (results.get("train_nft") or {}).get("compile", {}).get("speedup")
    numbers: dict = {"rollout_speedup": final.get("rollout_speedup"), "train_speedup": train}
    for name, row in results.items():
        numbers[name] = {f"{lever}_per_s": row[lever]["per_s"] for lever in ("eager", "compile") if lever in row}
    bad = [k for k in ("rollout_speedup", "train_speedup")
           if not isinstance(numbers[k], (int, float)) or not math.isfinite(numbers[k]) or numbers[k] <= 0]
    ok = rc == 0 and not bad
    why = "" if ok else (last_error(log) if rc else f"no finite positive {' or '.join(bad)}")
    return ok, numbers, why


def installed(site: Path, wheels: list[str]) -> int:
    """After ``pip install --target SITE``: the wheels' count and size, and how the installed diffrl wheel compares
    with this checkout. A module of the checkout missing from the wheel fails the step (the wheel is broken for
    anyone who installs it); a module that differs only means the wheel is older than the checkout (a note: the
    steps import the checkout, which is first on PYTHONPATH)."""
    root = Path(__file__).resolve().parents[1]
    missing, stale = [], []
    for package in ("diffrl", "rewards"):
        for mine in sorted((root / package).rglob("*.py")):
            theirs = site / mine.relative_to(root)
            if not theirs.is_file():
                missing.append(str(mine.relative_to(root)))
            elif theirs.read_bytes() != mine.read_bytes():
                stale.append(str(mine.relative_to(root)))
    mib = sum(Path(w).stat().st_size for w in wheels) / 2 ** 20
    out = {"wheels": len(wheels), "mib": round(mib, 1)}
    if stale:
        out["diffrl_wheel_older_than_checkout"] = stale[:5] + ([f"... {len(stale) - 5} more"] if len(stale) > 5 else [])
    why = (f"the diffrl wheel lacks {len(missing)} modules of the checkout ({', '.join(missing[:4])}"
           f"{', ...' if len(missing) > 4 else ''}): pyproject.toml's package list misses them") if missing else ""
    print(json.dumps({**out, "ok": not missing, "why": why}))
    return 1 if missing else 0


PARSERS = {"probe": parse_probe, "tests": parse_tests, "train": parse_train, "families": parse_families,
           "explore": parse_explore, "throughput": parse_throughput}


def step(out: Path, name: str, kind: str, rc: int, seconds: float, limit: float) -> None:
    work = out / "work"
    log_file = out / "logs" / f"{name}.log"
    log = log_file.read_text(errors="replace") if log_file.is_file() else ""
    try:
        ok, numbers, why = PARSERS[kind](log, work, rc)
    except Exception as e:  # a malformed output is the step's failure, not the report's
        ok, numbers, why = False, {}, f"unreadable output: {type(e).__name__}: {e}"
    if rc in (124, 137):
        ok, why = False, f"timed out after {limit:.0f} s" + (f"; {why}" if why else "")
    elif rc and not why:
        why = f"exit status {rc}"
    record = {"name": name, "status": "pass" if ok else "fail", "seconds": round(seconds, 1), "rc": rc,
              "numbers": numbers, "log": str(log_file.relative_to(out))}
    if why and not ok:
        record["why"] = why
    with open(work / "steps.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"[acceptance] {name}: {record['status']} ({record['seconds']} s)" + (f": {why}" if not ok else ""),
          flush=True)


def fmt(value) -> str:
    """Key numbers as one table cell: ``k v, k v``; a nested row (one benchmark case) as ``name (k v, k v)``."""
    if isinstance(value, dict):
        return ", ".join(f"{k} ({fmt(v)})" if isinstance(v, dict) else f"{k} {fmt(v)}"
                         for k, v in value.items() if v is not None)
    if isinstance(value, list):
        return "; ".join(fmt(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def final(out: Path, mode: str) -> int:
    steps_file = out / "work" / "steps.jsonl"
    steps = [json.loads(ln) for ln in steps_file.read_text().splitlines()] if steps_file.is_file() else []
    ok = bool(steps) and all(s["status"] == "pass" for s in steps)
    total = round(sum(s["seconds"] for s in steps), 1)
    report = {"ok": ok, "mode": mode, "seconds": total, "steps": steps}
    (out / "acceptance.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# diffrl GPU acceptance ({mode}): {'PASS' if ok else 'FAIL'}, {total} s", "",
             "| step | status | seconds | key numbers |", "|---|---|---:|---|"]
    for s in steps:
        numbers = fmt(s["numbers"]).replace("|", "/")
        if s.get("why"):
            numbers = f"**{s['why'].replace('|', '/')}**" + (f"; {numbers}" if numbers else "")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {numbers} |")
    (out / "acceptance.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"ok": ok, "mode": mode, "seconds": total, "report": str(out / "acceptance.json"),
                      "steps": {s["name"]: {"status": s["status"], "seconds": s["seconds"]} for s in steps}}),
          flush=True)
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[1] == "installed":
        return installed(Path(argv[2]), argv[3:])
    if len(argv) == 8 and argv[1] == "step":
        step(Path(argv[2]), argv[3], argv[4], int(argv[5]), float(argv[6]), float(argv[7]))
        return 0
    if len(argv) == 4 and argv[1] == "final":
        return final(Path(argv[2]), argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
