"""Rewards over HTTP: a server for any reward function and a client that is itself a reward.

Keep heavy or conflicting reward environments (GenEval detectors, VLM judges) out of the training process:

    diffrl serve-reward my_pkg.scores:judge --port 8765          # binds 127.0.0.1 unless --host says otherwise
    rewards: {remote: 1.0}  with  reward_options: {remote: {url: http://127.0.0.1:8765}}

Wire format (JSON, no pickle): ``POST /score`` with ``{"prompts": [str], "images": [base64 PNG]}`` for images, or
``"videos": [[base64 PNG frame, ...], ...]`` for videos (same frame count each), and ``"metadata": [object]`` (one
per prompt) when any prompt carries metadata (a ``diffrl.prompts.Prompt``): the server hands its reward ``Prompt``
objects with that metadata, so the reward reads it as it would in the training process. The answer is
``{"scores": {name: [float or null]}}`` (null for NaN). ``GET /health`` answers ``{"ok": true, "reward": path}``.
A malformed request gets a 400 with ``{"error": message}``; a reward that raises gets a 500 with its message;
the server keeps serving either way.

Limits, so that no request can take the server's memory or threads (each a ``make_server`` keyword where named):
- The body needs a ``Content-Length`` of 1 to ``MAX_BODY`` bytes (missing, not a decimal integer, or 0: 400; over
  the cap: 413) and at most ``MAX_JSON_VALUES`` JSON values (tiny values take ~20x their size in memory); JSON
  nested too deep is a 400.
- Pixel budgets, checked from each PNG's header before any image is decoded: ``max_image_pixels`` per image or frame
  (default ``MAX_IMAGE_PIXELS``) and ``max_request_pixels`` over all images or all frames of all videos
  (``MAX_REQUEST_PIXELS``). Anything that is not a PNG is refused undecoded. Over a budget: a 400 naming it.
- ``timeout`` seconds (``SOCKET_TIMEOUT``) for each read or write on a connection: a client that stops sending
  mid-request is dropped and its thread freed.
- At most ``max_workers`` (``MAX_WORKERS``) connections are handled at once; further ones wait to be accepted.
So each worker holds at most a few times ``MAX_BODY`` (the body, its text, its JSON) plus the decoded batch (4 bytes a
pixel for images, 12 for video frames as float32 [0, 1]).
"""
from __future__ import annotations

import base64
import io
import json
import logging
import math
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffrl.prompts import Prompt
from rewards.shapes import to_pil

log = logging.getLogger("diffrl")
MAX_BODY = 256 * 1024 * 1024  # bytes
MAX_JSON_VALUES = 100_000  # values in one body: a 16 x 121-frame video batch has about 2,000
MAX_IMAGE_PIXELS = 4096 * 4096  # per image or frame: 64 MB once decoded (PIL keeps RGB at 4 bytes a pixel)
MAX_REQUEST_PIXELS = 64 * 1024 * 1024  # per request: 64 images at 1024x1024, or two 81-frame 480x832 videos
SOCKET_TIMEOUT = 30.0  # seconds a connection may stay silent mid-request
MAX_WORKERS = 8  # connections handled at once
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class RemoteRewardError(RuntimeError):
    """The reward server refused a request (4xx) or stayed unreachable after the retries."""


class RemoteUnavailableError(RemoteRewardError):
    """The server stayed unreachable, timed out or answered 5xx on every attempt (``post_json``)."""


class _BodyTooLarge(ValueError):
    """A request body over ``MAX_BODY`` bytes (answered with a 413)."""


def png_b64(image: Image.Image) -> str:
    """One image as a base64 PNG (RGB)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def png_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from a PNG's first 24 bytes (signature, then the IHDR chunk's length, type, width and
    height as big-endian uint32), without decoding anything; ValueError if ``data`` does not start as a PNG."""
    if len(data) < 24 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("not a PNG: every image and frame must be a base64 PNG")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def from_png_b64(text: str) -> Image.Image:
    """One base64 PNG as an RGB image without its metadata. Decoding allocates the size its header claims: check
    that first (``png_size``, as ``decode_request`` does)."""
    image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)), formats=["PNG"]).convert("RGB")
    image.info = {}  # text chunks may hold up to 64 MB per image (PIL's MAX_TEXT_MEMORY): keep none alive
    return image


def encode_request(media: Any, prompts: Sequence[str]) -> dict:
    """The JSON body for a batch: images (PIL list or ``[B, 3, H, W]``) or videos (``[B, F, 3, H, W]``), and the
    prompts' metadata when any has some. ValueError in one sentence for metadata that JSON cannot hold."""
    body: dict[str, Any] = {"prompts": [str(p) for p in prompts]}
    metadata = [dict(getattr(p, "metadata", {})) for p in prompts]
    if any(metadata):
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise ValueError(f"the prompts' metadata cannot be sent to a reward server as JSON ({e})") from None
        body["metadata"] = metadata
    if isinstance(media, Tensor) and media.dim() == 5:
        return {**body, "videos": [[png_b64(f) for f in to_pil(v)] for v in media]}
    return {**body, "images": [png_b64(img) for img in to_pil(media)]}


def _parse_body(data: bytes) -> Any:
    """The JSON in a request body; ValueError (with a message) on bad JSON, too many values or too deep nesting."""
    # every value after the first follows one of these (an object member counts once); so may text in strings
    values = data.count(b",") + data.count(b"[") + data.count(b"{")
    if values > MAX_JSON_VALUES:
        raise ValueError(f"the body holds up to {values} JSON values, over the limit of {MAX_JSON_VALUES}")
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("the body's JSON is nested too deeply") from None


def _is_strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def pixel_sizes(pngs: Sequence[str], max_image_pixels: int, max_request_pixels: int) -> list[tuple[int, int]]:
    """``(width, height)`` of each base64 PNG from its header alone; ValueError naming the budget and the size when
    one image has over ``max_image_pixels`` or all of them together over ``max_request_pixels``."""
    sizes, total = [], 0
    for i, text in enumerate(pngs):
        width, height = png_size(base64.b64decode(text[:32], validate=True))  # 32 characters = the 24 header bytes
        pixels = width * height
        if pixels > max_image_pixels:
            raise ValueError(f"image/frame {i} is {width}x{height} = {pixels} pixels, over the budget of "
                             f"{max_image_pixels} pixels per image")
        total += pixels
        if total > max_request_pixels:
            raise ValueError(f"images/frames 0-{i} hold {total} pixels, over the budget of {max_request_pixels} "
                             "pixels per request (send smaller batches: the remote reward's batch_size)")
        sizes.append((width, height))
    return sizes


def _decode_videos(videos: list[list[str]], max_image_pixels: int, max_request_pixels: int) -> Tensor:
    if not videos or not videos[0] or len({len(v) for v in videos}) > 1:
        raise ValueError("every video must have the same number of frames, at least one")
    sizes = pixel_sizes([f for v in videos for f in v], max_image_pixels, max_request_pixels)
    if len(set(sizes)) > 1:
        raise ValueError("every frame of every video must have the same size")
    width, height = sizes[0]
    out = np.empty((len(videos), len(videos[0]), height, width, 3), dtype=np.float32)  # filled frame by frame
    for b, video in enumerate(videos):
        for f, frame in enumerate(video):
            out[b, f] = np.asarray(from_png_b64(frame), dtype=np.float32) / 255
    return torch.from_numpy(out).permute(0, 1, 4, 2, 3)


def decode_request(body: Any, max_image_pixels: int = MAX_IMAGE_PIXELS,
                   max_request_pixels: int = MAX_REQUEST_PIXELS) -> tuple[Any, list[str]]:
    """``(media, prompts)`` from a request body: a list of RGB images, or videos as ``[B, F, 3, H, W]`` floats in
    [0, 1]. ValueError with a message on anything malformed or over a pixel budget (checked before decoding)."""
    if not isinstance(body, dict) or not isinstance(body.get("prompts"), list):
        raise ValueError("the body must be a JSON object with a 'prompts' list")
    prompts = body["prompts"]
    if not _is_strings(prompts):
        raise ValueError("'prompts' must be a list of strings")
    if "metadata" in body:
        metadata = body["metadata"]
        if not (isinstance(metadata, list) and len(metadata) == len(prompts)
                and all(isinstance(m, dict) for m in metadata)):
            raise ValueError("'metadata' must be a list of JSON objects, one per prompt")
        prompts = [Prompt(p, m) for p, m in zip(prompts, metadata)]
    if "videos" in body:
        media = body["videos"]
        if not isinstance(media, list) or not all(_is_strings(v) for v in media):
            raise ValueError("'videos' must be a list of lists of base64 PNG frames")
    elif "images" in body:
        media = body["images"]
        if not _is_strings(media):
            raise ValueError("'images' must be a list of base64 PNG strings")
    else:
        raise ValueError("the body needs 'images' (base64 PNGs) or 'videos' (lists of base64 PNG frames)")
    if len(media) != len(prompts):
        raise ValueError(f"{len(media)} media for {len(prompts)} prompts")
    try:
        if "videos" in body:
            return _decode_videos(media, max_image_pixels, max_request_pixels), prompts
        pixel_sizes(media, max_image_pixels, max_request_pixels)
        return [from_png_b64(img) for img in media], prompts
    except (ValueError, OSError, SyntaxError, Image.DecompressionBombError) as e:  # PIL: SyntaxError on a broken PNG
        raise ValueError(f"cannot decode the media: {e}") from None


def _body_length(header: Optional[str]) -> int:
    """The body's size from its ``Content-Length`` header: ValueError unless a decimal integer from 1,
    _BodyTooLarge over ``MAX_BODY``."""
    if header is None:
        raise ValueError("the request needs a Content-Length header")
    if not (header.isascii() and header.strip().isdigit()) or int(header) == 0:
        raise ValueError(f"bad Content-Length {header!r}: it must be the body's size in bytes, from 1")
    if int(header) > MAX_BODY:
        raise _BodyTooLarge(f"Content-Length {int(header)} is over the limit of {MAX_BODY} bytes")
    return int(header)


def _jsonable(scores: dict) -> dict:
    out = {}
    for name, value in scores.items():
        values = torch.as_tensor(value, dtype=torch.float32).flatten().tolist()
        out[str(name)] = [v if math.isfinite(v) else None for v in values]
    return out


class RewardServer(ThreadingHTTPServer):
    """A threaded HTTP server that handles at most ``max_workers`` connections at once: the next connection waits
    for a free worker before it is accepted (then in the listen backlog of ``request_queue_size``)."""

    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handler: type, max_workers: int) -> None:
        super().__init__(address, handler)
        self._workers = threading.BoundedSemaphore(max_workers)
        self._closing = threading.Event()

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Wait for a free worker (waking up to see whether ``shutdown`` was called), then handle on its thread."""
        while not self._workers.acquire(timeout=0.2):
            if self._closing.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:  # the thread did not start: free its worker
            self._workers.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        """Handle one connection on a worker's thread, then free the worker."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._workers.release()

    def shutdown(self) -> None:
        """Stop ``serve_forever``, also while it waits for a free worker."""
        self._closing.set()
        super().shutdown()


def make_server(reward: Callable, name: str, host: str = "127.0.0.1", port: int = 8765, *,
                max_image_pixels: int = MAX_IMAGE_PIXELS, max_request_pixels: int = MAX_REQUEST_PIXELS,
                timeout: float = SOCKET_TIMEOUT, max_workers: int = MAX_WORKERS) -> RewardServer:
    """An HTTP server (not started) that scores requests with ``reward``; ``port=0`` picks a free port. The limits
    (pixel budgets, the per-read/write socket ``timeout`` in seconds, ``max_workers``) are the module docstring's."""

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _read_body(self) -> bytes:
            length = _body_length(self.headers.get("Content-Length"))
            data = self.rfile.read(length)  # a TimeoutError here drops the connection (handle_one_request)
            if len(data) < length:
                raise ValueError(f"the body ended after {len(data)} of {length} bytes")
            return data

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/health":
                self._send(200, {"ok": True, "reward": name})
            else:
                self._send(404, {"error": f"no such path {self.path!r}; use POST /score or GET /health"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/score":
                self._send(404, {"error": f"no such path {self.path!r}; use POST /score"})
                return
            try:
                media, prompts = decode_request(_parse_body(self._read_body()), max_image_pixels, max_request_pixels)
            except _BodyTooLarge as e:
                self._send(413, {"error": str(e)})
                return
            except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError included
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

    Handler.timeout = timeout  # StreamRequestHandler.setup puts it on each connection's socket
    return RewardServer((host, port), Handler, max_workers)


def _error_message(body: bytes, default: str) -> str:
    """The message in an error answer's body: ``{"error": str}`` (``make_server``), ``{"error": {"message": str}}``
    (OpenAI-compatible servers) or ``{"message": str}`` (older vLLM); ``default`` for anything else."""
    try:
        payload = json.loads(body or b"{}")
    except ValueError:  # an HTML error page from a proxy, say
        return default
    error = payload.get("error", payload) if isinstance(payload, dict) else default
    return str(error.get("message", default) if isinstance(error, dict) else error)


def post_json(url: str, body: Any, *, timeout: float, retries: int, backoff: float,
              headers: Optional[dict[str, str]] = None, server: str = "reward server") -> Any:
    """POST ``body`` as JSON to ``url`` and return the JSON answer. Connection failures, timeouts (``timeout``
    seconds for the connection and for each read) and 5xx answers are retried ``retries`` times, after
    ``backoff * 2**attempt`` seconds; a 4xx raises ``RemoteRewardError`` at once, and failing every attempt raises
    ``RemoteUnavailableError``. ``server`` names the server in both messages."""
    data, all_headers = json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
    last: Optional[str] = None
    for attempt in range(retries + 1):
        request = urllib.request.Request(url, data=data, headers=all_headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            message = _error_message(e.read(), str(e.reason))
            if e.code < 500:
                raise RemoteRewardError(f"{server} {url} refused the request ({e.code}): {message}") from None
            last = f"{e.code}: {message}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            last = str(getattr(e, "reason", e))
        if attempt < retries:
            time.sleep(backoff * 2**attempt)
    raise RemoteUnavailableError(f"{server} {url} failed after {retries + 1} attempts (last: {last})")


def build(url: str = "http://127.0.0.1:8765", timeout: float = 60.0, retries: int = 3, batch_size: int = 16,
          backoff: float = 0.5) -> Callable:
    """Registry factory (``remote``): a reward that posts batches of ``batch_size`` to a reward server, retrying
    connection failures and 5xx answers ``retries`` times with exponential backoff; a 4xx is raised at once."""
    endpoint = url.rstrip("/") + "/score"

    def reward(media: Any, prompts: Sequence[str]) -> dict[str, Tensor]:
        parts: dict[str, list] = {}
        for start in range(0, len(prompts), batch_size):
            chunk = media[start : start + batch_size]
            body = encode_request(chunk, prompts[start : start + batch_size])
            scores = post_json(endpoint, body, timeout=timeout, retries=retries, backoff=backoff)["scores"]
            for name, values in scores.items():
                parts.setdefault(name, []).extend(math.nan if v is None else v for v in values)
        return {name: torch.tensor(values, dtype=torch.float32) for name, values in parts.items()}

    return reward
