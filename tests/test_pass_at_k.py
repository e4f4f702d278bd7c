"""pass@k (``diffrl.inference.pass_at_k``) against enumeration of every k-subset."""
import itertools

import pytest

from diffrl.inference import pass_at_k


@pytest.mark.parametrize("n,c,k", [(4, 1, 2), (5, 2, 3), (6, 0, 2), (6, 6, 1), (7, 3, 7), (8, 1, 1)])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_sample(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_pass_at_k_hand_worked_and_bad_input():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 3 of the 6 pairs contain the one correct sample
    with pytest.raises(ValueError, match="n=4, c=5"):
        pass_at_k(4, 5, 1)
