"""The deploy loop end to end: a real Mosquitto, agents as real processes, the real artifact store
over HTTP and real TVM builds, driven by the build host's fleet code."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from agent.artifact import Manifest, TargetInfo, generate_keypair, read_manifest
from agent.config import BuildConfig, MqttConfig
from agent.protocol import decode_tensor, deploy_command, device_topic, dumps, group_topic
from models.broker import LocalBroker
from models.fleet import Fleet, decode_outputs
from tests.support.fleet import (
    AgentProcess,
    CountingStore,
    Watcher,
    deploy,
    golden,
    online,
    resign,
)

Keys = tuple[Path, Path]


def test_deploy_infer_redeploy_upgrade_and_rollback(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    fleet: Fleet,
    store: CountingStore,
    build: Callable[..., Path],
    keys: Keys,
    tmp_path: Path,
) -> None:
    agent = agents()
    online(watcher, agent)
    v1 = build("tiny_cnn")

    (outcome,) = deploy(fleet, store, v1)
    assert outcome.state == "active", outcome
    states = [e["state"] for e in outcome.events if "bytes" not in e]
    assert states == [
        "accepted",
        "downloading",
        "verifying",
        "installing",
        "loading",
        "smoke-testing",
        "active",
    ]
    assert [e["seq"] for e in outcome.events] == list(range(1, len(outcome.events) + 1))
    assert any("bytes" in e for e in outcome.events), "no download progress events"

    inputs, expected = golden(v1, tmp_path / "g1", keys[1])
    reply = fleet.infer("dev1", "tiny_cnn", inputs, 30)
    assert reply["ok"] and reply["version"] == "1"
    (got,) = decode_outputs(reply).values()
    np.testing.assert_allclose(got, expected[0], rtol=1e-3, atol=1e-4)

    # The same build again: nothing is downloaded, the answer is "already active".
    requests = store.requests
    (again,) = deploy(fleet, store, v1)
    assert (again.state, again.detail) == ("active", "already active")
    assert store.requests == requests
    # ...and the same deploy command delivered twice is answered from the record.
    url, digest, size = store.publish(v1)
    manifest, signature = read_manifest(v1)
    command = deploy_command(manifest, signature, url, digest, size)
    mark = watcher.mark()
    watcher.send("dev1", "deploy", command)
    first = watcher.answer(command["request_id"], mark)
    watcher.send("dev1", "deploy", {**command, "request_id": "redelivered"})
    replay = watcher.answer("redelivered", mark)
    assert replay["duplicate"] is True and replay["state"] == first["state"] == "active"

    v2 = build("tiny_cnn", version="2")
    (upgrade,) = deploy(fleet, store, v2)
    assert upgrade.state == "active", upgrade
    models = watcher.wait_for(
        lambda t, p: (
            t == device_topic("dev1", "models")
            and p["models"].get("tiny_cnn", {}).get("version") == "2"
        )
    )
    assert models["models"]["tiny_cnn"]["last_good"] == store.publish(v1)[1]

    def break_golden(path: Path) -> None:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        arrays["output:0"] = arrays["output:0"] + 1.0
        np.savez(path.with_suffix(""), **arrays)  # np.savez appends .npz

    v3 = resign(
        build("tiny_cnn", version="3"),
        tmp_path / "bad-golden.boost",
        *keys,
        files={"golden.npz": break_golden},
    )
    (bad,) = deploy(fleet, store, v3)
    assert bad.state == "rolled-back", bad
    assert bad.events[-1]["error"]["code"] == "smoke-test"
    assert "golden test FAILED" in bad.detail
    reply = fleet.infer("dev1", "tiny_cnn", inputs, 30)
    assert reply["ok"] and reply["version"] == "2"


def test_rejected_before_any_download(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    fleet: Fleet,
    store: CountingStore,
    build: Callable[..., Path],
    keys: Keys,
    tmp_path: Path,
) -> None:
    agent = agents()
    online(watcher, agent)

    def needs(feature: str) -> Callable[[TargetInfo], TargetInfo]:
        return lambda t: replace(t, cpu_features=(*t.cpu_features, feature))

    def vta(t: TargetInfo) -> TargetInfo:
        return replace(t, accelerator="vta:2x8_i8w8a32_15_15_18_17")

    x86 = build("tiny_cnn")
    other_key = tmp_path / "other.key"
    generate_keypair(other_key)
    cases = {
        "arm": (build("tiny_cnn", "aarch64"), "incompatible", "built for aarch64-linux-gnu"),
        "sve": (
            resign(x86, tmp_path / "sve.boost", *keys, target=needs("sve")),
            "incompatible",
            "needs CPU features the device lacks: sve",
        ),
        "vta": (
            resign(x86, tmp_path / "vta.boost", *keys, target=vta),
            "incompatible",
            "needs accelerator vta:2x8_i8w8a32_15_15_18_17",
        ),
        "untrusted": (
            resign(x86, tmp_path / "untrusted.boost", other_key, keys[1]),
            "untrusted",
            "which is not trusted",
        ),
    }
    for name, (artifact, code, message) in cases.items():
        url, digest, size = store.publish(artifact)
        manifest, signature = read_manifest(artifact)
        command = deploy_command(manifest, signature, url, digest, size)
        mark = watcher.mark()
        before = store.requests
        watcher.send("dev1", "deploy", command)
        final = watcher.answer(command["request_id"], mark)
        assert final["state"] == "rejected", (name, final)
        assert final["error"]["code"] == code, (name, final)
        assert message in final["error"]["message"], (name, final)
        assert store.requests == before, f"{name}: {store.requests - before} HTTP requests made"

    # A URL outside the allow-list is refused without contacting it.
    url, digest, size = store.publish(x86)
    manifest, signature = read_manifest(x86)
    elsewhere = url.replace("127.0.0.1", "localhost")
    command = deploy_command(manifest, signature, elsewhere, digest, size)
    mark, before = watcher.mark(), store.requests
    watcher.send("dev1", "deploy", command)
    final = watcher.answer(command["request_id"], mark)
    assert final["error"]["code"] == "url-not-allowed"
    assert store.requests == before

    # The build host checks compatibility too, and sends nothing to an incompatible device.
    (skipped,) = deploy(fleet, store, build("tiny_cnn", "aarch64"))
    assert skipped.state == "incompatible" and skipped.events == []


def test_cache_budget_pins_and_restart(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    fleet: Fleet,
    store: CountingStore,
    build: Callable[..., Path],
    keys: Keys,
) -> None:
    a, b, c = (build("tiny_cnn", as_name=n) for n in ("model_a", "model_b", "model_c"))
    # Room for two unpacked builds and a half, not three.
    manifest = read_manifest(a)[0]
    entry = sum(f.size for f in Manifest.from_json(manifest).files) + 2 * len(manifest)
    budget = int(entry * 2.5)
    agent = agents(extra=f"[agent.cache]\nmax_bytes = {budget}\n")
    online(watcher, agent)

    def evicted(after: int) -> str:
        event = watcher.wait_for(lambda t, p: p.get("state") == "evicted", 10, after)
        assert event["reason"].startswith("lfu: "), event
        return str(event["digest"])

    assert [o.state for o in deploy(fleet, store, a)] == ["active"]
    assert [o.state for o in deploy(fleet, store, b, pin=True)] == ["active"]
    # Both are protected (active; b also pinned): a third build does not fit.
    (full,) = deploy(fleet, store, c)
    assert full.state == "rejected" and full.events[-1]["error"]["code"] == "cache-full"
    assert "raise the budget or unpin/undeploy models" in full.detail

    mark = watcher.mark()
    watcher.send("dev1", "undeploy", {"model": "model_a"})
    assert watcher.wait_for(lambda t, p: p.get("undeployed") == "model_a", after=mark)["ok"]
    mark = watcher.mark()
    assert [o.state for o in deploy(fleet, store, c)] == ["active"]
    assert evicted(mark) == store.publish(a)[1]

    # b is pinned: undeploying it keeps it cached, so a cannot come back until b is unpinned.
    watcher.send("dev1", "undeploy", {"model": "model_b"})
    (refused,) = deploy(fleet, store, a)
    assert refused.state == "rejected" and "cache-full" in json.dumps(refused.events[-1])
    watcher.send("dev1", "unpin", {"model": "model_c"})  # c is active anyway: still protected
    watcher.send("dev1", "unpin", {"digest": store.publish(b)[1]})
    mark = watcher.mark()
    assert [o.state for o in deploy(fleet, store, a)] == ["active"]
    assert evicted(mark) == store.publish(b)[1]

    # Restart with the index deleted: rebuilt from disk, active models back without a download.
    assert agent.stop() == 0
    (agent.state_dir / "cache" / "index.json").unlink()
    requests = store.requests
    mark = watcher.mark()
    agent.start()
    online(watcher, agent, mark)
    assert "index missing: rebuilt from 2 entries" in agent.log_text()
    inputs, _ = golden(a, agent.root / "golden", keys[1])
    for name in ("model_a", "model_c"):
        assert fleet.infer("dev1", name, inputs, 30)["ok"], name
    # Damaged index: rebuilt as well.
    assert agent.stop() == 0
    (agent.state_dir / "cache" / "index.json").write_text("{not json")
    mark = watcher.mark()
    agent.start()
    online(watcher, agent, mark)
    assert "index damaged" in agent.log_text()
    assert fleet.infer("dev1", "model_c", inputs, 30)["ok"]
    assert store.requests == requests


def test_sigkill_publishes_the_will_and_restart_a_new_bdseq(
    agents: Callable[..., AgentProcess], watcher: Watcher
) -> None:
    agent = agents()
    first = online(watcher, agent)
    mark = watcher.mark()
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    assert watcher.state("dev1", False, mark, timeout_s=20) == first
    mark = watcher.mark()
    agent.start()
    assert online(watcher, agent, mark) == first + 1


def test_clean_stop_says_offline_and_exits_zero(
    agents: Callable[..., AgentProcess], watcher: Watcher
) -> None:
    agent = agents()
    bdseq = online(watcher, agent)
    mark = watcher.mark()
    assert agent.stop(signal.SIGINT) == 0
    assert watcher.state("dev1", False, mark, timeout_s=10) == bdseq


def test_broker_restart_reconnects_and_rebirths(
    agents: Callable[..., AgentProcess],
    broker: LocalBroker,
    fleet: Fleet,
    store: CountingStore,
    build: Callable[..., Path],
    tmp_path: Path,
) -> None:
    agent = agents()
    watcher = Watcher(broker.url)
    first = online(watcher, agent)
    watcher.close()
    broker.stop()
    time.sleep(1.0)
    broker.start()
    watcher = Watcher(broker.url)
    try:
        assert online(watcher, agent) > first
        caps = watcher.wait_for(lambda t, p: t == device_topic("dev1", "caps"))
        assert caps["cpu"]["triple"] == "x86_64-linux-gnu"
    finally:
        watcher.close()
    with Fleet(BuildConfig(mqtt=MqttConfig(url=broker.url))) as fresh:
        assert [o.state for o in deploy(fresh, store, build("tiny_cnn"))] == ["active"]


def test_bad_commands_get_structured_errors(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    fleet: Fleet,
    store: CountingStore,
    build: Callable[..., Path],
) -> None:
    agent = agents()
    online(watcher, agent)
    assert [o.state for o in deploy(fleet, store, build("tiny_cnn"))] == ["active"]

    def error_for(verb: str, body: dict[str, object], raw: bytes | None = None) -> dict[str, str]:
        mark = watcher.mark()
        request_id = watcher.send("dev1", verb, body, raw)
        reply = watcher.wait_for(
            lambda t, p: "error" in p and p.get("request_id") in (request_id, None), after=mark
        )
        return reply["error"]  # type: ignore[no-any-return]

    assert error_for("deploy", {}, raw=b"{nope")["code"] == "bad-json"
    assert error_for("reboot", {})["code"] == "unknown-verb"
    assert error_for("deploy", {"url": 5})["code"] == "bad-request"
    assert error_for("infer", {"model": "nope", "inputs": {}})["code"] == "unknown-model"
    bad_shape = {"input": {"shape": [1, 2], "dtype": "float32", "data": "AAAAAAAAAAA="}}
    assert error_for("infer", {"model": "tiny_cnn", "inputs": bad_shape}) == {
        "code": "bad-input",
        "message": "input 'input': expected float32[1, 3, 32, 32], got float32[1, 2]",
    }
    wrong_name = {"x": bad_shape["input"]}
    assert error_for("infer", {"model": "tiny_cnn", "inputs": wrong_name}) == {
        "code": "bad-input",
        "message": "inputs ['input'] expected; missing ['input'], unknown ['x']",
    }
    truncated = {"input": {"shape": [1, 3, 32, 32], "dtype": "float32", "data": "AAAA"}}
    assert error_for("infer", {"model": "tiny_cnn", "inputs": truncated}) == {
        "code": "bad-input",
        "message": "input 'input': float32[1, 3, 32, 32] needs 12288 bytes, got 3",
    }
    assert error_for("evict", {"digest": store.publish(build("tiny_cnn"))[1]})["code"] == "failed"
    mark = watcher.mark()
    request_id = watcher.send("dev1", "ping", {})
    assert watcher.answer(request_id, mark)["ok"] is True
    assert agent.process is not None and agent.process.poll() is None


def test_mqtt_311_agent_and_fleet(
    agents: Callable[..., AgentProcess],
    broker: LocalBroker,
    store: CountingStore,
    build: Callable[..., Path],
    keys: Keys,
    tmp_path: Path,
) -> None:
    agent = agents(protocol="3.1.1", extra='groups = ["lab"]')
    watcher = Watcher(broker.url)
    try:
        online(watcher, agent)
        # A command to the device's group reaches it too.
        mark = watcher.mark()
        watcher.client.publish(
            group_topic("lab", "cmd/ping"), dumps({"request_id": "group-ping"}), qos=1
        )
        assert watcher.answer("group-ping", mark)["ok"] is True
    finally:
        watcher.close()
    config = BuildConfig(mqtt=MqttConfig(url=broker.url, protocol="3.1.1"))
    with Fleet(config) as fleet:
        fleet.select("dev1", wait_s=15)
        artifact = build("tiny_cnn")
        assert [o.state for o in deploy(fleet, store, artifact)] == ["active"], agent.log_text()
        inputs, expected = golden(artifact, tmp_path / "g", keys[1])
        reply = fleet.infer("dev1", "tiny_cnn", inputs, 30)
    ((name, raw),) = reply["outputs"].items()
    np.testing.assert_allclose(decode_tensor(name, raw), expected[0], rtol=1e-3, atol=1e-4)
