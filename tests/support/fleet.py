"""End-to-end helpers: agents as real processes, an artifact store that counts its requests and
bytes and injects faults, a watching MQTT client, and re-signed variants of real artifacts."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho

from agent import mqtt
from agent.artifact import (
    FileEntry,
    Manifest,
    TargetInfo,
    load_private_key,
    load_public_key,
    open_artifact,
    read_manifest,
    sha256_file,
    verify_unpacked,
    write_artifact,
)
from agent.config import MqttConfig
from agent.protocol import device_topic, dumps, new_request_id
from models.fleet import FINAL_STATES, Fleet, Outcome
from models.store import ArtifactStore, StoreServer, _Handler

REPO = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class Fault:
    """What the store does to one GET response: close the connection after ``cut`` body bytes,
    or pause ``stall_s`` seconds after ``after`` body bytes."""

    cut: int | None = None
    after: int = 0
    stall_s: float = 0.0


class _FaultyWriter:
    """The response body stream: counts bytes, paces them, and plays one ``Fault``."""

    def __init__(self, handler: _CountingHandler, fault: Fault | None) -> None:
        self.handler = handler
        self.raw = handler.wfile
        self.fault = fault
        self.sent = 0

    def write(self, data: bytes) -> int:
        server, fault = self.handler.server, self.fault
        if fault is not None and fault.cut is not None and self.sent + len(data) > fault.cut:
            data = data[: fault.cut - self.sent]
            self.raw.write(data)
            server.body_bytes += len(data)
            self.raw.flush()
            self.handler.close_connection = True
            self.handler.connection.shutdown(socket.SHUT_RDWR)
            raise ConnectionResetError("the test store cut the connection")
        if fault is not None and fault.stall_s and self.sent >= fault.after:
            time.sleep(fault.stall_s)
            self.fault = None
        if server.pace_s:
            time.sleep(server.pace_s)
        self.raw.write(data)
        self.sent += len(data)
        server.body_bytes += len(data)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


class _CountingHandler(_Handler):
    server: CountingStore

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.requests += 1
        super().do_GET()

    def end_headers(self) -> None:
        super().end_headers()
        if self.command == "GET":
            faults = self.server.faults
            self.wfile = _FaultyWriter(self, faults.pop(0) if faults else None)  # type: ignore[assignment]

    def finish(self) -> None:
        if isinstance(self.wfile, _FaultyWriter):
            self.wfile = self.wfile.raw
        super().finish()

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self.server.requests += 1
        super().do_HEAD()


class CountingStore(StoreServer):
    """The real store server, counting the HTTP requests it receives and the body bytes it
    sends; ``faults`` are played on the next GET responses, one each, and ``pace_s`` is slept
    before every block of a body."""

    def __init__(self, root: Path) -> None:
        super().__init__(ArtifactStore(root), "127.0.0.1", 0)
        self.RequestHandlerClass = _CountingHandler
        self.requests = 0
        self.body_bytes = 0
        self.faults: list[Fault] = []
        self.pace_s = 0.0

    def publish(self, artifact: Path) -> tuple[str, str, int]:
        """(url, sha256, size) of ``artifact`` once in the store."""
        published = self.store.publish(artifact)
        return self.url + published.url_path, published.digest, published.path.stat().st_size


@dataclass
class AgentProcess:
    """``boost-agent start`` in its own process with its own deploy.toml and state directory."""

    root: Path
    device: str
    broker_url: str
    store_url: str
    public_key: Path
    extra: str = ""
    protocol: str = "5"
    #: Environment beyond the test's own; a PYTHONPATH entry goes before the repository's.
    env: Mapping[str, str] = field(default_factory=dict)
    #: More keys of [agent.mqtt] (credentials, TLS).
    mqtt_extra: str = ""
    process: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.root / "deploy.toml"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log(self) -> Path:
        return self.root / "agent.log"

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f'[agent]\ndevice_id = "{self.device}"\nstate_dir = "state"\n'
            f'trusted_keys = ["{self.public_key}"]\nallowed_hosts = ["{self.store_url}"]\n'
            f"{self.extra}\n"
            f'[agent.mqtt]\nurl = "{self.broker_url}"\nkeepalive_s = 5\n'
            f'protocol = "{self.protocol}"\n{self.mqtt_extra}\n'
        )

    def start(self) -> AgentProcess:
        self.write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith("BOOST_")}
        env.update(self.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [self.env.get("PYTHONPATH"), str(REPO)]))
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "--config", str(self.config), "start"],
                stdout=log,
                stderr=log,
                env=env,
                cwd=self.root,
            )
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout_s)
        self.process = None
        return code

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class WorkerProcess:
    root: Path
    process: subprocess.Popen[bytes]

    @property
    def log(self) -> str:
        return (self.root / "worker.log").read_text(errors="replace")


class Watcher:
    """A test's MQTT client: records every message under ``topics`` and sends commands."""

    def __init__(
        self,
        broker_url: str,
        protocol: str = "5",
        config: MqttConfig | None = None,
        topics: str = "boost/v1/#",
    ) -> None:
        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        self._cond = threading.Condition()
        config = replace(config or MqttConfig(), url=broker_url, protocol=protocol)
        self.client = mqtt.make_client(config, broker_url, new_request_id(), persistent=False)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.on_connect = lambda c, *args: c.subscribe(topics, qos=1)
        self.client.connect(**mqtt.connect_kwargs(config, broker_url, persistent=False))  # type: ignore[arg-type]
        self.client.loop_start()
        assert subscribed.wait(10), "the test broker did not acknowledge the subscription"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            payload = json.loads(msg.payload)
        except (ValueError, RecursionError):
            payload = {"_raw": msg.payload.decode(errors="replace")}
        with self._cond:
            self.messages.append((msg.topic, payload, bool(msg.retain)))
            self._cond.notify_all()

    def wait_for(
        self,
        predicate: Callable[[str, dict[str, Any]], bool],
        timeout_s: float = 60.0,
        after: int = 0,
    ) -> dict[str, Any]:
        """The first message (from index ``after`` on) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for topic, payload, _ in self.messages[after:]:
                    if predicate(topic, payload):
                        return payload
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [t for t, _, _ in self.messages[after:]][-20:]
                    raise AssertionError(f"no matching message within {timeout_s} s; saw {seen}")
                self._cond.wait(left)

    def mark(self) -> int:
        with self._cond:
            return len(self.messages)

    def state(self, device: str, online: bool, after: int = 0, timeout_s: float = 60) -> int:
        """Wait for ``device``'s state with ``online``; returns its bdseq."""
        topic = device_topic(device, "state")
        message = self.wait_for(
            lambda t, p: t == topic and p.get("online") is online, timeout_s, after
        )
        return int(message["bdseq"])

    def send(
        self, device: str, verb: str, body: Mapping[str, Any], raw: bytes | None = None
    ) -> str:
        request_id = str(body.get("request_id") or new_request_id())
        payload = raw if raw is not None else dumps({**body, "request_id": request_id})
        self.client.publish(device_topic(device, f"cmd/{verb}"), payload, qos=1).wait_for_publish(
            10
        )
        return request_id

    def answer(self, request_id: str, after: int = 0, timeout_s: float = 60) -> dict[str, Any]:
        """The final answer to a request on the device's events topic."""
        return self.wait_for(
            lambda t, p: (
                p.get("request_id") == request_id and (p.get("state") in FINAL_STATES or "ok" in p)
            ),
            timeout_s,
            after,
        )

    def metrics_until(
        self,
        model: str,
        done: Callable[[dict[str, Any]], bool],
        timeout_s: float,
        after: int = 0,
    ) -> list[dict[str, Any]]:
        """The agents' metrics of ``model`` (from message ``after`` on), report after report,
        until ``done`` holds for one."""
        deadline = time.monotonic() + timeout_s
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            with self._cond:
                seen = [
                    p["models"][model]
                    for t, p, _ in self.messages[after:]
                    if t.endswith("/metrics") and model in p.get("models", {})
                ]
            if any(map(done, seen)):
                return seen
            time.sleep(0.5)
        raise AssertionError(seen)

    def events(self, request_id: str) -> list[dict[str, Any]]:
        with self._cond:
            return [
                p
                for t, p, _ in self.messages
                if t.endswith("/events") and p.get("request_id") == request_id
            ]


def golden(artifact: Path, tmp: Path, public_key: Path) -> tuple[dict[str, np.ndarray], list[Any]]:
    """The recorded golden inputs and outputs of an artifact."""
    verified = open_artifact(artifact, [load_public_key(public_key)], tmp)
    with np.load(verified.path(verified.manifest.golden.file)) as data:
        inputs = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("input:")}
        outputs = [data[f"output:{i}"] for i in range(len(verified.manifest.outputs))]
    return inputs, outputs


def resign(
    artifact: Path,
    out: Path,
    private_key: Path,
    public_key: Path,
    target: Callable[[TargetInfo], TargetInfo] | None = None,
    files: Mapping[str, Callable[[Path], None]] | None = None,
    version: str | None = None,
) -> Path:
    """A properly signed variant of a real artifact: its target or model version changed and/or
    payload files rewritten in place by the given functions (their manifest entries follow)."""
    work = out.with_suffix(".d")
    verified = open_artifact(artifact, [load_public_key(public_key)], work)
    manifest = verified.manifest
    for name, rewrite in (files or {}).items():
        rewrite(work / name)
    entries = tuple(
        FileEntry(f.path, (work / f.path).stat().st_size, sha256_file(work / f.path))
        for f in manifest.files
    )
    manifest = replace(
        manifest,
        files=entries,
        target=target(manifest.target) if target else manifest.target,
        model_version=version or manifest.model_version,
    )
    payload = {f.path: work / f.path for f in manifest.files}
    write_artifact(out, manifest, payload, load_private_key(private_key))
    return out


def assert_cache_consistent(state_dir: Path, public_key: Path) -> int:
    """The index lists exactly the entries on disk, each passes the load-time check, and nothing
    half written is left; returns the number of entries."""
    cache = state_dir / "cache"
    index = json.loads((cache / "index.json").read_text())["entries"]
    on_disk = {p.name for p in (cache / "sha256").iterdir()}
    assert set(index) == on_disk, (sorted(index), sorted(on_disk))
    for digest in on_disk:
        verify_unpacked(cache / "sha256" / digest, [load_public_key(public_key)])
    leftovers = (
        list((state_dir / "downloads").glob("*")) if (state_dir / "downloads").exists() else []
    )
    assert leftovers == [], leftovers
    return len(on_disk)


def rewrite(
    src: Path,
    dest: Path,
    change: Callable[[str, bytes], bytes | None],
    extra: Sequence[tuple[tarfile.TarInfo, bytes]] = (),
) -> Path:
    """Copy an artifact, letting ``change`` alter (or drop, with None) each member's bytes."""
    with tarfile.open(src) as tar_in, tarfile.open(dest, "w") as tar_out:
        for member in tar_in:
            data = tar_in.extractfile(member).read()  # type: ignore[union-attr]
            new = change(member.name, data)
            if new is None:
                continue
            member.size = len(new)
            tar_out.addfile(member, io.BytesIO(new))
        for info, data in extra:
            tar_out.addfile(info, io.BytesIO(data))
    return dest


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def deploy(
    fleet: Fleet, store: CountingStore, artifact: Path, selector: str = "dev1", pin: bool = False
) -> list[Outcome]:
    url, digest, size = store.publish(artifact)
    manifest, signature = read_manifest(artifact)
    ref = Manifest.from_json(manifest).bitstream
    bitstream_url = f"{store.url}/sha256/{ref.sha256}" if ref else None
    targets = fleet.select(selector)
    return fleet.deploy(
        manifest, signature, url, digest, size, targets, lambda d, e: None, 120, pin, bitstream_url
    )


def online(watcher: Watcher, agent: AgentProcess, after: int = 0) -> int:
    """Wait for the agent's birth (from message ``after`` on) to reach the broker: its state
    online, then its capability document, which a worker needs before it builds for the
    device; returns the birth's bdseq."""
    caps = device_topic(agent.device, "caps")
    try:
        bdseq = watcher.state(agent.device, True, after)
        watcher.wait_for(lambda t, p: t == caps, 60, after)
    except AssertionError:
        raise AssertionError(agent.log_text()) from None
    return bdseq
