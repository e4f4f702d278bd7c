"""Helpers of tests/test_prompt_sources.py that runs and prompt sources import by dotted path
(``prompt_sources_helpers:...``): prompt functions, good and bad, and a reward that records the metadata it sees."""

SEEN: list[tuple[str, dict]] = []
"""``(text, metadata)`` of every prompt ``recording`` scored, in the order scored."""

ROWS = [{"prompt": "a photo of two cats", "tag": "counting", "include": [{"class": "cat", "count": 2}]},
        {"prompt": "a red apple", "tag": "colors", "include": [{"class": "apple", "count": 1, "color": "red"}]}]
NOT_A_FUNCTION = ["a red circle"]


def recording(media, prompts):
    """Records each prompt's text and metadata; scores the mean pixel value (continuous: every leaf differs)."""
    SEEN.extend((str(p), dict(getattr(p, "metadata", {}))) for p in prompts)
    return {"recording": media.float().flatten(1).mean(1)}


def texts() -> list[str]:
    """A prompt function returning plain strings."""
    return ["a red circle", "two blue squares"]


def rows() -> list[dict]:
    """A prompt function returning GenEval-style rows."""
    return [dict(r) for r in ROWS]


def numbers() -> list[int]:
    """A broken prompt function: integers, not prompts."""
    return [1, 2]


def one_text() -> str:
    """A broken prompt function: one string, not a list of them."""
    return "a red circle"
