"""Run an application's ONNX Runtime sessions on this device's boost builds, unchanged.

Enable it with one import before the application creates its sessions (``import
agent.interpose``), or run an unmodified script with ``python -m agent.interpose app.py ARGS``;
``disable()`` puts ONNX Runtime's own class back. The device's ``deploy.toml`` (``$BOOST_CONFIG``
or ``./deploy.toml``) says where the agent's local API is and which keys builds are signed with.

An interposed ``onnxruntime.InferenceSession`` is a real ONNX Runtime session, so the application
runs on ONNX Runtime from the first call, with ONNX Runtime's API (``run``, ``get_inputs``,
``get_outputs``, ...). A background thread asks the agent for the active build of the same model
(by the model's sha256) and, when there is none, asks the agent to request one from the build
workers; it polls until the build is active. Then it verifies the build's files, loads it with
the TVM runtime in this process, checks it against ONNX Runtime on the build's golden inputs
(within the artifact's tolerance) and times both: ``run`` switches to the build only when it is
correct and faster, so boost never makes an application slower. The switch happens between two
calls; no call waits for it. Should the build fail later (its library or accelerator), that call
and the following ones run on ONNX Runtime again; inputs the build refuses go to ONNX Runtime,
which answers or raises as the application expects. Without the agent (no local API) the session
stays on ONNX Runtime.
The session reports its calls per engine and its choice to the agent, which publishes them in
its metrics.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import logging
import os
import runpy
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.artifact import load_public_key, verify_unpacked
from agent.config import AgentConfig, load_config
from agent.engines import median_ms
from agent.errors import BoostError
from agent.local_api import ENGINES, SOCKET, call
from agent.runtime import InferenceInputError, LoadedModel, TvmRuntime, golden_inputs

log = logging.getLogger(__name__)

ORT, TVM = ENGINES
#: Seconds between two looks at the agent while the build is not there yet.
POLL_S = float(os.environ.get("BOOST_INTERPOSE_POLL_S", "2"))
#: Seconds between two reports of a session's calls to the agent.
REPORT_S = float(os.environ.get("BOOST_INTERPOSE_REPORT_S", "5"))

_original: Any = None
_runtime: TvmRuntime | None = None
_runtime_lock = threading.Lock()


def enable() -> None:
    """Replace ``onnxruntime.InferenceSession`` by the interposed session (idempotent)."""
    global _original
    import onnxruntime

    if _original is None:
        _original = onnxruntime.InferenceSession
        onnxruntime.InferenceSession = BoostSession


def disable() -> None:
    """Put ONNX Runtime's own class back; sessions made meanwhile keep running as they are."""
    global _original
    import onnxruntime

    if _original is not None:
        onnxruntime.InferenceSession = _original
        _original = None


class BoostSession:
    """ONNX Runtime's ``InferenceSession``, moving to the boost build once it is faster."""

    def __init__(self, path_or_bytes: str | bytes | os.PathLike[str], *args: Any, **kwargs: Any):
        self._ort = (_original or _ort_class())(path_or_bytes, *args, **kwargs)
        if isinstance(path_or_bytes, bytes):
            self._model, name = path_or_bytes, "model"
        else:
            path = Path(os.fspath(path_or_bytes))
            self._model, name = path.read_bytes(), path.stem
        self.boost_name = "".join(c if c.isalnum() or c in "_.-" else "_" for c in name)[:128]
        self.boost_sha256 = hashlib.sha256(self._model).hexdigest()
        self.boost_engine = ORT
        self.boost_choice: dict[str, Any] = {}
        self._build: LoadedModel | None = None
        self._calls: dict[str, list[float]] = {ORT: [], TVM: []}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._threads = []
        try:
            config = load_config().agent
        except BoostError as err:
            log.warning("boost: %s; staying on ONNX Runtime", err)
            return
        socket = config.state_dir / SOCKET
        for work, args in ((self._follow, (socket, config)), (self._reporter, (socket,))):
            thread = threading.Thread(target=work, args=args, name="boost-interpose", daemon=True)
            thread.start()
            self._threads.append(thread)

    # --- ONNX Runtime's API -----------------------------------------------------------------------

    def run(
        self,
        output_names: Sequence[str] | None,
        input_feed: Mapping[str, Any],
        run_options: Any = None,
    ) -> list[Any]:
        start = time.perf_counter()
        build = self._build
        outputs: list[Any] | None = None
        if build is not None:
            try:
                outputs = self._run_build(build, output_names, input_feed)
            except InferenceInputError:
                pass  # ONNX Runtime answers (or raises) as the application expects of it
            except Exception as err:  # the build or its accelerator failed: back to ONNX Runtime
                self._fall_back(err)
        engine = TVM if outputs is not None else ORT
        if outputs is None:
            outputs = self._ort.run(output_names, input_feed, run_options)
        with self._lock:
            self._calls[engine].append(time.perf_counter() - start)
        return outputs

    def __getattr__(self, name: str) -> Any:
        """Everything else (``get_inputs``, ``get_outputs``, ``get_providers``, ...) is ORT's."""
        return getattr(self._ort, name)

    def boost_close(self) -> None:
        """Stop following the build (a last report goes to the agent)."""
        self._closed.set()
        for thread in self._threads:
            thread.join()

    def _fall_back(self, err: Exception) -> None:
        log.warning("boost: %s: the build failed (%s); back on ONNX Runtime", self.boost_name, err)
        self._build = None
        self.boost_engine = ORT
        self.boost_choice = {**self.boost_choice, "engine": ORT, "fallback": str(err)[:500]}

    def _run_build(
        self, build: LoadedModel, output_names: Sequence[str] | None, feeds: Mapping[str, Any]
    ) -> list[Any]:
        arrays = {name: np.asarray(value) for name, value in feeds.items()}
        values = build.run(arrays)
        names = [spec.name for spec in build.outputs]
        wanted = output_names or names
        return [values[names.index(name)] for name in wanted]

    # --- the background thread --------------------------------------------------------------------

    def _follow(self, socket: Path, config: AgentConfig) -> None:
        found = self._wait_for_build(socket)
        if found is not None:
            self._choose(found, config)

    def _reporter(self, socket: Path) -> None:
        while not self._closed.wait(REPORT_S):
            self._report(socket)
        self._report(socket)

    def _wait_for_build(self, socket: Path) -> dict[str, Any] | None:
        """The agent's answer naming the active build, once there is one (None: no agent, the
        build failed, or the session was closed)."""
        requested = False
        while not self._closed.is_set():
            try:
                found = call(socket, {"op": "lookup", "sha256": self.boost_sha256})
                if found.get("ok") and found["build"] is not None:
                    return found
                request = found.get("request") or {}
                if request.get("state") == "failed" and requested:
                    log.warning(
                        "boost: the build failed (%s); staying on ONNX Runtime",
                        request.get("detail"),
                    )
                    return None
                if not requested or request.get("state") in (None, "requested"):
                    onnx = base64.b64encode(self._model).decode()
                    answer = call(socket, {"op": "request", "name": self.boost_name, "onnx": onnx})
                    requested = requested or bool(answer.get("ok"))
            except (OSError, ValueError, BoostError) as err:
                log.info("boost: no agent at %s (%s); staying on ONNX Runtime", socket, err)
                return None
            self._closed.wait(POLL_S)
        return None

    def _choose(self, found: dict[str, Any], config: AgentConfig) -> None:
        """Load the build, check it against ONNX Runtime and switch when it is faster."""
        build = found["build"]
        try:
            trusted = [load_public_key(k) for k in config.trusted_keys]
            verified = verify_unpacked(Path(build["path"]), trusted)
            manifest = verified.manifest
            loaded = _tvm().load(verified.path(manifest.library), manifest.inputs, manifest.outputs)
            feeds = golden_inputs(verified.path(manifest.golden.file))
        except (OSError, ValueError, BoostError) as err:
            log.warning(
                "boost: cannot use build %s (%s); staying on ONNX Runtime",
                build.get("digest", "?")[:12],
                err,
            )
            return
        names = [spec.name for spec in manifest.outputs]
        expected = self._ort.run(names, feeds)
        got = loaded.run(feeds)
        tolerance = manifest.golden
        for name, want, have in zip(names, expected, got, strict=True):
            if not np.allclose(have, want, rtol=tolerance.rtol, atol=tolerance.atol):
                log.warning(
                    "boost: build %s differs from ONNX Runtime on %s; staying on it",
                    build["digest"][:12],
                    name,
                )
                return
        ort_ms = median_ms(lambda: self._ort.run(names, feeds))
        tvm_ms = median_ms(lambda: loaded.run(feeds))
        engine = TVM if tvm_ms < ort_ms else ORT
        self.boost_choice = {
            "engine": engine,
            "digest": build["digest"],
            "latency_ms": {ORT: round(ort_ms, 3), TVM: round(tvm_ms, 3)},
        }
        log.info(
            "boost: %s: %s (%.3f ms on ONNX Runtime, %.3f ms on the build)",
            self.boost_name,
            engine,
            ort_ms,
            tvm_ms,
        )
        if engine == TVM:
            self._build = loaded
            self.boost_engine = TVM

    def _report(self, socket: Path) -> None:
        with self._lock:
            calls = {e: s for e, s in self._calls.items() if s}
            self._calls = {ORT: [], TVM: []}
        if not calls and not self.boost_choice:
            return
        report = {
            "op": "report",
            "model": self.boost_name,
            "sha256": self.boost_sha256,
            "calls": {e: [round(x * 1e3, 3) for x in s] for e, s in calls.items()},
            "choice": self.boost_choice,
        }
        try:
            call(socket, report)
        except (OSError, ValueError, BoostError) as err:
            log.debug("boost: report not delivered: %s", err)


def _tvm() -> TvmRuntime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = TvmRuntime()
        return _runtime


def _ort_class() -> Any:
    import onnxruntime

    return onnxruntime.InferenceSession


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agent.interpose SCRIPT [ARGS]``: run a script with the interposer enabled."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m agent.interpose SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    # The module proper (this file runs as __main__) enables the interposer on import.
    importlib.import_module("agent.interpose")

    sys.argv = args
    sys.path.insert(0, str(Path(args[0]).resolve().parent))
    runpy.run_path(args[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
else:
    enable()
