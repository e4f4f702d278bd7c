import pytest

from diffrl.backends import check_attention_backend


def test_sdpa_works_everywhere():
    assert check_attention_backend("sdpa", "cpu") == "sdpa"


def test_xformers_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CPU kernels"):
        check_attention_backend("xformers", "cpu")


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown"):
        check_attention_backend("flash9", "cuda")
