"""The VLM-judge reward against a fake OpenAI-compatible chat-completions server on 127.0.0.1: the request format,
the three ways to read a score, invalid samples (NaN, dropped by the scoring), timeouts and retries, concurrency,
and the options refused at load time."""
import base64
import io
import json
import math
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import rewards
from diffrl.scoring import score_batch
from rewards.remote import RemoteRewardError

ROOT = Path(__file__).resolve().parents[1]


class FakeVLM:
    """A chat-completions endpoint whose ``reply(question text) -> (status, answer, delay s)`` decides each answer;
    it records every request (path, headers, JSON body) and the most requests it held at once."""

    def __init__(self, reply: Callable[[str], tuple[int, str, float]]) -> None:
        self.reply, self.requests, self.inflight, self.max_inflight = reply, [], 0, 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())  # daemon handler threads
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def _handler(self) -> type:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append((self.path, dict(self.headers), body))
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                try:
                    status, answer, delay = fake.reply(body["messages"][0]["content"][0]["text"])
                    time.sleep(delay)
                finally:  # out of flight before the reply leaves: the client may send its next request at once
                    with fake.lock:
                        fake.inflight -= 1
                try:
                    payload = ({"choices": [{"message": {"role": "assistant", "content": answer}}]} if status == 200
                               else {"error": {"message": answer, "code": status}})
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and hung up
                    pass

            def log_message(self, fmt: str, *args) -> None:
                pass

        return Handler


@pytest.fixture
def serve():
    started = []

    def start(reply: Callable[[str], tuple[int, str, float]]) -> FakeVLM:
        fake = FakeVLM(reply)
        threading.Thread(target=fake.server.serve_forever, args=(0.05,), daemon=True).start()  # quick shutdown
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.server.shutdown()
        fake.server.server_close()


def answers(table: dict[str, str]) -> Callable[[str], tuple[int, str, float]]:
    """Answer each question (the bare prompt) from ``table``, at once."""
    return lambda text: (200, table[text], 0.0)


def judge(fake: FakeVLM, **options) -> Callable:
    options = {"model": "judge-model", "question": "{prompt}", "timeout": 5.0, "backoff": 0.01, **options}
    return rewards.load("vlm_judge", base_url=fake.url, **options)


def test_the_request_carries_model_question_and_the_image_as_png(serve, monkeypatch):
    fake = serve(lambda text: (200, "8", 0.0))
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    reward = judge(fake, question='Rate {"braces": "stay"} for "{prompt}" from 0 to 10.', max_tokens=5,
                   api_key_env="TEST_JUDGE_KEY")
    assert rewards.modalities(reward) == ("image",)
    assert reward([image], ["a red cube"])["vlm_judge"].tolist() == pytest.approx([0.8])
    (path, headers, body), = fake.requests
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test"
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("judge-model", 5, 0)
    (message,) = body["messages"]
    text, picture = message["content"]
    assert message["role"] == "user"
    assert text == {"type": "text", "text": 'Rate {"braces": "stay"} for "a red cube" from 0 to 10.'}
    assert picture["type"] == "image_url"
    prefix, _, data = picture["image_url"]["url"].partition(",")
    assert prefix == "data:image/png;base64"
    sent = Image.open(io.BytesIO(base64.b64decode(data)))
    assert sent.format == "PNG"
    assert np.array_equal(np.asarray(sent), np.asarray(image))


def test_tensor_images_are_sent_as_their_8_bit_pngs(serve):
    fake = serve(lambda text: (200, "5", 0.0))
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert judge(fake)(images, ["a", "b"])["vlm_judge"].tolist() == [0.5, 0.5]
    sent = {body["messages"][0]["content"][0]["text"]: body["messages"][0]["content"][1]["image_url"]["url"]
            for _, _, body in fake.requests}
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(sent["b"].partition(",")[2]))))
    assert np.array_equal(decoded, (images[1] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def test_first_number_scores_and_an_unparseable_answer_is_an_invalid_sample(serve, caplog):
    table = {"p1": "7", "p2": " 2.5 out of 10", "p3": "I cannot tell.", "p4": "Score: 10/10", "p5": "12"}
    fake = serve(answers(table))
    images = [Image.new("RGB", (8, 8))] * 5
    out = judge(fake)(images, list(table))["vlm_judge"]
    assert out[[0, 1, 3]].tolist() == pytest.approx([0.7, 0.25, 1.0])
    assert math.isnan(out[2]) and math.isnan(out[4])  # no number; a number outside score_range
    assert "no score (parse: number) in the answer 'I cannot tell.' for prompt 'p3'" in caplog.text
    scores, valid = score_batch({"vlm_judge": judge(fake)}, images, list(table))  # the trainer's scoring
    assert valid.tolist() == [True, True, False, True, False]
    assert scores["vlm_judge"].tolist() == pytest.approx([0.7, 0.25, 0.0, 1.0, 0.0])


def test_a_regex_reads_its_group_and_score_range_normalises(serve):
    table = {"a": "3 legs, 2 ears. Rating: 4", "b": "rating: 2", "c": "Rating: 1.5", "d": "no rating"}
    fake = serve(answers(table))
    reward = judge(fake, parse="regex", pattern=r"(?i)rating:\s*(\d+(?:\.\d+)?)", score_range=[1, 5])
    out = reward([Image.new("RGB", (8, 8))] * 4, list(table))["vlm_judge"]
    assert out[:3].tolist() == pytest.approx([0.75, 0.25, 0.125])
    assert math.isnan(out[3])


def test_yes_no_answers_are_one_or_zero(serve):
    table = {"a": "Yes.", "b": "**No**, the cube is blue.", "c": "yes", "d": "Maybe", "e": "Nothing matches"}
    fake = serve(answers(table))
    out = judge(fake, parse="yes_no")([Image.new("RGB", (8, 8))] * 5, list(table))["vlm_judge"]
    assert out[:3].tolist() == [1.0, 0.0, 1.0]
    assert math.isnan(out[3]) and math.isnan(out[4])


def test_a_slow_endpoint_times_out_and_is_retried_then_the_sample_is_invalid(serve, caplog):
    fake = serve(lambda text: (200, "9", 1.0))
    t0 = time.monotonic()
    out = judge(fake, timeout=0.2, retries=2)([Image.new("RGB", (8, 8))], ["slow"])["vlm_judge"]
    assert math.isnan(out[0])
    assert len(fake.requests) == 3  # the first attempt and 2 retries
    assert time.monotonic() - t0 < 1.5
    assert "VLM judge" in caplog.text and "failed after 3 attempts" in caplog.text


def test_a_500_is_retried_and_the_retry_scores(serve):
    calls = []

    def reply(text: str) -> tuple[int, str, float]:
        calls.append(text)
        return (500, "engine overloaded", 0.0) if len(calls) == 1 else (200, "6", 0.0)

    fake = serve(reply)
    assert judge(fake, retries=2)([Image.new("RGB", (8, 8))], ["a"])["vlm_judge"].tolist() == pytest.approx([0.6])
    assert len(fake.requests) == 2


def test_a_400_is_raised_at_once_without_retries(serve):
    fake = serve(lambda text: (400, "The model `judge-model` does not exist.", 0.0))
    with pytest.raises(RemoteRewardError, match=r"refused the request \(400\): The model `judge-model` does not exist"):
        judge(fake, retries=3)([Image.new("RGB", (8, 8))], ["a"])
    assert len(fake.requests) == 1


def test_an_unreachable_endpoint_is_retried_then_the_samples_are_invalid():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reward = rewards.load("vlm_judge", base_url=f"http://127.0.0.1:{port}/v1", model="m", retries=1, backoff=0.01,
                          timeout=0.5)
    assert torch.isnan(reward([Image.new("RGB", (8, 8))] * 2, ["a", "b"])["vlm_judge"]).all()


def test_requests_run_concurrently_up_to_the_option(serve):
    fake = serve(lambda text: (200, "10", 0.2))
    t0 = time.monotonic()
    out = judge(fake, concurrency=3)([Image.new("RGB", (8, 8))] * 7, [str(i) for i in range(7)])["vlm_judge"]
    assert out.tolist() == [1.0] * 7
    assert len(fake.requests) == 7 and fake.max_inflight == 3
    assert time.monotonic() - t0 < 7 * 0.2  # three rounds of 0.2 s, not seven


SERVED = {"base_url": "http://127.0.0.1:8000/v1", "model": "m"}


@pytest.mark.parametrize("options, message", [
    ({"model": "m"}, "vlm_judge needs base_url"),
    ({"base_url": "http://127.0.0.1:8000/v1"}, "needs base_url .* and model"),
    ({"base_url": "127.0.0.1:8000/v1", "model": "m"}, "base_url must be an http"),
    ({"base_url": "http://h/v1/chat/completions", "model": "m"}, "base_url must be an http"),
    ({**SERVED, "parse": "stars"}, "parse must be one of number, yes_no, regex, got 'stars'"),
    ({**SERVED, "parse": "regex"}, "parse: regex needs a pattern"),
    ({**SERVED, "pattern": r"(\d+)"}, "pattern is only read with parse: regex, and parse is 'number'"),
    ({**SERVED, "model": 7}, "needs base_url .* and model"),
    ({**SERVED, "parse": "regex", "pattern": "(unclosed"}, r"pattern '\(unclosed' is not a regular expression"),
    ({**SERVED, "parse": "regex", "pattern": r"\d+"}, "must have one capturing group .* it has 0"),
    ({**SERVED, "score_range": [10, 0]}, "score_range must be two numbers"),
    ({**SERVED, "score_range": 10}, "score_range must be two numbers"),
    ({**SERVED, "concurrency": 0}, "concurrency >= 1"),
    ({**SERVED, "api_key_env": "TEST_JUDGE_KEY_UNSET"}, "environment variable TEST_JUDGE_KEY_UNSET, which is not set"),
])
def test_bad_options_are_one_sentence_at_load_time(options, message, monkeypatch):
    monkeypatch.delenv("TEST_JUDGE_KEY_UNSET", raising=False)
    with pytest.raises(ValueError, match=message) as e:
        rewards.load("vlm_judge", **options)
    assert "\n" not in str(e.value)


def test_the_docs_example_config_loads():
    text = (ROOT / "docs" / "rewards.md").read_text()
    section = text.split("## A vision-language model as judge", 1)[1].split("\n## ", 1)[0]
    cfg = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    assert cfg["rewards"] == {"vlm_judge": 1.0}
    assert callable(rewards.load("vlm_judge", **cfg["reward_options"]["vlm_judge"]))
