"""The GPU benchmark scripts stay runnable: their ``--tiny`` mode runs the same code on tiny configs on the CPU."""
import json
import subprocess
import sys

from tests_helpers import ROOT, SUBPROCESS_ENV


def test_family_benchmark_runs_on_tiny_configs():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_families_gpu.py"), "--tiny", "--repeats", "1",
                           "--steps", "2", "--trained", "1"], capture_output=True, text=True, env=SUBPROCESS_ENV,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["model"] for r in result["results"]][::2] == ["SD3.5-Medium", "FLUX.1", "Wan 2.1 1.3B, 33 frames"]
    assert all(r["iteration_s"] > 0 and r["train_s"] > 0 for r in result["results"])
