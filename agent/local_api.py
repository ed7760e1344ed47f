"""The agent's local API: a Unix socket for applications on the device (the interposer).

Enabled by ``[agent] local_api = true``; the socket is ``<state_dir>/agent.sock``, mode 0660, so
only the agent's user and group reach it (no network port is opened). One JSON object per line
each way:

- ``{"op": "lookup", "sha256": S}``: the active build of the ONNX model whose sha256 is ``S``
  (``build``: model name, digest and the cache directory to load it from, or null) and the latest
  on-demand build request for it (``request``, or null).
- ``{"op": "request", "name": N, "onnx": <base64>}``: ask the build workers for a build of that
  model for this device (once: a request still waiting is returned instead).
- ``{"op": "report", "model": N, "calls": {E: [ms, ...]}, "choice": {"engine": E,
  "latency_ms": {E: ms}, "fallback": why}}``: calls an application ran itself on engine ``E``
  (``onnxruntime`` or ``tvm``, the interposer's), its choice and, when it left a failing build,
  why; they go into the agent's metrics.

Answers are ``{"ok": true, ...}`` or ``{"ok": false, "error": {"code", "message"}}``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.engines import CPU_ENGINE, ORT_ENGINE
from agent.errors import BoostError
from agent.protocol import Command, ProtocolError, error_reply

log = logging.getLogger(__name__)

SOCKET = "agent.sock"
#: The engines an application's interposed session runs on.
ENGINES = (ORT_ENGINE, CPU_ENGINE)

#: An operation: the request (as a ``Command`` named after its op, for its typed accessors) in,
#: the answer's fields out.
Handler = Callable[[Command], dict[str, Any]]


class LocalApi:
    def __init__(self, path: Path, ops: Mapping[str, Handler], max_bytes: int) -> None:
        self.path = path
        self.ops = ops
        self.max_bytes = max_bytes
        self.path.unlink(missing_ok=True)  # left by an agent that was killed
        api = self

        class _Connection(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while line := self.rfile.readline(api.max_bytes + 1):
                    answer = api.answer(line)
                    self.wfile.write(json.dumps(answer).encode() + b"\n")
                    self.wfile.flush()

        self.server = socketserver.ThreadingUnixStreamServer(str(path), _Connection)
        self.server.daemon_threads = True
        os.chmod(path, 0o660)
        self._thread = threading.Thread(target=self.server.serve_forever, name="local-api")

    def start(self) -> None:
        self._thread.start()
        log.info("local API at %s", self.path)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.path.unlink(missing_ok=True)

    def answer(self, line: bytes) -> dict[str, Any]:
        if len(line) > self.max_bytes:
            return error_reply(None, "too-large", f"requests are limited to {self.max_bytes} bytes")
        try:
            request = json.loads(line)
        except (ValueError, RecursionError) as err:
            return error_reply(None, "bad-json", f"not a JSON line ({err})")
        op = request.get("op") if isinstance(request, dict) else None
        if not isinstance(op, str) or op not in self.ops:
            return error_reply(None, "unknown-op", f"'op' must be one of {', '.join(self.ops)}")
        try:
            return {"ok": True, **self.ops[op](Command(op, "", None, request))}
        except ProtocolError as err:
            return error_reply(None, err.code, err.message)
        except BoostError as err:
            return error_reply(None, "failed", str(err))
        except Exception as err:  # the socket serves applications: it must survive their input
            log.exception("local API %s crashed", op)
            return error_reply(None, "internal", f"{op} failed: {err}")


def call(path: Path, request: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
    """One request to the local API at ``path`` (an application's side)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        with sock.makefile("rb") as answers:
            line = answers.readline()
    if not line:
        raise BoostError(f"{path}: the agent closed the connection without an answer")
    answer: dict[str, Any] = json.loads(line)
    return answer
