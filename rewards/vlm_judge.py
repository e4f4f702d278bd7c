"""A vision-language model as judge: each image and a question go to an OpenAI-compatible chat-completions endpoint
(what ``vllm serve`` and SGLang answer), and the score is read from the model's answer.

    rewards: {vlm_judge: 1.0}
    reward_options: {vlm_judge: {base_url: http://127.0.0.1:8000/v1, model: Qwen/Qwen2.5-VL-7B-Instruct}}

Each sample is one ``POST {base_url}/chat/completions`` with ``{"model", "messages": [{"role": "user", "content":
[{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}],
"max_tokens", "temperature": 0}``; ``concurrency`` of them are in flight at once. The score is read from
``choices[0].message.content``. A sample whose answer holds no score, or whose request failed every attempt, scores
NaN (with a warning saying why), so the trainer leaves it out of the update and scores the rest. A 4xx (a wrong model
name, a bad key) raises at once: retrying cannot fix it.

The HTTP client, with its timeouts and retries, is ``rewards.remote.post_json``; only the standard library talks
HTTP.
"""
from __future__ import annotations

import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image
from torch import Tensor

from rewards.remote import RemoteUnavailableError, png_b64, post_json
from rewards.shapes import to_pil

log = logging.getLogger("diffrl")
DEFAULT_QUESTION = ('How well does this image show "{prompt}"? Rate it from 0 (not at all) to 10 (perfectly). '
                    "Answer with the number only.")
PARSERS = ("number", "yes_no", "regex")
NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)  # "Yes.", "**No**", " yes, because ..."


def chat_request(model: str, text: str, image: Image.Image, max_tokens: int) -> dict:
    """The chat-completions body for one image and its question (deterministic: temperature 0)."""
    content = [{"type": "text", "text": text},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64(image)}}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}


def answer_text(response: Any) -> str:
    """``choices[0].message.content`` of a chat-completions answer; ValueError if the answer has none."""
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("the answer has no choices[0].message.content") from None
    if not isinstance(content, str):
        raise ValueError(f"the answer's content is {type(content).__name__}, not text")
    return content


def score_parser(parse: str, pattern: Optional[str], score_range: Sequence[float]) -> Callable[[str], float]:
    """A function from an answer to a score in [0, 1], NaN where the answer holds none. ``number``: the answer's
    first number; ``regex``: ``pattern``'s one group (the first match); both map ``score_range`` ``(lo, hi)`` linearly
    onto [0, 1], and a number outside it is no score. ``yes_no``: 1 for an answer starting with yes, 0 for no.
    ValueError (one sentence) on a bad option."""
    if parse not in PARSERS:
        raise ValueError(f"vlm_judge's parse must be one of {', '.join(PARSERS)}, got {parse!r}")
    if parse == "regex" and pattern is None:
        raise ValueError("vlm_judge's parse: regex needs a pattern, a regular expression with one group (the score)")
    if parse != "regex" and pattern is not None:
        raise ValueError(f"vlm_judge's pattern is only read with parse: regex, and parse is {parse!r}")
    if parse == "yes_no":
        return _yes_no
    regex = NUMBER if pattern is None else _compile(pattern)
    if not (isinstance(score_range, (list, tuple)) and len(score_range) == 2
            and all(isinstance(v, (int, float)) for v in score_range) and score_range[0] < score_range[1]):
        raise ValueError(f"vlm_judge's score_range must be two numbers [lo, hi] with lo < hi, got {score_range!r}")
    lo, hi = float(score_range[0]), float(score_range[1])

    def number(answer: str) -> float:
        match = regex.search(answer)
        try:
            value = float(match.group(1 if regex.groups else 0)) if match else math.nan
        except (TypeError, ValueError):  # the group did not take part in the match, or holds no number
            return math.nan
        return (value - lo) / (hi - lo) if lo <= value <= hi else math.nan

    return number


def _yes_no(answer: str) -> float:
    match = YES_NO.match(answer)
    return math.nan if match is None else float(match.group(1).lower() == "yes")


def _compile(pattern: str) -> re.Pattern:
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"vlm_judge's pattern {pattern!r} is not a regular expression ({e})") from None
    if regex.groups != 1:
        raise ValueError(f"vlm_judge's pattern {pattern!r} must have one capturing group (the score), it has "
                         f"{regex.groups}")
    return regex


def _endpoint(base_url: Optional[str], model: Optional[str]) -> str:
    """``{base_url}/chat/completions``, or ValueError naming the missing or malformed option."""
    if not (base_url and isinstance(base_url, str) and model and isinstance(model, str)):
        raise ValueError("vlm_judge needs base_url (the API root, such as http://127.0.0.1:8000/v1) and model (the "
                         "served model's name), both strings")
    base = base_url.rstrip("/")
    if not base.startswith(("http://", "https://")) or base.endswith("/chat/completions"):
        raise ValueError(f"vlm_judge's base_url must be an http(s) API root such as http://127.0.0.1:8000/v1, got "
                         f"{base_url!r}")
    return base + "/chat/completions"


def _auth(api_key_env: Optional[str]) -> dict[str, str]:
    """The ``Authorization`` header from environment variable ``api_key_env`` (none without it)."""
    if api_key_env is None:
        return {}
    key = os.environ.get(api_key_env)
    if not key:
        raise ValueError(f"vlm_judge's api_key_env names the environment variable {api_key_env}, which is not set")
    return {"Authorization": f"Bearer {key}"}


def build(base_url: Optional[str] = None, model: Optional[str] = None, question: str = DEFAULT_QUESTION,
          parse: str = "number", pattern: Optional[str] = None, score_range: Sequence[float] = (0, 10),
          max_tokens: int = 32, concurrency: int = 8, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
          api_key_env: Optional[str] = None) -> Callable:
    """Registry factory (``vlm_judge``): a reward ``{"vlm_judge": [B]}`` in [0, 1] from a VLM's answers.

    Args:
        base_url: the OpenAI-compatible API root, such as ``http://127.0.0.1:8000/v1`` (required).
        model: the served model's name, as the server knows it (required).
        question: the text sent with each image; ``{prompt}`` in it becomes the sample's prompt (other braces stay).
        parse: how the answer becomes a score: ``number`` (its first number), ``regex`` (``pattern``'s group) or
            ``yes_no`` (1 for an answer starting with yes, 0 for no).
        pattern: with ``parse: regex``, a regular expression with one capturing group around the number, such as
            ``"Score: (\\d+)"``; the first match counts.
        score_range: ``[lo, hi]`` of the numbers the question asks for, mapped onto [0, 1]; a number outside it is no
            score (NaN). Not read by ``yes_no``.
        max_tokens: the longest answer, in tokens.
        concurrency: requests in flight at once (a thread each).
        timeout: seconds for the connection and for each read of one request; a slower request is retried.
        retries: further attempts after a timeout, a connection error or a 5xx (not after a 4xx, which raises).
            Failing all ``retries + 1`` attempts makes the sample NaN.
        backoff: seconds before the first retry; each further wait doubles. So a sample whose server never answers
            gives up after ``(retries + 1) * timeout + (2**retries - 1) * backoff`` seconds (243.5 s with the
            defaults, under the default ``train.reward_timeout_s`` of 600).
        api_key_env: the name of an environment variable holding an API key, sent as ``Authorization: Bearer``.
            The key itself never goes in the config.
    """
    endpoint, headers = _endpoint(base_url, model), _auth(api_key_env)
    parse_score = score_parser(parse, pattern, score_range)
    if not (concurrency >= 1 and retries >= 0 and timeout > 0 and backoff >= 0 and max_tokens >= 1):
        raise ValueError("vlm_judge needs concurrency >= 1, retries >= 0, timeout > 0, backoff >= 0 and max_tokens "
                         f">= 1, got {concurrency}, {retries}, {timeout}, {backoff} and {max_tokens}")

    def judge(image: Image.Image, prompt: str) -> float:
        body = chat_request(model, question.replace("{prompt}", prompt), image, max_tokens)
        try:
            answer = answer_text(post_json(endpoint, body, timeout=timeout, retries=retries, backoff=backoff,
                                           headers=headers, server="VLM judge"))
        except (RemoteUnavailableError, ValueError) as e:
            log.warning("vlm_judge: no score for prompt %r: %s", prompt, e)
            return math.nan
        score = parse_score(answer)
        if math.isnan(score):
            log.warning("vlm_judge: no score (parse: %s) in the answer %r for prompt %r", parse, answer[:200], prompt)
        return score

    def reward(media: Any, prompts: Sequence[str]) -> dict[str, Tensor]:
        images = to_pil(media)
        if len(images) != len(prompts):
            raise ValueError(f"vlm_judge got {len(images)} images for {len(prompts)} prompts")
        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="vlm-judge")
        try:
            scores = list(pool.map(judge, images, prompts))
        finally:  # after a 4xx, send none of the requests still queued
            pool.shutdown(cancel_futures=True)
        return {"vlm_judge": torch.tensor(scores, dtype=torch.float32)}

    return reward
