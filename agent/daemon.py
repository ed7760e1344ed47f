"""``boost-agent start``: the device daemon.

One MQTT session (paho-mqtt's network thread) receives commands; deployments run one at a time on
a worker thread (each written to disk first, so one cut short by a crash runs again after the
restart), inference on a thread pool, everything else inline. Birth and death follow the
contract: the will (``online: false``) is registered at connect with the bdseq of that session,
and every (re)connect subscribes again and publishes a new birth with a new bdseq.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any

import numpy as np
import paho.mqtt.client as paho

from agent import mqtt
from agent.builds import BuildRequests
from agent.cache import Eviction
from agent.capabilities import default_device_id, probe, probe_accelerators
from agent.config import AgentConfig
from agent.deploy import Deployer, PendingDeploys, repair_command
from agent.engines import Measured
from agent.errors import BoostError
from agent.local_api import ENGINES, SOCKET, LocalApi
from agent.protocol import (
    BUILD_REQUESTS,
    Command,
    ProtocolError,
    build_reply_topic,
    build_request,
    check_name,
    command_verb,
    decode_tensor,
    device_topic,
    dumps,
    encode_tensor,
    error_reply,
    group_topic,
    now,
    parse_command,
)
from agent.registry import Accelerators, DamagedError, Loaded, Registry, UnknownModelError
from agent.runtime import InferenceInputError

log = logging.getLogger(__name__)

REMEMBERED_REQUESTS = 1024
#: A build request nobody answered is sent again when asked for after this many seconds.
BUILD_RETRY_S = 120.0
LATENCY_SAMPLES = 1000
SHUTDOWN_PUBLISH_S = 5.0


class Metrics:
    """Per-model invocation counts and latencies since the last report."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latency: dict[str, list[float]] = {}
        self._count: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        #: Calls by engine since the last report (inferences over MQTT, and calls applications
        #: ran themselves through the interposer), and the engine the interposer chose with the
        #: latencies it measured (the latest).
        self._engines: dict[str, dict[str, int]] = {}
        self._choices: dict[str, dict[str, Any]] = {}
        self.evictions = 0

    def record_error(self, model: str) -> None:
        with self._lock:
            self._errors[model] = self._errors.get(model, 0) + 1

    def record_calls(self, model: str, engine: str, latencies_ms: list[float]) -> None:
        with self._lock:
            self._count[model] = self._count.get(model, 0) + len(latencies_ms)
            samples = self._latency.setdefault(model, [])
            samples.extend(latencies_ms)
            del samples[:-LATENCY_SAMPLES]
            engines = self._engines.setdefault(model, {})
            engines[engine] = engines.get(engine, 0) + len(latencies_ms)

    def choose(self, model: str, choice: dict[str, Any]) -> None:
        with self._lock:
            self._choices[model] = choice

    def report(self, serving: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The figures since the last report; ``serving`` is each model's ranking of builds."""
        with self._lock:
            models: dict[str, dict[str, Any]] = {}
            names = set(self._count) | set(self._errors) | set(self._choices) | set(serving)
            for name in sorted(names):
                lat = np.array(self._latency.get(name, []))
                models[name] = {
                    "invocations": self._count.get(name, 0),
                    "errors": self._errors.get(name, 0),
                    "latency_ms": {
                        "mean": round(float(np.mean(lat)), 3),
                        "p50": round(float(np.percentile(lat, 50)), 3),
                        "p95": round(float(np.percentile(lat, 95)), 3),
                    }
                    if lat.size
                    else None,  # no successful call since the last report
                }
                if name in self._engines:
                    models[name]["engines"] = self._engines[name]
                if name in self._choices:
                    models[name]["choice"] = self._choices[name]
                if name in serving:
                    models[name]["serving"] = serving[name]
            self._latency.clear()
            self._count.clear()
            self._errors.clear()
            self._engines = {}
            return models


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.device = check_name("device id", config.device_id or default_device_id())
        for group in config.groups:
            check_name("group", group)
        mqtt.BrokerAddress.parse(config.mqtt.url)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.accelerators = Accelerators(probe_accelerators(config), config)
        self.registry = Registry(config, self._on_evict, self.accelerators.open_engine())
        self.deployer = Deployer(self.registry, config, self.capabilities, self.accelerators)
        self.metrics = Metrics()
        self.stopping = threading.Event()
        self.pending = PendingDeploys(config.state_dir / "pending")
        self.builds = BuildRequests(config.state_dir / "builds.json")
        self.local_api: LocalApi | None = None
        self.deploys: queue.Queue[tuple[Command, int] | None] = queue.Queue()
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="infer")
        self._requests: OrderedDict[str, dict[str, Any] | None] = OrderedDict()
        self._requests_lock = threading.Lock()
        self._caps: dict[str, Any] = {}
        self._unsettled: dict[int, Command] = {}  # mid of a final event -> its command
        self.client = mqtt.make_client(
            config.mqtt, config.mqtt.url, f"boost-agent-{self.device}", persistent=True
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.handlers: dict[str, Callable[[Command], dict[str, Any] | None]] = {
            "deploy": self._queue_deploy,
            "undeploy": self._undeploy,
            "infer": self._submit_infer,
            "pin": self._pin,
            "unpin": self._unpin,
            "evict": self._evict,
            "rebirth": self._rebirth,
            "ping": self._ping,
        }

    def topic(self, leaf: str) -> str:
        return device_topic(self.device, leaf)

    # --- lifecycle -------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code."""
        self.registry.open()
        self.deployer.restore_fpga()
        for damaged in self.registry.load_active():
            self._repair(damaged)
        for command, attempts in self.pending.resume():
            log.info("deploy %s: carrying out again after a restart", command.request_id)
            self.deploys.put((command, attempts))
        self._caps = self._probe()
        if self.config.local_api:
            ops = {"lookup": self._lookup, "request": self._request_build, "report": self._report}
            self.local_api = LocalApi(
                self.config.state_dir / SOCKET, ops, self.config.max_command_bytes
            )
            self.local_api.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self._new_session()
        url = self.config.mqtt.url
        self.client.connect_async(**mqtt.connect_kwargs(self.config.mqtt, url, persistent=True))  # type: ignore[arg-type]
        self.client.loop_start()
        log.info("device %s: connecting to %s", self.device, url)
        workers = [
            threading.Thread(target=self._deploy_worker, name="deploy", daemon=True),
            threading.Thread(target=self._metrics_worker, name="metrics", daemon=True),
        ]
        for worker in workers:
            worker.start()
        self.stopping.wait()
        log.info("device %s: stopping", self.device)
        if self.local_api is not None:
            self.local_api.stop()
        self.deploys.put(None)
        self.pool.shutdown(wait=True, cancel_futures=True)
        info = self.client.publish(
            self.topic("state"), dumps(self._state(False)), qos=1, retain=True
        )
        if self.client.is_connected():
            try:
                info.wait_for_publish(SHUTDOWN_PUBLISH_S)
            except (RuntimeError, ValueError) as err:
                log.warning("could not publish the offline state: %s", err)
        self.client.disconnect()
        self.client.loop_stop()
        self.registry.disk.save()
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        self.stopping.set()

    def _state(self, online: bool) -> dict[str, Any]:
        return {"online": online, "bdseq": self.registry.state.bdseq, "ts": now()}

    def _new_session(self) -> None:
        """A new bdseq, and the will that announces this session's death."""
        with self.registry.lock:
            self.registry.state.bdseq += 1
            self.registry.state.save()
        self.client.will_set(self.topic("state"), dumps(self._state(False)), qos=1, retain=True)

    def _probe(self) -> dict[str, Any]:
        config = self.config
        caps = probe(
            self.device,
            config.groups,
            config.backends,
            config.state_dir,
            self.accelerators.advertised(),
        )
        with self.registry.lock:
            caps["cache"] = sorted(self.registry.disk.entries)
        return caps

    def capabilities(self) -> dict[str, Any]:
        return self._caps

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        topics = [self.topic("cmd/+"), build_reply_topic(self.device, "+")]
        topics += [group_topic(g, "cmd/+") for g in self.config.groups]
        client.subscribe([(t, 1) for t in topics])
        self._birth()
        log.info("device %s: online (bdseq %d)", self.device, self.registry.state.bdseq)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if self.stopping.is_set():
            return
        log.warning("disconnected from the broker (%s); reconnecting", reason)
        self._new_session()

    def _birth(self) -> None:
        self._publish(self.topic("state"), self._state(True), retain=True)
        self._publish(self.topic("caps"), self._caps, retain=True)
        self._publish_models()

    def _publish_models(self) -> None:
        self._publish(self.topic("models"), self.registry.summary(), retain=True)

    def _publish(self, topic: str, payload: dict[str, Any], retain: bool = False) -> None:
        self.client.publish(topic, dumps(payload), qos=1, retain=retain)

    # --- commands --------------------------------------------------------------------------------

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        """Every command gets an answer or a structured error; nothing a message holds may stop
        the network thread."""
        verb = command_verb(message.topic)
        if verb is None:
            if message.topic.startswith(build_reply_topic(self.device, "")):
                self._on_build_reply(bytes(message.payload))
            return
        try:
            self._handle(verb, bytes(message.payload))
        except Exception:
            log.exception("command %s on %s crashed", verb, message.topic)
            self._publish(
                self.topic("events"),
                error_reply(None, "internal", f"the {verb} command crashed; see the agent's log"),
            )

    def _handle(self, verb: str, payload: bytes) -> None:
        limit = self.config.max_command_bytes
        if len(payload) > limit:
            message = f"{verb}: {len(payload)} bytes; commands are limited to {limit} bytes"
            self._publish(self.topic("events"), error_reply(None, "too-large", message))
            return
        try:
            command = parse_command(verb, payload)
        except ProtocolError as err:
            self._publish(self.topic("events"), error_reply(err.request_id, err.code, err.message))
            return
        if not self._first_time(command):
            return
        try:
            answer = self.handlers[command.verb](command)
        except ProtocolError as err:
            answer = error_reply(command.request_id, err.code, err.message)
        except BoostError as err:
            answer = error_reply(command.request_id, "failed", str(err))
        if answer is not None:
            self._answer(command, answer)

    def _first_time(self, command: Command) -> bool:
        """Idempotency: a repeated request id gets the recorded answer again, once it exists."""
        with self._requests_lock:
            if command.request_id not in self._requests:
                self._requests[command.request_id] = None
                while len(self._requests) > REMEMBERED_REQUESTS:
                    self._requests.popitem(last=False)
                return True
            answer = self._requests[command.request_id]
        log.info("request %s seen before; not redone", command.request_id)
        if answer is not None:
            self._send(command, {**answer, "duplicate": True})
        return False

    def _answer(self, command: Command, answer: dict[str, Any]) -> None:
        with self._requests_lock:
            if command.request_id in self._requests:
                self._requests[command.request_id] = answer
        self._send(command, answer)

    def _send(self, command: Command, answer: dict[str, Any]) -> None:
        self._publish(command.reply_to or self.topic("events"), answer)

    def _queue_deploy(self, command: Command) -> dict[str, Any] | None:
        build = command.body.get("build_request")
        if build is not None and not (isinstance(build, str) and self.builds.expects(build)):
            return error_reply(
                command.request_id,
                "unsolicited",
                f"the deploy command answers build request {build!r}, which this device is not "
                "waiting for",
            )
        self.pending.add(command)  # before the broker learns the command arrived
        self.deploys.put((command, 0))
        return None

    def _settle(self, command: Command, final: paho.MQTTMessageInfo) -> None:
        """Forget the journaled command once the broker has its final event: until then a
        restart carries it out again (or replays its recorded outcome)."""
        with self._requests_lock:
            self._unsettled[final.mid] = command
        try:
            published = final.is_published()
        except RuntimeError:  # queued while disconnected: sent and acknowledged after reconnecting
            published = False
        if published:
            self._on_publish(self.client, None, final.mid, None, None)

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        with self._requests_lock:
            command = self._unsettled.pop(mid, None)
        if command is not None:
            self.pending.done(command)

    def _repair(self, damaged: DamagedError) -> None:
        """Download a quarantined build again, as the deploy command that brought it did."""
        command = repair_command(damaged)
        if command is None:
            log.error("%s", damaged)
            return
        log.warning("%s: %s", command.request_id, damaged)
        self._queue_deploy(command)

    def _deploy_worker(self) -> None:
        while (item := self.deploys.get()) is not None:
            command, attempts = item

            def emit(event: dict[str, Any], final: bool, command: Command = command) -> None:
                info = self.client.publish(self.topic("events"), dumps(event), qos=1)
                if final:
                    if command.reply_to:
                        self._publish(command.reply_to, event)
                    self._settle(command, info)

            if attempts >= PendingDeploys.MAX_ATTEMPTS:
                final = self.deployer.fail(
                    command,
                    emit,
                    "crashed",
                    f"the agent stopped {attempts} times during this deployment; given up",
                )
            else:
                final = self.deployer.run(command, emit, self.config.step_timeout_s)
            with self._requests_lock:
                self._requests[command.request_id] = final
            build = command.body.get("build_request")
            if isinstance(build, str):
                outcome = "active" if final.get("state") == "active" else "failed"
                self.builds.update(build, outcome, str(final.get("detail", "")))
            if final.get("state") == "rejected" or final.get("duplicate"):
                continue  # nothing on the device changed
            self._caps = self._probe()
            self._publish(self.topic("caps"), self._caps, retain=True)
            self._publish_models()

    def _submit_infer(self, command: Command) -> None:
        self.pool.submit(self._infer, command)
        return None

    def _infer(self, command: Command) -> None:
        model = "?"
        try:
            model = command.text("model")
            raw_inputs = command.body.get("inputs")
            if not isinstance(raw_inputs, dict):
                raise ProtocolError("bad-input", "infer: 'inputs' must map names to tensors")
            feeds = {name: decode_tensor(name, raw) for name, raw in raw_inputs.items()}
            loaded, outputs, seconds = self._run(model, feeds)
            engine = self.registry.engine(loaded.artifact.manifest)
            self.metrics.record_calls(model, engine, [seconds * 1e3])
            answer = {
                "request_id": command.request_id,
                "ok": True,
                "model": model,
                "version": loaded.artifact.manifest.model_version,
                "digest": loaded.digest,
                "engine": engine,
                "latency_ms": round(seconds * 1e3, 3),
                "outputs": {
                    spec.name: encode_tensor(value)
                    for spec, value in zip(loaded.model.outputs, outputs, strict=True)
                },
            }
        except ProtocolError as err:
            answer = error_reply(command.request_id, err.code, err.message)
        except UnknownModelError as err:
            answer = error_reply(command.request_id, "unknown-model", str(err))
        except DamagedError as err:
            self._repair(err)
            answer = error_reply(command.request_id, "damaged", str(err))
        except InferenceInputError as err:
            answer = error_reply(command.request_id, "bad-input", str(err))
        except BoostError as err:
            answer = error_reply(command.request_id, "failed", str(err))
        except Exception as err:  # the runtime raises its own types; the agent must stay up
            log.exception("inference on %s crashed", model)
            answer = error_reply(command.request_id, "internal", f"inference failed: {err}")
        if not answer["ok"]:
            self.metrics.record_error(model)
        self._answer(command, answer)

    def _run(self, model: str, feeds: dict[str, np.ndarray]) -> tuple[Loaded, list[Any], float]:
        """Run on the build that serves ``model``. A build whose run fails (not its inputs) is
        taken out of service and the request runs again on the next one, while one is left."""
        while True:
            loaded = self.registry.active(model)
            start = time.perf_counter()
            try:
                outputs = loaded.model.run(feeds)
            except InferenceInputError:
                raise
            except Exception as err:  # a driver or runtime failure of this build's engine
                reason = f"{type(err).__name__}: {err}"
                instead = self.registry.engine_failed(model, loaded.digest, reason)
                self._engine_failed(model, loaded, reason, instead)
                if instead is None:
                    raise
                continue
            return loaded, outputs, time.perf_counter() - start

    def _engine_failed(
        self, model: str, loaded: Loaded, reason: str, instead: Measured | None
    ) -> None:
        engine = self.registry.engine(loaded.artifact.manifest)
        log.error(
            "model %s: build %s on %s failed (%s); %s",
            model,
            loaded.digest[:12],
            engine,
            reason,
            f"now served by {instead.engine}" if instead is not None else "no build left",
        )
        self._publish(
            self.topic("events"),
            {
                "request_id": None,
                "state": "engine-failed",
                "model": model,
                "engine": engine,
                "digest": loaded.digest,
                "detail": reason[:500],
                "serving": instead.to_json() if instead is not None else None,
                "ts": now(),
            },
        )
        self._publish_models()

    def _digest_of(self, command: Command) -> str:
        """The digest a pin/unpin/evict names: ``digest``, or the active build of ``model``."""
        if "digest" in command.body:
            return command.text("digest")
        name = command.text("model")
        with self.registry.lock:
            slot = self.registry.state.models.get(name)
        if slot is None:
            raise ProtocolError("unknown-model", f"no active model {name!r} on this device")
        return slot.active

    def _pin(self, command: Command) -> dict[str, Any]:
        digest = self._digest_of(command)
        with self.registry.lock:
            if digest not in self.registry.disk.entries:
                raise ProtocolError("not-cached", f"{digest[:12]} is not in the cache")
            self.registry.state.pins.add(digest)
            self.registry.state.save()
        self._publish_models()
        return {"request_id": command.request_id, "ok": True, "pinned": digest}

    def _unpin(self, command: Command) -> dict[str, Any]:
        digest = self._digest_of(command)
        with self.registry.lock:
            self.registry.state.pins.discard(digest)
            self.registry.state.save()
        self._publish_models()
        return {"request_id": command.request_id, "ok": True, "unpinned": digest}

    def _evict(self, command: Command) -> dict[str, Any]:
        eviction = self.registry.evict(command.text("digest"))
        self._publish_models()
        return {"request_id": command.request_id, "ok": True, "evicted": eviction.to_json()}

    def _undeploy(self, command: Command) -> dict[str, Any]:
        name = command.text("model")
        with self.registry.lock:
            slot = self.registry.state.models.pop(name, None)
            if slot is None:
                raise ProtocolError("unknown-model", f"no active model {name!r} on this device")
            self.registry.rankings.pop(name, None)
            self.registry.state.save()
        self._publish_models()
        return {"request_id": command.request_id, "ok": True, "undeployed": name}

    def _rebirth(self, command: Command) -> dict[str, Any]:
        self._caps = self._probe()
        self._birth()
        return {"request_id": command.request_id, "ok": True, "bdseq": self.registry.state.bdseq}

    def _ping(self, command: Command) -> dict[str, Any]:
        return {"request_id": command.request_id, "ok": True, "ts": now()}

    def _on_evict(self, eviction: Eviction) -> None:
        self.metrics.evictions += 1
        self._publish(
            self.topic("events"), {"request_id": None, "state": "evicted", **eviction.to_json()}
        )

    # --- on-demand builds (the local API's operations) -------------------------------------------

    def _lookup(self, request: Command) -> dict[str, Any]:
        sha256 = request.text("sha256")
        record = self.builds.latest(sha256)
        return {
            "build": self._active_build(sha256),
            "request": record.to_json() if record is not None else None,
        }

    def _active_build(self, sha256: str) -> dict[str, Any] | None:
        """The active CPU build of the ONNX model ``sha256`` (an application loads it itself)."""
        with self.registry.lock:
            slots = dict(self.registry.state.models)
        for name, slot in sorted(slots.items()):
            for digest in slot.builds():
                manifest = self.registry.manifest(digest)
                if manifest is None or manifest.source_sha256 != sha256:
                    continue
                if manifest.target.accelerator is None:
                    return {
                        "model": name,
                        "version": slot.version,
                        "digest": digest,
                        "path": str(self.registry.disk.path(digest)),
                        "library": manifest.library,
                    }
        return None

    def _request_build(self, request: Command) -> dict[str, Any]:
        """Ask the build workers for a build (a request still waiting is not repeated unless it
        got no answer for ``BUILD_RETRY_S``: then it goes out again under the same id)."""
        name, onnx = check_name("model name", request.text("name")), request.blob("onnx")
        sha256 = hashlib.sha256(onnx).hexdigest()
        record = self.builds.waiting_for(sha256)
        if record is not None and (
            record.state != "requested" or time.time() - record.ts < BUILD_RETRY_S
        ):
            return {"request": record.to_json(), "new": False}
        command = build_request(
            self.device, name, onnx, record.request_id if record is not None else None
        )
        record = self.builds.add(command["request_id"], sha256, name)
        self.client.publish(BUILD_REQUESTS, dumps(command), qos=1)
        log.info("build request %s: %s (%s) asked for", record.request_id, name, sha256[:12])
        return {"request": record.to_json(), "new": True}

    def _report(self, request: Command) -> dict[str, Any]:
        """Calls an application ran itself (the interposer), and the engine it chose."""
        name = check_name("model name", request.text("model"))
        calls, choice = request.body.get("calls"), request.body.get("choice") or {}
        if not isinstance(calls, dict) or not all(
            engine in ENGINES and isinstance(ms, list) and all(map(_is_number, ms))
            for engine, ms in calls.items()
        ):
            raise ProtocolError(
                "bad-request",
                f"report: 'calls' must map {' or '.join(ENGINES)} to milliseconds",
            )
        latency = choice.get("latency_ms") if isinstance(choice, dict) else None
        if choice and not (
            choice.get("engine") in ENGINES
            and isinstance(latency, dict)
            and set(latency) <= set(ENGINES)
            and all(map(_is_number, latency.values()))
        ):
            raise ProtocolError("bad-request", "report: 'choice' needs 'engine' and 'latency_ms'")
        for engine, ms in calls.items():
            self.metrics.record_calls(name, engine, [float(x) for x in ms])
        if choice:
            kept = {"engine": choice["engine"], "latency_ms": latency}
            if isinstance(choice.get("fallback"), str):  # why the build was left
                kept["fallback"] = choice["fallback"][:500]
            self.metrics.choose(name, kept)
        return {}

    def _on_build_reply(self, payload: bytes) -> None:
        try:
            reply = json.loads(payload)
        except (ValueError, RecursionError):
            return
        if not isinstance(reply, dict) or not isinstance(reply.get("request_id"), str):
            return
        if isinstance(reply.get("error"), dict):
            error = reply["error"]
            self.builds.update(
                reply["request_id"], "failed", f"{error.get('code')}: {error.get('message')}"
            )
        elif reply.get("state") in ("building", "built"):
            self.builds.update(
                reply["request_id"], str(reply["state"]), str(reply.get("worker", ""))
            )

    # --- metrics ---------------------------------------------------------------------------------

    def _metrics_worker(self) -> None:
        while not self.stopping.wait(self.config.metrics_interval_s):
            with self.registry.lock:
                disk, ram = self.registry.disk, self.registry.ram
                cache = {
                    "disk": {"hits": disk.hits, "misses": disk.misses, "used_bytes": disk.used()},
                    "ram": {"hits": ram.hits, "misses": ram.misses, "used_bytes": ram.used()},
                    "evictions": self.metrics.evictions,
                }
                serving = {name: r.to_json() for name, r in self.registry.rankings.items()}
                self.registry.disk.save()
            self.client.publish(
                self.topic("metrics"),
                dumps({"ts": now(), "models": self.metrics.report(serving), "cache": cache}),
                qos=0,
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
