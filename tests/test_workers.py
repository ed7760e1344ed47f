"""On-demand build workers (``boost-build worker``) as real processes: devices ask through their
agents' local API, workers share the requests through the broker's shared subscription and the
jobs through the store directory, the build reaches each device as a verified deployment."""

from __future__ import annotations

import base64
import hashlib
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent.artifact import read_manifest
from agent.builds import WAITING
from agent.local_api import SOCKET, call
from agent.protocol import BUILD_REQUESTS, build_request, deploy_command, dumps
from tests.support.fleet import AgentProcess, CountingStore, Watcher, WorkerProcess, online


def ask(agent: AgentProcess, onnx: Path) -> dict[str, Any]:
    onnx_b64 = base64.b64encode(onnx.read_bytes()).decode()
    answer = call(agent.state_dir / SOCKET, {"op": "request", "name": "tiny_cnn", "onnx": onnx_b64})
    assert answer["ok"], answer
    return answer


def wait_active(agent: AgentProcess, sha256: str, timeout_s: float = 240) -> dict[str, Any]:
    """The active build of the model and its settled request, once the agent has both (the
    request is marked active just after the deployment activates the build)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = call(agent.state_dir / SOCKET, {"op": "lookup", "sha256": sha256})
        assert answer["ok"], answer
        if answer["build"] is not None and answer["request"]["state"] not in WAITING:
            return answer
        assert answer["request"]["state"] != "failed", (answer, agent.log_text()[-3000:])
        time.sleep(0.5)
    raise AssertionError(agent.log_text()[-3000:])


def builds_started(*workers: WorkerProcess) -> int:
    return sum(w.log.count(": building ") for w in workers)


def test_two_workers_build_three_concurrent_requests_once(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    workers: Callable[[str], WorkerProcess],
    zoo_model: Callable[[str], Path],
) -> None:
    pool = [workers("w1"), workers("w2")]
    devices = [agents(f"dev{i}", extra="local_api = true") for i in (1, 2, 3)]
    for agent in devices:
        online(watcher, agent)
    onnx = zoo_model("tiny_cnn")
    sha256 = hashlib.sha256(onnx.read_bytes()).hexdigest()
    with ThreadPoolExecutor(3) as threads:
        asked = list(threads.map(lambda a: ask(a, onnx), devices))
    assert all(a["new"] for a in asked)
    assert ask(devices[0], onnx)["new"] is False  # a request still waiting is not repeated
    found = [wait_active(agent, sha256) for agent in devices]
    assert len({f["build"]["digest"] for f in found}) == 1, found
    assert all(f["request"]["state"] == "active" for f in found), found
    assert builds_started(*pool) == 1, [w.log for w in pool]
    assert sum(w.log.count(": delivered ") for w in pool) >= 1
    taken = [w.log.count(": build request ") for w in pool]
    print(f"\n3 concurrent requests, taken by the 2 workers {taken}: {builds_started(*pool)} build")


def test_a_worker_killed_mid_build_loses_no_request(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    workers: Callable[[str], WorkerProcess],
    zoo_model: Callable[[str], Path],
) -> None:
    pool = [workers("w1"), workers("w2")]
    agent = agents("dev1", extra="local_api = true")
    online(watcher, agent)
    onnx = zoo_model("tiny_cnn")
    ask(agent, onnx)
    deadline = time.monotonic() + 60
    while not (building := [w for w in pool if ": building " in w.log]):
        assert time.monotonic() < deadline, [w.log for w in pool]
        time.sleep(0.05)
    (victim,) = building
    killed = time.monotonic()
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    (survivor,) = [w for w in pool if w is not victim]
    found = wait_active(agent, hashlib.sha256(onnx.read_bytes()).hexdigest())
    took = time.monotonic() - killed
    assert found["request"]["state"] == "active"
    assert ": building " in survivor.log and ": delivered " in survivor.log, survivor.log
    assert ": delivered " not in victim.log
    print(f"\nworker killed mid-build: the request went active through the other in {took:.1f} s")


def test_builds_reach_only_the_device_that_asked(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    workers: Callable[[str], WorkerProcess],
    zoo_model: Callable[[str], Path],
    store: CountingStore,
) -> None:
    workers("w1")
    victim = agents("dev2", extra="local_api = true")
    online(watcher, victim)
    onnx = zoo_model("tiny_cnn")
    # Another device asks in dev2's name: the worker builds and sends the deployment to dev2,
    # which made no such request and refuses it.
    forged = build_request("dev2", "tiny_cnn", onnx.read_bytes())
    mark = watcher.mark()
    watcher.client.publish(BUILD_REQUESTS, dumps(forged), qos=1)
    refusal = watcher.wait_for(
        lambda t, p: t.endswith("dev2/events") and p.get("error", {}).get("code") == "unsolicited",
        240,
        mark,
    )
    assert forged["request_id"] in refusal["error"]["message"]
    # Nor does a deploy command naming a request the device never made get in some other way.
    (artifact,) = store.store.root.glob("sha256/*")
    raw, sig = read_manifest(artifact)
    mark = watcher.mark()
    command = {
        **deploy_command(
            raw, sig, f"{store.url}/sha256/{artifact.name}", artifact.name, artifact.stat().st_size
        ),
        "build_request": "not-mine",
    }
    watcher.client.publish("boost/v1/dev/dev2/cmd/deploy", dumps(command), qos=1)
    answer = watcher.answer(command["request_id"], mark)
    assert answer["error"]["code"] == "unsolicited", answer
    assert (
        call(victim.state_dir / SOCKET, {"op": "lookup", "sha256": forged["sha256"]})["build"]
        is None
    )


def test_bad_requests_get_structured_errors(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    workers: Callable[[str], WorkerProcess],
) -> None:
    workers("w1")
    agent = agents("dev1", extra="local_api = true")
    online(watcher, agent)
    cases = [
        ({"device": "dev1", "sha256": "0" * 64}, "bad-request"),  # not the onnx's digest
        ({"device": "ghost"}, "unknown-device"),
        ({"name": "../x"}, "bad-request"),
        ({}, "build-failed"),  # well formed, but not an ONNX model: the compiler says why
    ]
    for change, code in cases:
        request = {**build_request("dev1", "m", b"not onnx"), **change}
        mark = watcher.mark()
        watcher.client.publish(BUILD_REQUESTS, dumps(request), qos=1)
        reply_to = request["reply_to"]
        reply = watcher.wait_for(lambda t, p, to=reply_to: t == to and "error" in p, 60, mark)
        assert reply["error"]["code"] == code, (change, reply)
    sock = agent.state_dir / SOCKET
    assert oct(sock.stat().st_mode & 0o777) == "0o660"
    for request, code in [
        ({"op": "reboot"}, "unknown-op"),
        ({"op": ["lookup"]}, "unknown-op"),
        ({"op": "lookup"}, "bad-request"),
        ({"op": "request", "name": "m", "onnx": "%%%"}, "bad-request"),
        ({"op": "request", "name": "a/b", "onnx": "aGk="}, "bad-request"),
    ]:
        answer = call(sock, request)
        assert answer["ok"] is False and answer["error"]["code"] == code, (request, answer)
    assert call(sock, {"op": "lookup", "sha256": "0" * 64}) == {
        "ok": True,
        "build": None,
        "request": None,
    }
