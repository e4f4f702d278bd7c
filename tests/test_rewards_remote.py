"""The HTTP reward server and client: round trip, batching, NaN, bad requests, retries, and the CLI's default bind."""
import json
import math
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

import rewards
from rewards.remote import RemoteRewardError, make_server


def brightness(media, prompts):
    if isinstance(media, torch.Tensor):  # videos arrive as [B, F, 3, H, W] in [0, 1]
        out = media.flatten(1).mean(1)
    else:
        out = torch.stack([torch.tensor(np.asarray(m), dtype=torch.float32) for m in media]).div(255).mean((1, 2, 3))
    return {"bright": torch.where(torch.tensor(["nan" in p for p in prompts]), torch.nan, out), "len": out * 0 + 1}


@pytest.fixture
def server():
    calls = []

    def counted(media, prompts):
        calls.append(len(prompts))
        if "boom" in prompts:
            raise RuntimeError("judge crashed")
        return brightness(media, prompts)

    srv = make_server(counted, "tests:brightness", port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", calls
    srv.shutdown()
    srv.server_close()


def test_round_trip_in_batches_with_nan(server):
    url, calls = server
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = rewards.load("remote", url=url, batch_size=2)(images, ["a", "nan", "c", "d", "e"])
    assert calls == [2, 2, 1]
    expected = (images * 255).round().clamp(0, 255) / 255  # PNG carries 8-bit pixels
    assert torch.allclose(out["bright"][[0, 2, 3, 4]], expected.mean(dim=(1, 2, 3))[[0, 2, 3, 4]], atol=1e-5)
    assert math.isnan(out["bright"][1])


def test_videos_travel_as_png_frames(server):
    url, _ = server
    video = torch.rand(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = rewards.load("remote", url=url)(video, ["a", "b"])["bright"]
    assert torch.allclose(out, ((video * 255).round() / 255).flatten(1).mean(1), atol=1e-5)


def test_bad_requests_get_a_400_and_the_server_survives(server):
    url, _ = server
    for body in (b"not json", json.dumps({"prompts": ["a"]}).encode(),
                 json.dumps({"prompts": ["a"], "images": ["!!notbase64"]}).encode(),
                 json.dumps({"prompts": ["a", "b"], "images": []}).encode()):
        req = urllib.request.Request(url + "/score", data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400 and json.loads(e.value.read())["error"]
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"ok": True, "reward": "tests:brightness"}


def test_a_raising_reward_is_a_500_retried_then_one_error(server):
    url, calls = server
    reward = rewards.load("remote", url=url, retries=2, backoff=0.01)
    with pytest.raises(RemoteRewardError, match=r"failed after 3 attempts \(last: 500: reward tests:brightness raised"):
        reward(torch.rand(1, 3, 8, 8), ["boom"])
    assert calls == [1, 1, 1]


def test_unreachable_server_retries_then_fails():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    with pytest.raises(RemoteRewardError, match="failed after 2 attempts"):
        rewards.load("remote", url=f"http://127.0.0.1:{port}", retries=1, backoff=0.05, timeout=2)(
            torch.rand(1, 3, 8, 8), ["a"])
    assert time.time() - t0 < 10


def test_cli_serves_on_localhost_by_default(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "diffrl", "serve-reward", "jpeg_compressibility", "--port", "0",
                             "--option", "quality=90"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving reward jpeg_compressibility on http://127.0.0.1:")
        url = line.split()[4]
        out = rewards.load("remote", url=url)(torch.zeros(2, 3, 8, 8), ["a", "b"])
        assert out["jpeg_compressibility"].shape == (2,) and (out["jpeg_compressibility"] < 0).all()
    finally:
        proc.terminate()
        proc.wait(10)
    bad = subprocess.run([sys.executable, "-m", "diffrl", "serve-reward", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("diffrl: cannot load reward 'nope': unknown reward")
