"""Evaluation suites (``diffrl eval --suite NAME``): which prompts, how each sample is scored, how scores add up.

A suite is built from ``SuiteOptions`` and gives ``items()``: the prompts, each with a category (the report's rows)
and what its scorer needs; and ``score(images, items)``: one result per sample, ``{"scores": {metric: value or
None}, ...}`` with the headline metric first (None: the sample could not be scored and is left out of the means).
``overall`` says how the headline adds up: ``"samples"`` (the mean over samples) or ``"categories"`` (the mean of
the per-category means, as GenEval's score). ``SUITES`` maps names to suites: a new suite is one class and one
entry.

| suite | prompts (default) | per sample | categories |
|---|---|---|---|
| ``shapes`` | the shapes grammar, all kinds in turn | the verifier's ``strict`` and ``partial`` | prompt kind |
| ``ocr`` | ``prompts/ocr_suite.jsonl`` | the OCR reward; ``exact``: it is 1 | target length |
| ``geneval`` | GenEval metadata of shapes prompts (``diffrl.geneval``) | GenEval's ``correct`` | GenEval tag |
| ``reward`` | ``--prompts`` (default the shapes grammar) | each ``--reward`` | ``category`` field |
"""
from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

from torch import Tensor

from diffrl.prompts import PromptError, eval_prompts, read_prompt_file

ROOT = Path(__file__).resolve().parents[1]
OCR_PROMPTS = ROOT / "prompts" / "ocr_suite.jsonl"
"""The ``ocr`` suite's prompts, written by ``scripts/make_ocr_prompts.py``."""


@dataclass(frozen=True)
class Item:
    """One prompt of a suite: its text, its category and what the suite's scorer needs (``meta``)."""

    prompt: str
    category: str
    meta: dict = field(default_factory=dict)


@dataclass
class SuiteOptions:
    """What ``diffrl eval`` passes to a suite: ``prompts`` (a source, None: the suite's own), ``n`` (the first
    ``n`` prompts; None: the suite's default), rewards and their options (``{name: {key: value}}``) and the GenEval
    detector (``shapes`` or a ``pkg.module:attr`` path to a detector or a class of one)."""

    prompts: Optional[str] = None
    n: Optional[int] = None
    rewards: Sequence[str] = ()
    reward_options: dict = field(default_factory=dict)
    detector: Optional[str] = None


class Suite(Protocol):
    """``items()`` -> the prompts; ``score(images [n, 3, H, W] in [0, 1], items)`` -> one result per sample."""

    name: str
    metric: str
    overall: str

    def items(self) -> list[Item]: ...

    def score(self, images: Tensor, items: Sequence[Item]) -> list[dict]: ...


def _unused(options: SuiteOptions, suite: str, allowed: Sequence[str]) -> None:
    """ValueError in one sentence for an option ``suite`` does not take."""
    given = {"--reward": bool(options.rewards), "--detector": options.detector is not None}
    extra = [flag for flag, used in given.items() if used and flag not in allowed]
    if extra:
        raise ValueError(f"the {suite} suite takes no {' or '.join(extra)}")


def read_records(path: str) -> list[dict]:
    """The JSON objects of a .jsonl file, one a line; ``PromptError`` in one sentence for another kind of file or a
    missing, empty or malformed one."""
    if not path.endswith(".jsonl"):
        raise PromptError(f"prompt file {path} must be a .jsonl file of JSON objects, one a line")
    read_prompt_file(path)  # its errors for a missing, non-UTF-8 or empty file, or a line without "prompt"
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def _shapes_items(spec: str, n: int) -> list[Item]:
    """Shapes-grammar prompts (``shapes[:kinds]`` or a file of them), each categorised by its kind."""
    from diffrl.shapes import in_grammar, parse_prompt

    prompts = eval_prompts(spec, n)
    if not in_grammar(prompts):
        raise PromptError(f"prompt source {spec!r} holds prompts outside the shapes grammar; the shapes verifier "
                          "cannot score them (use --suite reward)")
    return [Item(p, parse_prompt(p).kind) for p in prompts]


class ShapesSuite:
    """The shapes verifier (``rewards.shapes``) on shapes prompts: strict accuracy per prompt kind."""

    name, metric, overall = "shapes", "strict", "samples"

    def __init__(self, options: SuiteOptions):
        _unused(options, self.name, ())
        self.spec, self.n = options.prompts or "shapes", options.n or 64

    def items(self) -> list[Item]:
        return _shapes_items(self.spec, self.n)

    def score(self, images: Tensor, items: Sequence[Item]) -> list[dict]:
        from rewards.shapes import shapes_reward

        out = shapes_reward(images, [it.prompt for it in items])
        return [{"scores": {"strict": float(s), "partial": float(p)}} for s, p in zip(out["strict"], out["partial"])]


class OcrSuite:
    """The OCR reward (``rewards.ocr``) on held-out text-rendering prompts, per target length."""

    name, metric, overall = "ocr", "ocr", "samples"

    def __init__(self, options: SuiteOptions):
        import rewards

        _unused(options, self.name, ())
        self.path, self.n = options.prompts or str(OCR_PROMPTS), options.n
        self.reward = rewards.load("ocr", **options.reward_options.get("ocr", {}))

    def items(self) -> list[Item]:
        from rewards.ocr import target_text

        items = []
        for i, record in enumerate(read_records(self.path)[: self.n], 1):
            if not isinstance(record.get("text"), str) or target_text(record["prompt"]) != record["text"]:
                raise PromptError(f"{self.path}, line {i}: the ocr suite needs a \"text\" equal to the prompt's "
                                  "quoted text")
            items.append(Item(record["prompt"], str(record.get("category", "all")), {"text": record["text"]}))
        return items

    def score(self, images: Tensor, items: Sequence[Item]) -> list[dict]:
        scores = self.reward(images, [it.prompt for it in items])["ocr"].tolist()
        return [{"scores": {"ocr": s, "exact": float(s == 1.0)}, "target": it.meta["text"]}
                for s, it in zip(scores, items)]


def _detector(spec: Optional[str]) -> Callable:
    """The GenEval detector ``spec`` names: ``shapes`` (the default) or a ``pkg.module:attr`` path (a class is
    instantiated without arguments); ValueError in one sentence for one that cannot be imported."""
    from diffrl.geneval import shapes_detector

    if spec in (None, "shapes"):
        return shapes_detector
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"--detector {spec!r} must be shapes or a 'pkg.module:attr' path")
    try:
        found = importlib.import_module(module)
        for part in attr.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--detector {spec!r} cannot be loaded: {e}") from None
    return found() if isinstance(found, type) else found


class GenevalSuite:
    """GenEval's scoring (``diffrl.geneval``): an image is correct iff every clause of its prompt's metadata holds
    on the detector's objects; the score is the mean over tags of each tag's accuracy."""

    name, metric, overall = "geneval", "correct", "categories"

    def __init__(self, options: SuiteOptions):
        _unused(options, self.name, ("--detector",))
        self.path, self.n = options.prompts, options.n
        self.detector = _detector(options.detector)

    def items(self) -> list[Item]:
        from diffrl.geneval import check_metadata, shapes_metadata

        if self.path is None:
            records = shapes_metadata(self.n or 96)
        else:
            try:
                records = [check_metadata(r, f"{self.path}, line {i}")
                           for i, r in enumerate(read_records(self.path)[: self.n], 1)]
            except ValueError as e:
                raise PromptError(str(e)) from None
        return [Item(r["prompt"], r["tag"], {"geneval": r}) for r in records]

    def score(self, images: Tensor, items: Sequence[Item]) -> list[dict]:
        from diffrl.geneval import check, kept_detections
        from diffrl.scoring import RewardError
        from rewards.shapes import to_pil

        out = []
        for image, item in zip(to_pil(images), items):
            found = kept_detections(self.detector(image), item.category)
            try:
                correct, reasons = check(item.meta["geneval"], found)
            except ValueError as e:  # a detector that names no colours, for a colour clause
                raise RewardError(f"the GenEval suite cannot score {item.prompt!r}: {e}") from None
            objects = [{k: list(v) if k == "box" else v for k, v in d.items()} for ds in found.values() for d in ds]
            out.append({"scores": {"correct": float(correct)}, "reason": "; ".join(reasons), "objects": objects})
        return out


class RewardSuite:
    """Any rewards (``--reward``, repeatable; the first is the headline) on any prompts: each reward's mean over
    the samples it scores, per category (a .jsonl file's ``category`` field, the kind of shapes prompts, else
    ``all``)."""

    name, overall = "reward", "samples"

    def __init__(self, options: SuiteOptions):
        import rewards

        _unused(options, self.name, ("--reward",))
        if not options.rewards:
            raise ValueError("the reward suite needs at least one --reward NAME")
        self.spec, self.n, self.metric = options.prompts or "shapes", options.n or 64, options.rewards[0]
        self.rewards = {name: rewards.load(name, **options.reward_options.get(name, {})) for name in options.rewards}

    def items(self) -> list[Item]:
        if self.spec == "shapes" or self.spec.startswith("shapes:"):
            return _shapes_items(self.spec, self.n)
        prompts = eval_prompts(self.spec, self.n)  # as the rewards get them in training
        if self.spec.endswith(".jsonl"):
            records = read_records(self.spec)
            return [Item(p, str(r.get("category", "all"))) for p, r in zip(prompts, records)]
        return [Item(p, "all") for p in prompts]

    def score(self, images: Tensor, items: Sequence[Item]) -> list[dict]:
        from diffrl.scoring import score_samples

        prompts, columns = [it.prompt for it in items], {}
        for name, reward in self.rewards.items():  # one at a time: each reward's invalid samples are its own
            scores, valid = score_samples({name: reward}, images, prompts)
            columns[name] = [float(s) if ok else None for s, ok in zip(scores[name], valid)]
        return [{"scores": {name: values[i] for name, values in columns.items()}} for i in range(len(items))]


SUITES: dict[str, type] = {"shapes": ShapesSuite, "ocr": OcrSuite, "geneval": GenevalSuite, "reward": RewardSuite}
"""Suite name -> class (built with ``SuiteOptions``)."""


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    """The mean of the values that are not None (None when there are none)."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def summarize(samples: Sequence[dict], overall: str) -> dict:
    """``{"overall": {metric: value}, "categories": {category: {"n": samples, metric: mean}}}`` from per-sample
    results (``{"category", "scores": {metric: value or None}}``), categories in order of first appearance; the
    overall value is the mean over samples (``overall="samples"``) or of the category means (``"categories"``)."""
    metrics = list(samples[0]["scores"])
    rows: dict[str, list[dict]] = {}
    for s in samples:
        rows.setdefault(s["category"], []).append(s)
    categories = {c: {"n": len(r), **{m: _mean([s["scores"][m] for s in r]) for m in metrics}} for c, r in rows.items()}
    pool = categories.values() if overall == "categories" else [s["scores"] for s in samples]
    return {"overall": {m: _mean([p[m] for p in pool]) for m in metrics}, "categories": categories}
