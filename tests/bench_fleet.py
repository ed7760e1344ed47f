"""Fleet figure: N simulated devices on one Mosquitto, one deployment to all of them.

A simulated device is what a device looks like from the broker: an MQTT session with the will,
the retained ``state``, ``caps`` (this machine's, under its own id) and ``models`` documents, and
deploy commands answered with the agent's events. On a command it downloads the artifact over
HTTP from the store, checks its sha256 and the manifest's Ed25519 signature, and reports
``accepted``, ``downloading``, ``verifying`` and ``active``; it does not load the model (that is
the agent figure). The devices live in a few processes (``python -m tests.bench_fleet`` is a
child's side), a paho network thread each. The build side is ``Fleet.deploy``, as
``boost-build deploy`` runs it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from agent import mqtt
from agent.artifact import generate_keypair, load_public_key, read_manifest, verify_signature
from agent.capabilities import probe
from agent.config import BuildConfig, MqttConfig
from agent.protocol import device_topic, dumps, now
from models import zoo
from models.broker import LocalBroker, free_port
from models.compiler import CompileRequest, compile_model
from models.fleet import Fleet
from models.progress import Progress
from tests.support.figures import Figure
from tests.support.fleet import CountingStore

PROCESSES = 4


class SimulatedDevice:
    def __init__(
        self, device: str, url: str, caps: dict[str, Any], key: Path, pool: ThreadPoolExecutor
    ) -> None:
        self.device = device
        self.trusted = [load_public_key(key)]
        self.pool = pool
        self.caps = {**caps, "device": device}
        config = MqttConfig(url=url)
        self.client = mqtt.make_client(config, url, f"sim-{device}", persistent=False)
        self.client.will_set(self.topic("state"), dumps({"online": False, "bdseq": 1}), 1, True)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: pool.submit(self._deploy, bytes(m.payload))
        self.connected = threading.Event()
        self.birth: list[paho.MQTTMessageInfo] = []
        self.client.connect_async(**mqtt.connect_kwargs(config, url, persistent=False))  # type: ignore[arg-type]
        self.client.loop_start()

    def topic(self, leaf: str) -> str:
        return device_topic(self.device, leaf)

    def publish(
        self, leaf: str, payload: dict[str, Any], retain: bool = False
    ) -> paho.MQTTMessageInfo:
        return self.client.publish(self.topic(leaf), dumps(payload), qos=1, retain=retain)

    def _on_connect(self, client: paho.Client, *args: Any) -> None:
        client.subscribe(self.topic("cmd/deploy"), qos=1)
        self.birth = [
            self.publish("state", {"online": True, "bdseq": 1, "ts": now()}, retain=True),
            self.publish("caps", self.caps, retain=True),
            self.publish("models", {"models": {}}, retain=True),
        ]
        self.connected.set()

    def _deploy(self, payload: bytes) -> None:
        command = json.loads(payload)
        seq = 0

        def event(state: str, **extra: Any) -> None:
            nonlocal seq
            seq += 1
            self.publish(
                "events",
                {"request_id": command["request_id"], "deploy_id": command["deploy_id"],
                 "seq": seq, "state": state, "ts": now(), **extra},
            )  # fmt: skip

        event("accepted")
        manifest = base64.b64decode(command["manifest"])
        verify_signature(manifest, base64.b64decode(command["signature"]), self.trusted, "cmd")
        event("downloading")
        with urllib.request.urlopen(command["url"], timeout=60) as response:
            data = response.read()
        event("verifying")
        if hashlib.sha256(data).hexdigest() != command["sha256"]:
            event("failed", detail="sha256 mismatch")
            return
        name = json.loads(manifest)["model_name"]
        self.publish("models", {"models": {name: {"digest": command["sha256"]}}}, retain=True)
        event("active", detail="simulated")


def child(url: str, key: str, ids: list[str]) -> None:
    """Run the devices ``ids`` until stdin closes; prints ``ready`` once all are connected."""
    caps = probe("sim", (), ("cpu",), Path(tempfile.gettempdir()), [])
    with ThreadPoolExecutor(max_workers=8) as pool:
        devices = [SimulatedDevice(d, url, caps, Path(key), pool) for d in ids]
        for device in devices:  # the broker holds every birth before the deployment starts
            device.connected.wait(120)
            for info in device.birth:
                info.wait_for_publish(120)
        print("ready", flush=True)
        sys.stdin.read()
        for device in devices:
            device.client.disconnect()
            device.client.loop_stop()


def deploy_to(count: int, work: Path) -> dict[str, float]:
    key = work / "build.key"
    public = generate_keypair(key)
    model = work / "tiny_cnn.onnx"
    zoo.get("tiny_cnn").save(str(model))
    request = CompileRequest(model=model, target="x86_64", output=work / "tiny.boost")
    artifact = compile_model(request, work / "tuning", key, "bench", Progress(False)).artifact
    manifest, signature = read_manifest(artifact)
    with LocalBroker(free_port(), work / "broker") as broker:
        store = CountingStore(work / "store")
        store.start_background()
        url, digest, size = store.publish(artifact)
        ids = [f"sim{i:04d}" for i in range(count)]
        children = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.bench_fleet",
                    broker.url,
                    str(public),
                    *ids[i::PROCESSES],
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(PROCESSES)
        ]
        try:
            start = time.perf_counter()
            for process in children:
                assert process.stdout is not None
                if process.stdout.readline().strip() != "ready":
                    raise RuntimeError("a simulated fleet process did not start")
            connect_s = time.perf_counter() - start
            with Fleet(BuildConfig(mqtt=MqttConfig(url=broker.url)), timeout_s=30) as fleet:
                targets = fleet.select("caps:arch=x86_64", wait_s=30)
                start = time.perf_counter()
                outcomes = fleet.deploy(
                    manifest, signature, url, digest, size, targets, lambda d, e: None, 600
                )
                deploy_s = time.perf_counter() - start
        finally:
            for process in children:
                process.communicate(timeout=60)  # closing its stdin ends it
            store.shutdown()
            store.server_close()
    active = sum(o.state == "active" for o in outcomes)
    events = sum(len(o.events) for o in outcomes)
    messages = events + len(outcomes) * 2  # events, commands and the models documents
    return {
        "devices": count,
        "seen": len(targets),
        "active": active,
        "connect_s": connect_s,
        "deploy_s": deploy_s,
        "messages_per_s": messages / deploy_s,
    }


def figures(quick: bool) -> list[Figure]:
    sizes = [10, 50] if quick else [10, 100, 300, 1000]
    fig = Figure(
        "fleet",
        "Fleet: one deployment to N simulated devices on one Mosquitto",
        ["devices", "seen online", "active", "all connected s", "command -> all active s",
         "broker messages/s"],
    )  # fmt: skip
    for count in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
            r = deploy_to(count, Path(tmp))
        fig.rows.append(
            [r["devices"], r["seen"], r["active"], r["connect_s"], r["deploy_s"],
             r["messages_per_s"]]
        )  # fmt: skip
    fig.notes.append(
        f"devices in {PROCESSES} processes; each downloads the tiny_cnn artifact over HTTP and "
        "checks its sha256 and signature; messages counted: commands, events, models documents"
    )

    def plot(ax: Any) -> None:
        xs = [r[0] for r in fig.rows]
        ax.plot(xs, [r[4] for r in fig.rows], marker="o", label="command -> all active (s)")
        ax.set_xscale("log")
        ax.set_xlabel("devices")
        ax.set_ylabel("seconds")
        ax.legend()

    fig.plot = plot
    return [fig]


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2], sys.argv[3:])
