"""On-demand build workers: ``boost-build worker``.

A device asks for a build of an ONNX model (for an application's interposer) by publishing a build
request (``agent.protocol.build_request``) to ``boost/v1/build/requests``. Workers take requests
through the shared subscription ``$share/boost-build/boost/v1/build/requests``, so each request
reaches one worker. The worker compiles for the CPU in the device's retained capability document,
signs the artifact with the build host's key, puts it into the store and sends the device a plain
deploy command that names the request (``build_request``): the device checks it like any
deployment, and takes it only as the answer to a request it made. Progress and failures go to the
request's ``reply_to``.

The workers of a build host share its store directory and coordinate there:

    jobs/<key>/model.onnx          the source
    jobs/<key>/request-<id>.json   one per request waiting for the build
    jobs/<key>/build.lock          flock, held by the worker building the job
    jobs/<key>.lock                flock, held while a job's request files change
    builds/<key>.json              the finished build: artifact digest and size

``<key>`` is the model's sha256 and the target. A request is on disk before the broker gets its
acknowledgement, so a worker that dies loses nothing: the kernel drops its build lock and another
worker (each scans ``jobs/`` every ``scan_s``) takes the job over. A key is built once: requests
arriving during the build wait for it, later ones are answered from ``builds/``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from agent.artifact import read_manifest
from agent.config import BuildConfig
from agent.errors import BoostError
from agent.fsutil import atomic_write, atomic_write_json
from agent.protocol import (
    BUILD_REQUESTS,
    BUILD_SHARE,
    BuildRequest,
    ProtocolError,
    deploy_command,
    device_topic,
    dumps,
    error_reply,
    parse_build_request,
    reply_topic,
)
from models import targets
from models.compiler import CompileRequest, compile_model
from models.fleet import Fleet
from models.progress import Progress
from models.store import ArtifactStore

log = logging.getLogger(__name__)

SOURCE = "model.onnx"
BUILD_LOCK = "build.lock"
DELIVERY_S = 30.0


@dataclass(frozen=True)
class Waiting:
    """A request waiting for a job's build."""

    request_id: str
    device: str
    name: str
    reply_to: str | None


class Worker:
    def __init__(
        self, config: BuildConfig, store_url: str, worker_id: str = "", scan_s: float = 1.0
    ) -> None:
        self.config = config
        self.store = ArtifactStore(config.store_dir)
        self.store_url = store_url
        self.jobs = config.store_dir / "jobs"
        self.builds = config.store_dir / "builds"
        self.worker_id = worker_id or f"{platform.node()}-{os.getpid()}"
        self.scan_s = scan_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        for folder in (self.jobs, self.builds):
            folder.mkdir(parents=True, exist_ok=True)
        self.fleet = Fleet(config)
        self.fleet.client.message_callback_add(BUILD_REQUESTS, self._on_request)
        self.fleet.subscribe([BUILD_SHARE], 10.0)
        log.info("worker %s: taking build requests", self.worker_id)

    def run(self) -> None:
        """Build waiting jobs until ``stop``."""
        while not self._stop.is_set():
            for job in sorted(self.jobs.iterdir()):
                if job.is_dir() and not self._stop.is_set():
                    self._take(job)
            self._wake.wait(self.scan_s)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def close(self) -> None:
        self.fleet.close()

    # --- requests (paho's thread) ---------------------------------------------------------------

    def _on_request(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        """Record the request in ``jobs/`` (paho acknowledges it to the broker afterwards)."""
        payload = bytes(message.payload)
        try:
            request = parse_build_request(payload)
            key = f"{request.sha256}-{self._target(request)}"
        except ProtocolError as err:
            log.warning("worker %s: build request refused: %s", self.worker_id, err)
            self._reply(reply_topic(payload), error_reply(err.request_id, err.code, err.message))
            return
        try:
            self._record(request, key)
        except OSError as err:
            log.error("worker %s: cannot record a build request: %s", self.worker_id, err)
            message_text = f"the build host cannot record the request ({err}); ask again"
            self._reply(request.reply_to, error_reply(request.request_id, "io", message_text))
            return
        self._wake.set()

    def _target(self, request: BuildRequest) -> str:
        """The target that runs on the requesting device, from its retained capabilities."""
        device = self.fleet.devices.get(request.device)
        if device is None or not device.caps:
            raise ProtocolError(
                "unknown-device",
                f"no capability document from device {request.device!r}; is it online?",
                request.request_id,
            )
        try:
            return targets.for_device(device.caps).name
        except BoostError as err:
            raise ProtocolError("no-target", str(err), request.request_id) from err

    def _record(self, request: BuildRequest, key: str) -> None:
        job = self.jobs / key
        with self._job_lock(key):
            job.mkdir(exist_ok=True)
            if not (job / SOURCE).exists():
                atomic_write(job / SOURCE, request.onnx)
            waiting = Waiting(request.request_id, request.device, request.name, request.reply_to)
            atomic_write_json(job / f"request-{request.request_id}.json", asdict(waiting))
        log.info(
            "worker %s: build request %s from %s for %s (%s)",
            self.worker_id,
            request.request_id,
            request.device,
            request.name,
            key,
        )

    # --- jobs (the worker's thread) -------------------------------------------------------------

    def _take(self, job: Path) -> None:
        """Build and deliver ``job`` unless another worker holds it."""
        try:
            fd = os.open(job / BUILD_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # delivered and removed meanwhile
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            waiting = self._waiting(job.name)
            if not waiting:
                return
            try:
                built = self._built(job.name) or self._build(job.name, waiting)
            except BoostError as err:
                self._fail(job.name, "build-failed", str(err))
                return
            except Exception as err:  # a compiler crash must not take the worker down
                log.exception("worker %s: build %s crashed", self.worker_id, job.name)
                self._fail(job.name, "internal", f"the build crashed: {err}")
                return
            try:
                self._deliver(job.name, built)
            except (BoostError, RuntimeError, ValueError) as err:  # paho: not connected
                log.warning("worker %s: %s not delivered yet (%s)", self.worker_id, job.name, err)
        finally:
            os.close(fd)

    def _build(self, key: str, waiting: list[Waiting]) -> dict[str, Any]:
        sha256, target = key.split("-", 1)
        for w in waiting:
            self._reply(
                w.reply_to,
                {"request_id": w.request_id, "state": "building", "worker": self.worker_id},
            )
        log.info("worker %s: building %s for %s", self.worker_id, waiting[0].name, target)
        out = self.jobs / key / "artifact.boost"
        result = compile_model(
            CompileRequest(
                model=self.jobs / key / SOURCE,
                target=target,
                output=out,
                name=waiting[0].name,
                version=f"src-{sha256[:12]}",
                tune_minutes=self.config.tune_minutes,
            ),
            self.config.tuning_db,
            self.config.signing_key,
            self.config.builder_id or self.worker_id,
            Progress(interactive=False),
            self.store,
        )
        published = self.store.publish(result.artifact)
        built = {"digest": published.digest, "size": published.path.stat().st_size}
        atomic_write_json(self.builds / f"{key}.json", built)
        log.info("worker %s: built %s in %.1f s", self.worker_id, key, result.seconds)
        return built

    def _deliver(self, key: str, built: dict[str, Any]) -> None:
        """Send every waiting device the deploy command of the build, then forget the job (a
        request whose command the broker did not take stays for the next scan)."""
        digest, size = str(built["digest"]), int(built["size"])
        manifest, signature = read_manifest(self.store.path_of(digest))
        url = f"{self.store_url}/sha256/{digest}"
        with self._job_lock(key):
            for w in self._waiting(key):
                command = {
                    **deploy_command(manifest, signature, url, digest, size),
                    "build_request": w.request_id,
                }
                info = self.fleet.client.publish(
                    device_topic(w.device, "cmd/deploy"), dumps(command), qos=1
                )
                info.wait_for_publish(DELIVERY_S)
                if not info.is_published():  # the request file stays: the next scan sends again
                    raise BoostError(f"the broker did not take the deploy command to {w.device}")
                self._reply(
                    w.reply_to,
                    {
                        "request_id": w.request_id,
                        "state": "built",
                        "ok": True,
                        "digest": digest,
                        "url": url,
                    },
                )
                (self.jobs / key / f"request-{w.request_id}.json").unlink()
            shutil.rmtree(self.jobs / key, ignore_errors=True)
        log.info("worker %s: delivered %s", self.worker_id, key)

    def _fail(self, key: str, code: str, message: str) -> None:
        log.error("worker %s: build %s failed: %s", self.worker_id, key, message)
        with self._job_lock(key):
            for w in self._waiting(key):
                self._reply(w.reply_to, error_reply(w.request_id, code, message))
            shutil.rmtree(self.jobs / key, ignore_errors=True)

    # --- helpers --------------------------------------------------------------------------------

    def _waiting(self, key: str) -> list[Waiting]:
        out = []
        for path in sorted((self.jobs / key).glob("request-*.json")):
            try:
                out.append(Waiting(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError) as err:
                log.error("worker %s: %s is unreadable (%s); dropped", self.worker_id, path, err)
                path.unlink(missing_ok=True)
        return out

    def _built(self, key: str) -> dict[str, Any] | None:
        path = self.builds / f"{key}.json"
        if not path.exists():
            return None
        built: dict[str, Any] = json.loads(path.read_text())
        return built if self.store.path_of(str(built["digest"])).is_file() else None

    @contextmanager
    def _job_lock(self, key: str) -> Iterator[None]:
        fd = os.open(self.jobs / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _reply(self, reply_to: str | None, answer: dict[str, Any]) -> None:
        if reply_to is not None:
            self.fleet.client.publish(reply_to, dumps(answer), qos=1)
