"""Prompt sources: the generated shapes grammar, or a user's .txt / .jsonl file. Bad files fail in one sentence."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from diffrl.seeding import mix_seed
from diffrl.shapes import KINDS, prompt_of, random_scene


class PromptError(ValueError):
    """A prompt source is missing, empty or malformed."""


def read_prompt_file(path: str) -> list[str]:
    """One prompt per line (.txt) or one JSON object with a "prompt" key per line (.jsonl)."""
    p = Path(path)
    if not p.is_file():
        raise PromptError(f"prompt file {path} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"prompt file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise PromptError(f"prompt file {path} is empty")
    if p.suffix != ".jsonl":
        return lines
    prompts = []
    for i, line in enumerate(lines, 1):
        try:
            prompts.append(str(json.loads(line)["prompt"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise PromptError(f"prompt file {path}, line {i}: expected a JSON object with a \"prompt\" key") from None
    return prompts


def _kinds(spec: str) -> list[str]:
    kinds = spec.split(":", 1)[1].split(",") if ":" in spec else list(KINDS)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise PromptError(f"prompt source {spec!r}: unknown shapes kinds {bad}; choose from {list(KINDS)}")
    return kinds


def eval_prompts(spec: str, n: int, seed: int = 12345) -> list[str]:
    """The held-out evaluation prompts: ``n`` generated ones ("shapes[:kinds]") or a file's first ``n``."""
    if spec.startswith("shapes"):
        rng, kinds = random.Random(seed), _kinds(spec)
        return [prompt_of(random_scene(rng, kinds[i % len(kinds)])) for i in range(n)]
    return read_prompt_file(spec)[:n]


class PromptStream:
    """Training prompts: step ``s`` always gets the same prompts (so a resumed run repeats them), never one of
    the held-out ``exclude`` prompts."""

    def __init__(self, spec: str, seed: int, exclude: Sequence[str] = ()):
        self.spec, self.seed, self.exclude = spec, seed, set(exclude)
        self.pool = None if spec.startswith("shapes") else read_prompt_file(spec)
        self.kinds = _kinds(spec) if self.pool is None else None

    def at(self, step: int, n: int) -> list[str]:
        rng = random.Random(mix_seed(self.seed, step, 7))
        out: list[str] = []
        for _ in range(100 * n):
            p = rng.choice(self.pool) if self.pool else prompt_of(random_scene(rng, rng.choice(self.kinds)))
            if p not in self.exclude:
                out.append(p)
            if len(out) == n:
                return out
        raise PromptError(f"prompt source {self.spec!r} has no prompts left once the held-out ones are excluded")
