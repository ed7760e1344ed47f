"""The fleet seen from the build host: devices from their retained documents, deployments that
wait for every target's outcome, and one-off inference requests.

A device's retained ``state``, ``caps`` and ``models`` arrive right after subscribing; the view is
complete once the broker has been quiet for a moment.

When the connection to the broker is lost, paho reconnects; the fleet then subscribes again and
sends every command still waiting for its outcome once more, with the same ids, and so it does for
one device's commands when that device announces a new session (a restarted broker forgot its
subscriptions until then). Devices answer a repeated id with the recorded outcome (or carry out a
command the broker lost), so the build host learns every outcome, and nothing is done twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paho.mqtt.client as paho

from agent import mqtt
from agent.artifact import Manifest
from agent.capabilities import accelerator_ids, incompatibilities
from agent.config import BuildConfig
from agent.deploy import TERMINAL
from agent.errors import BoostError
from agent.protocol import (
    PREFIX,
    REPLY_PREFIX,
    decode_tensor,
    deploy_command,
    device_topic,
    dumps,
    infer_command,
)

log = logging.getLogger(__name__)

FINAL_STATES = frozenset(phase.value for phase in TERMINAL)
# Deploy commands expire on an MQTT 5 broker if no device picks them up within a day.
COMMAND_EXPIRY_S = 24 * 3600
QUIET_S = 0.3


@dataclass
class Device:
    id: str
    online: bool = False
    bdseq: int = -1
    caps: dict[str, Any] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)

    def matches(self, selector: str) -> bool:
        """``DEVICE``, ``group:NAME`` or ``caps:KEY=VALUE[,KEY=VALUE...]`` (all must hold) with
        keys arch, triple, feature, accelerator (a kind or ``vta:<design>``) and group."""
        if selector.startswith("group:"):
            return selector[6:] in (self.caps.get("groups") or [])
        if not selector.startswith("caps:"):
            return selector == self.id
        cpu = self.caps.get("cpu") or {}
        have = {
            "arch": {cpu.get("arch")},
            "triple": {cpu.get("triple")},
            "feature": set(cpu.get("features") or []),
            "accelerator": accelerator_ids(self.caps),
            "group": set(self.caps.get("groups") or []),
        }
        for term in filter(None, selector[5:].split(",")):
            key, _, value = term.partition("=")
            if key not in have:
                raise BoostError(
                    f"selector {selector!r}: unknown key {key!r}; use {', '.join(have)}"
                )
            if value not in have[key]:
                return False
        return True


@dataclass
class Outcome:
    device: str
    state: str
    detail: str
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state == "active"


class Fleet:
    """A connection to the broker with a live view of every device's retained documents."""

    def __init__(self, config: BuildConfig, timeout_s: float = 10.0) -> None:
        self.client_id = f"boost-build-{uuid.uuid4().hex[:12]}"
        self.client = mqtt.connect_blocking(
            config.mqtt, config.broker_url, self.client_id, timeout_s
        )
        self.config = config
        self.devices: dict[str, Device] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._last_message = time.monotonic()
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._subacks: dict[int, threading.Event] = {}
        self._topics: set[str] = set()
        #: Commands waiting for an outcome: request id -> (device, payload, verb), sent again
        #: after a reconnection or the device's new birth.
        self._unanswered: dict[str, tuple[str, str, bytes]] = {}
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_connect = self._on_reconnect
        self.subscribe(
            [f"{PREFIX}/dev/+/{leaf}" for leaf in ("state", "caps", "models", "events")], timeout_s
        )

    def subscribe(self, topics: list[str], timeout_s: float) -> None:
        """Subscribe and wait for the broker's SUBACK, so nothing published later is missed."""
        acked = threading.Event()
        with self._lock:
            self._topics.update(topics)
            _, mid = self.client.subscribe([(t, 1) for t in topics])
            # Not connected: the reconnection subscribes to every topic and sets ``acked``.
            self._subacks[-id(acked) if mid is None else mid] = acked
        if not acked.wait(timeout_s):
            raise BoostError(f"the broker did not acknowledge the subscription to {topics[0]}")

    def _unsubscribe(self, topic: str) -> None:
        with self._lock:
            self._topics.discard(topic)
        self.client.unsubscribe(topic)

    def _on_reconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            log.warning("the broker refused the reconnection: %s", reason)
            return
        with self._lock:
            topics, unanswered = sorted(self._topics), list(self._unanswered.values())
            waiting, self._subacks = list(self._subacks.values()), {}
        log.warning("reconnected to the broker; %d commands sent again", len(unanswered))
        client.subscribe([(t, 1) for t in topics])
        for device, verb, payload in unanswered:
            client.publish(device_topic(device, f"cmd/{verb}"), payload, qos=1)
        for acked in waiting:  # the subscriptions they wait for are in the one above
            acked.set()

    def _send(
        self, request_id: str, device: str, verb: str, payload: bytes, expiry_s: int | None = None
    ) -> None:
        """Publish a command and keep it until ``_answered`` (sent again on reconnection)."""
        with self._lock:
            self._unanswered[request_id] = (device, verb, payload)
        properties = mqtt.expiring(self.config.mqtt, expiry_s) if expiry_s else None
        self.client.publish(
            device_topic(device, f"cmd/{verb}"), payload, qos=1, properties=properties
        )

    def _reborn(self, device: str) -> None:
        """Send the commands still waiting for ``device`` again: it has just subscribed."""
        with self._lock:
            again = [(v, p) for d, v, p in self._unanswered.values() if d == device]
        for verb, payload in again:
            self.client.publish(device_topic(device, f"cmd/{verb}"), payload, qos=1)

    def _answered(self, request_id: str) -> None:
        with self._lock:
            self._unanswered.pop(request_id, None)

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: Any, props: Any
    ) -> None:
        with self._lock:
            acked = self._subacks.pop(mid, None)
        if acked is not None:
            acked.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        parts = message.topic.split("/")
        try:
            payload = json.loads(message.payload)
        except (ValueError, RecursionError):
            log.warning("%s: not JSON; ignored", message.topic)
            return
        if not isinstance(payload, dict):
            return
        if len(parts) == 5 and parts[2] == "dev":
            device, leaf = parts[3], parts[4]
            reborn = False
            with self._lock:
                self._last_message = time.monotonic()
                if leaf != "events":
                    view = self.devices.setdefault(device, Device(device))
                    if leaf == "state":
                        online, bdseq = payload.get("online") is True, int(payload.get("bdseq", -1))
                        reborn = online and (bdseq != view.bdseq or not view.online)
                        view.online, view.bdseq = online, bdseq
                    elif leaf == "caps":
                        view.caps = payload
                    else:
                        view.models = payload
                self._changed.notify_all()
            if reborn:
                self._reborn(device)
        for listener in list(self._listeners):
            listener(message.topic, payload)

    def snapshot(self, wait_s: float = 2.0) -> dict[str, Device]:
        """The devices, once retained documents stopped arriving (at most ``wait_s``)."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while time.monotonic() < deadline:
                quiet_for = time.monotonic() - self._last_message
                if quiet_for >= QUIET_S and self.devices:
                    break
                self._changed.wait(min(QUIET_S, max(0.0, deadline - time.monotonic())))
            return dict(self.devices)

    def select(self, selector: str, wait_s: float = 2.0) -> list[Device]:
        """The devices ``selector`` matches; waits up to ``wait_s`` for one to match and for all
        that match to be online (a device that was just started is still connecting)."""
        deadline = time.monotonic() + wait_s
        while True:
            devices = self.snapshot(max(0.0, deadline - time.monotonic()))
            chosen = [d for _, d in sorted(devices.items()) if d.matches(selector)]
            if (chosen and all(d.online for d in chosen)) or time.monotonic() >= deadline:
                break
            with self._lock:
                self._changed.wait(min(QUIET_S, max(0.0, deadline - time.monotonic())))
        if not chosen:
            known = ", ".join(sorted(devices)) or "none seen"
            raise BoostError(f"no device matches {selector!r} (devices: {known})")
        return chosen

    def deploy(
        self,
        manifest_bytes: bytes,
        signature: bytes,
        url: str,
        sha256: str,
        size: int,
        targets: Iterable[Device],
        on_event: Callable[[str, dict[str, Any]], None],
        timeout_s: float,
        pin: bool = False,
        bitstream_url: str | None = None,
    ) -> list[Outcome]:
        """Send the deploy command to every compatible online target and wait for each outcome."""
        manifest = Manifest.from_json(manifest_bytes, "artifact")
        outcomes: dict[str, Outcome] = {}
        pending: dict[str, tuple[str, str]] = {}  # deploy_id -> (device, request_id)
        done = threading.Condition()

        def listen(topic: str, payload: dict[str, Any]) -> None:
            sent = pending.get(str(payload.get("deploy_id")))
            if sent is None or not topic.endswith("/events"):
                return
            device, request_id = sent
            with done:
                outcome = outcomes[device]
                if outcome.state != "sent":
                    return  # a repeated final event after the outcome is known
                outcome.events.append(payload)
                on_event(device, payload)
                if payload.get("state") in FINAL_STATES:
                    self._answered(request_id)
                    outcome.state = str(payload["state"])
                    outcome.detail = str(payload.get("detail", ""))
                    done.notify_all()

        self._listeners.append(listen)
        try:
            for device in targets:
                problems = incompatibilities(manifest, device.caps)
                if not device.online:
                    outcomes[device.id] = Outcome(device.id, "offline", "the device is offline")
                elif problems:
                    outcomes[device.id] = Outcome(device.id, "incompatible", "; ".join(problems))
                else:
                    command = deploy_command(
                        manifest_bytes, signature, url, sha256, size, pin, bitstream_url
                    )
                    outcomes[device.id] = Outcome(device.id, "sent", "")
                    pending[command["deploy_id"]] = (device.id, command["request_id"])
                    self._send(
                        command["request_id"], device.id, "deploy", dumps(command), COMMAND_EXPIRY_S
                    )
            deadline = time.monotonic() + timeout_s
            with done:
                while any(o.state == "sent" for o in outcomes.values()):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    done.wait(left)
                for outcome in outcomes.values():
                    if outcome.state == "sent":
                        outcome.state = "timeout"
                        outcome.detail = f"no outcome within {timeout_s:.0f} s"
        finally:
            self._listeners.remove(listen)
            for _, request_id in pending.values():
                self._answered(request_id)
        return [outcomes[d] for d in sorted(outcomes)]

    def request(
        self, device: str, verb: str, command: dict[str, Any], timeout_s: float
    ) -> dict[str, Any]:
        """Send one command with a private reply topic and wait for the answer."""
        request_id = command["request_id"]
        reply_to = f"{REPLY_PREFIX}{self.client_id}/{request_id}"
        command = {**command, "reply_to": reply_to}
        answer: list[dict[str, Any]] = []
        arrived = threading.Event()

        def on_reply(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
            try:
                answer.append(json.loads(message.payload))
            except (ValueError, RecursionError):
                answer.append({"ok": False, "error": {"code": "bad-json", "message": "reply"}})
            arrived.set()

        self.client.message_callback_add(reply_to, on_reply)
        try:
            self.subscribe([reply_to], timeout_s)
            self._send(request_id, device, verb, dumps(command))
            if not arrived.wait(timeout_s):
                raise BoostError(
                    f"{device} did not answer {verb} within {timeout_s:.0f} s; is it online? "
                    "(see 'boost-build devices')"
                )
        finally:
            self._answered(request_id)
            self._unsubscribe(reply_to)
            self.client.message_callback_remove(reply_to)
        return answer[0]

    def infer(
        self, device: str, model: str, inputs: dict[str, np.ndarray], timeout_s: float
    ) -> dict[str, Any]:
        return self.request(device, "infer", infer_command(model, inputs), timeout_s)


def decode_outputs(reply: dict[str, Any]) -> dict[str, np.ndarray]:
    return {name: decode_tensor(name, raw) for name, raw in reply.get("outputs", {}).items()}
