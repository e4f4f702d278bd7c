"""The reward server's limits: pixel budgets read from PNG headers before any decoding, a 400 for
every malformed request, a socket timeout for half-sent requests, and a cap on concurrent handler threads."""
import base64
import io
import json
import socket
import struct
import threading
import time
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from rewards.remote import MAX_BODY, MAX_IMAGE_PIXELS, RemoteRewardError, make_server


def mean_pixel(media, prompts):
    if isinstance(media, torch.Tensor):  # videos: [B, F, 3, H, W] in [0, 1]
        return {"mean": media.flatten(1).mean(1)}
    return {"mean": torch.tensor([np.asarray(m, dtype=np.float32).mean() / 255 for m in media])}


@contextmanager
def serving(**limits):
    srv = make_server(mean_pixel, "tests:mean_pixel", port=0, **limits)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def workers(srv) -> dict:
    """Counts the server's handler threads while they run (``running``) by wrapping its per-connection target."""
    state, lock, handle = {"running": 0}, threading.Lock(), srv.process_request_thread

    def counted(request, address):
        with lock:
            state["running"] += 1
        try:
            handle(request, address)
        finally:
            with lock:
                state["running"] -= 1

    srv.process_request_thread = counted
    return state


def wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def png(width, height, seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def claiming(width, height) -> bytes:
    """A 1x1 PNG whose header (IHDR, with a valid CRC) claims ``width`` x ``height`` pixels: 69 bytes."""
    data = bytearray(png(1, 1))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(data[12:29]))
    return bytes(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def post(srv, body: bytes, length="auto"):
    """``(status, answer)`` for a raw ``POST /score`` (``length`` None: no Content-Length header)."""
    head = b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if length is not None:
        head += f"Content-Length: {len(body) if length == 'auto' else length}\r\n".encode()
    with socket.create_connection(srv.server_address[:2], timeout=10) as s:
        s.sendall(head + b"\r\n" + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status, _, payload = answer.partition(b"\r\n\r\n")
    return int(status.split()[1]), json.loads(payload)


@pytest.fixture
def opened(monkeypatch):
    """Every Image.open call the server makes (to prove a request was refused before decoding)."""
    calls, real_open = [], Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: calls.append(1) or real_open(*a, **k))
    return calls


def test_a_png_claiming_20000x20000_pixels_is_refused_from_its_header(opened):
    huge = b64(claiming(20000, 20000))
    with serving() as srv:
        t0 = time.monotonic()
        for body in ({"prompts": ["a"], "images": [huge]}, {"prompts": ["a"], "videos": [[huge]]}):
            code, answer = post(srv, json.dumps(body).encode())
            assert code == 400 and "20000x20000 = 400000000 pixels" in answer["error"]
            assert f"over the budget of {MAX_IMAGE_PIXELS} pixels per image" in answer["error"]
        assert time.monotonic() - t0 < 2 and opened == []
        code, answer = post(srv, json.dumps({"prompts": ["a"], "images": [b64(png(4, 4))]}).encode())
        assert code == 200 and len(answer["scores"]["mean"]) == 1 and opened == [1]


def test_non_png_payloads_are_refused_before_decoding(opened):
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    with serving() as srv:
        for data in (jpeg.getvalue(), b"GIF89a" + bytes(30), b"\x89PNG"):
            code, answer = post(srv, json.dumps({"prompts": ["a"], "images": [b64(data)]}).encode())
            assert code == 400 and "not a PNG" in answer["error"]
    assert opened == []


def test_the_request_budget_counts_every_image_and_frame():
    with serving(max_image_pixels=16 * 16, max_request_pixels=3 * 16 * 16) as srv:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        assert rewards.load("remote", url=url, batch_size=3)(images, list("abcd"))["mean"].shape == (4,)
        with pytest.raises(RemoteRewardError, match=r"\(400\).* hold 1024 pixels, over the budget of 768 pixels per"):
            rewards.load("remote", url=url, batch_size=4)(images, list("abcd"))
        video = torch.rand(2, 2, 3, 16, 16)  # 4 frames of 256 pixels
        assert rewards.load("remote", url=url, batch_size=1)(video, ["a", "b"])["mean"].shape == (2,)
        with pytest.raises(RemoteRewardError, match="hold 1024 pixels, over the budget of 768 pixels per request"):
            rewards.load("remote", url=url, batch_size=2)(video, ["a", "b"])
        code, answer = post(srv, json.dumps({"prompts": ["a"], "images": [b64(png(17, 16))]}).encode())
        assert code == 400 and "17x16 = 272 pixels, over the budget of 256 pixels per image" in answer["error"]


def test_malformed_requests_get_a_400_with_a_message():
    with serving() as srv:
        for length in ("abc", "-5", "0", "1e3", None):
            code, answer = post(srv, b"", length=length)
            assert code == 400 and "Content-Length" in answer["error"]
        code, answer = post(srv, b"", length=str(MAX_BODY + 1))
        assert code == 413 and str(MAX_BODY) in answer["error"]
        code, answer = post(srv, b"[" * 100_000)
        assert code == 400 and "nested too deeply" in answer["error"]
        code, answer = post(srv, b"[" + b"[]," * 200_000 + b"[]]")  # 600 kB that json.loads would make ~13 MB
        assert code == 400 and "JSON values" in answer["error"]
        for body in ({"prompts": ["a"], "images": 5}, {"prompts": ["a"], "images": [3]},
                     {"prompts": ["a"], "videos": ["abc"]}, {"prompts": [1], "images": []},
                     {"prompts": ["a"], "videos": [[b64(png(4, 4)), b64(png(4, 5))]]}):
            code, answer = post(srv, json.dumps(body).encode())
            assert code == 400 and answer["error"], body
        code, answer = post(srv, json.dumps({"prompts": ["a"], "images": [b64(png(4, 4))]}).encode())
        assert code == 200


def test_a_half_sent_body_is_dropped_after_the_socket_timeout():
    with serving(timeout=1.0) as srv:
        state = workers(srv)
        with socket.create_connection(srv.server_address[:2], timeout=10) as s:
            s.sendall(b"POST /score HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{\"prompts\": ")
            t0 = time.monotonic()
            assert s.recv(1024) == b""  # the server hangs up
            assert 0.5 < time.monotonic() - t0 < 5
        wait_for(lambda: state["running"] == 0, 2)


def test_slow_connections_past_the_worker_cap_start_no_threads():
    with serving(timeout=5.0, max_workers=2) as srv:
        state, baseline = workers(srv), threading.active_count()
        slow = [socket.create_connection(srv.server_address[:2], timeout=10) for _ in range(6)]
        for s in slow:
            s.sendall(b"POST /score HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{")
        wait_for(lambda: state["running"] >= 2)
        time.sleep(0.3)  # time for any more threads to start
        assert state["running"] == 2 and threading.active_count() - baseline == 2
        for s in slow:
            s.close()
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        assert rewards.load("remote", url=url, retries=0)(torch.rand(1, 3, 8, 8), ["a"])["mean"].shape == (1,)


def test_shutdown_does_not_wait_for_a_busy_worker():
    with serving(timeout=5.0, max_workers=1) as srv:
        state = workers(srv)
        slow = [socket.create_connection(srv.server_address[:2], timeout=10) for _ in range(2)]
        wait_for(lambda: state["running"] == 1)
        time.sleep(0.3)  # the second connection now waits for the busy worker
        t0 = time.monotonic()
        srv.shutdown()
        assert time.monotonic() - t0 < 2
        for s in slow:
            s.close()
