"""pass@k (the sharpening ceiling of scripts/probe_headroom.py) against enumeration of every k-subset."""
import itertools
import json
import subprocess
import sys

import pytest

from diffrl.inference import pass_at_k
from tests_helpers import ROOT, SUBPROCESS_ENV


@pytest.mark.parametrize("n,c,k", [(4, 1, 2), (5, 2, 3), (6, 0, 2), (6, 6, 1), (7, 3, 7), (8, 1, 1)])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_sample(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_pass_at_k_hand_worked_and_bad_input():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 3 of the 6 pairs contain the one correct sample
    with pytest.raises(ValueError, match="n=4, c=5"):
        pass_at_k(4, 5, 1)


def test_headroom_probe_ends_with_its_json():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "probe_headroom.py"), "--n", "4", "--prompts", "4"],
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])["rows"]
    assert set(rows) == {"all", "count", "relation"} and rows["all"]["prompts"] == 4
    for r in rows.values():
        ladder = [r["pass@1"], r["pass@2"], r["pass@4"]]
        assert ladder == sorted(ladder) and 0 <= ladder[0] and ladder[-1] <= 1
        assert r["pass@4"] == pytest.approx(1 - r["never"], abs=1e-4)  # k = n: some sample right iff not "never"
