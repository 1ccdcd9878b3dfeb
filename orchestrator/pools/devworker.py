"""The development worker: a stand-in for llama.cpp's llama-server, for development and tests.

It serves the same HTTP completion API (`GET /health`, `POST /completion`, with
`"stream": true` as server-sent events) and streams deterministic tokens at a
configured rate: the same model, prompt and seed always give the same text. It
loads no model and needs no GPU. It is not an inference engine.

    python -m orchestrator.pools.devworker --port 18100 --model llama-8b --tokens-per-sec 200
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

VOCABULARY = (
    "the", "a", "model", "token", "stream", "GPU", "queue", "worker", "batch", "latency",
    "cache", "prompt", "policy", "tensor", "kernel", "memory", "schedule", "fair", "fast", "quiet",
)  # fmt: skip


def generate(model: str, prompt: str, seed: int | None, n_tokens: int) -> list[str]:
    """The tokens the development worker answers with; a pure function of its inputs."""
    state = hashlib.sha256(f"{model}\x00{prompt}\x00{seed}".encode()).digest()
    tokens = []
    for _ in range(n_tokens):
        state = hashlib.sha256(state).digest()
        tokens.append(" " + VOCABULARY[state[0] % len(VOCABULARY)])
    return tokens


class DevWorker(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], model: str, rate: float, load_ms: int) -> None:
        super().__init__(address, Handler)
        self.model = model
        self.rate = rate
        self.ready_at = time.monotonic() + load_ms / 1000
        self.busy = threading.Semaphore(1)  # one completion at a time, like a one-slot server


class Handler(BaseHTTPRequestHandler):
    server: DevWorker
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the orchestrator logs what matters

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            if time.monotonic() < self.server.ready_at:
                self._json(503, {"status": "loading model"})
            else:
                self._json(200, {"status": "ok"})
        elif self.path == "/props":
            self._json(200, {"model": self.server.model, "development_worker": True})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path != "/completion":
            self._json(404, {"error": "not found"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            request = json.loads(self.rfile.read(length) or b"{}")
            prompt = str(request.get("prompt", ""))
            n_predict = int(request.get("n_predict", 16))
            seed = request.get("seed")
            seed = int(seed) if seed is not None and int(seed) >= 0 else None
        except (ValueError, TypeError) as exc:
            self._json(400, {"error": f"bad request: {exc}"})
            return
        if time.monotonic() < self.server.ready_at:
            self._json(503, {"error": "loading model"})
            return
        with self.server.busy:
            tokens = generate(self.server.model, prompt, seed, max(0, n_predict))
            if request.get("stream"):
                self._stream(tokens)
            else:
                time.sleep(len(tokens) / self.server.rate)
                self._json(200, self._final("".join(tokens), len(tokens)))

    def _final(self, content: str, n: int) -> dict[str, Any]:
        return {
            "content": content,
            "stop": True,
            "model": self.server.model,
            "tokens_predicted": n,
            "timings": {"predicted_per_second": self.server.rate},
        }

    def _stream(self, tokens: list[str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        interval = 1 / self.server.rate
        start = time.monotonic()
        for i, token in enumerate(tokens):
            # Pace against the start, so the rate holds however long a write takes.
            delay = start + (i + 1) * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.wfile.write(b"data: " + json.dumps({"content": token, "stop": False}).encode())
            self.wfile.write(b"\n\n")
            self.wfile.flush()
        final = self._final("", len(tokens))
        self.wfile.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        self.wfile.flush()


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devworker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens-per-sec", type=float, default=200.0)
    parser.add_argument("--load-ms", type=int, default=0, help="simulated model load time")
    args = parser.parse_args(argv)
    if args.tokens_per_sec <= 0:
        parser.error("--tokens-per-sec must be positive")
    _die_with_parent()
    server = DevWorker((args.host, args.port), args.model, args.tokens_per_sec, args.load_ms)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
