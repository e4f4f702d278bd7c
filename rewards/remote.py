"""Rewards over HTTP: a server for any reward function and a client that is itself a reward.

Keep heavy or conflicting reward environments (GenEval detectors, VLM judges) out of the training process:

    diffrl serve-reward my_pkg.scores:judge --port 8765          # binds 127.0.0.1 unless --host says otherwise
    rewards: {remote: 1.0}  with  reward_options: {remote: {url: http://127.0.0.1:8765}}

Wire format (JSON, no pickle): ``POST /score`` with ``{"prompts": [str], "images": [base64 PNG]}`` for images, or
``"videos": [[base64 PNG frame, ...], ...]`` for videos (same frame count each); the answer is
``{"scores": {name: [float or null]}}`` (null for NaN). ``GET /health`` answers ``{"ok": true, "reward": path}``.
A malformed request gets a 400 with ``{"error": message}``; a reward that raises gets a 500 with its message;
the server keeps serving either way.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import math
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rewards.shapes import to_pil

log = logging.getLogger("diffrl")
MAX_BODY = 256 * 1024 * 1024


class RemoteRewardError(RuntimeError):
    """The reward server refused a request (4xx) or stayed unreachable after the retries."""


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def from_png_b64(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text, validate=True))).convert("RGB")


def encode_request(media: Any, prompts: Sequence[str]) -> dict:
    """The JSON body for a batch: images (PIL list or ``[B, 3, H, W]``) or videos (``[B, F, 3, H, W]``)."""
    if isinstance(media, Tensor) and media.dim() == 5:
        return {"prompts": list(prompts), "videos": [[png_b64(f) for f in to_pil(v)] for v in media]}
    return {"prompts": list(prompts), "images": [png_b64(img) for img in to_pil(media)]}


def decode_request(body: dict) -> tuple[Any, list[str]]:
    """``(media, prompts)`` from a request body; ValueError with a message on anything malformed."""
    if not isinstance(body, dict) or not isinstance(body.get("prompts"), list):
        raise ValueError("the body must be a JSON object with a 'prompts' list")
    prompts = body["prompts"]
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("'prompts' must be a list of strings")
    try:
        if "videos" in body:
            videos = [[np.asarray(from_png_b64(f), dtype=np.float32) / 255 for f in v] for v in body["videos"]]
            if len({len(v) for v in videos}) > 1 or len({f.shape for v in videos for f in v}) > 1:
                raise ValueError("every video must have the same number and size of frames")
            media = torch.from_numpy(np.stack([np.stack(v) for v in videos])).permute(0, 1, 4, 2, 3)
        elif "images" in body:
            media = [from_png_b64(img) for img in body["images"]]
        else:
            raise ValueError("the body needs 'images' (base64 PNGs) or 'videos' (lists of base64 PNG frames)")
    except (ValueError, OSError, TypeError) as e:
        raise ValueError(f"cannot decode the media: {e}") from None
    if len(media) != len(prompts):
        raise ValueError(f"{len(media)} media for {len(prompts)} prompts")
    return media, prompts


def _jsonable(scores: dict) -> dict:
    out = {}
    for name, value in scores.items():
        values = torch.as_tensor(value, dtype=torch.float32).flatten().tolist()
        out[str(name)] = [v if math.isfinite(v) else None for v in values]
    return out


def make_server(reward: Callable, name: str, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """An HTTP server (not started) that scores requests with ``reward``; ``port=0`` picks a free port."""

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/health":
                self._send(200, {"ok": True, "reward": name})
            else:
                self._send(404, {"error": f"no such path {self.path!r}; use POST /score or GET /health"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/score":
                self._send(404, {"error": f"no such path {self.path!r}; use POST /score"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY:
                self._send(400 if length <= 0 else 413, {"error": f"bad Content-Length {length}"})
                return
            try:
                media, prompts = decode_request(json.loads(self.rfile.read(length)))
            except (ValueError, json.JSONDecodeError) as e:
                self._send(400, {"error": str(e)})
                return
            try:
                scores = reward(media, prompts)
                self._send(200, {"scores": _jsonable(scores)})
            except Exception as e:  # noqa: BLE001 - a failing reward must not take the server down
                log.warning("reward %s raised on a batch of %d: %s", name, len(prompts), e)
                self._send(500, {"error": f"reward {name} raised {type(e).__name__}: {e}"})

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("reward server: " + fmt, *args)

    return ThreadingHTTPServer((host, port), Handler)


def build(url: str = "http://127.0.0.1:8765", timeout: float = 60.0, retries: int = 3, batch_size: int = 16,
          backoff: float = 0.5) -> Callable:
    """Registry factory (``remote``): a reward that posts batches of ``batch_size`` to a reward server, retrying
    connection failures and 5xx answers ``retries`` times with exponential backoff; a 4xx is raised at once."""
    endpoint = url.rstrip("/") + "/score"

    def post(body: dict) -> dict:
        data = json.dumps(body).encode()
        last: Optional[str] = None
        for attempt in range(retries + 1):
            request = urllib.request.Request(endpoint, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=timeout) as resp:
                    return json.loads(resp.read())["scores"]
            except urllib.error.HTTPError as e:
                message = json.loads(e.read() or b"{}").get("error", e.reason)
                if e.code < 500:
                    raise RemoteRewardError(f"reward server {url} refused the request ({e.code}): {message}") from None
                last = f"{e.code}: {message}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = str(getattr(e, "reason", e))
            if attempt < retries:
                time.sleep(backoff * 2**attempt)
        raise RemoteRewardError(f"reward server {url} failed after {retries + 1} attempts (last: {last})")

    def reward(media: Any, prompts: Sequence[str]) -> dict[str, Tensor]:
        parts: dict[str, list] = {}
        for start in range(0, len(prompts), batch_size):
            chunk = media[start : start + batch_size]
            scores = post(encode_request(chunk, prompts[start : start + batch_size]))
            for name, values in scores.items():
                parts.setdefault(name, []).extend(math.nan if v is None else v for v in values)
        return {name: torch.tensor(values, dtype=torch.float32) for name, values in parts.items()}

    return reward
