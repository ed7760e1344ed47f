"""Property-based fuzzing (hypothesis) of every MQTT command and of signed manifests, sent to a
real agent process over a real broker: every message gets a structured answer and the agent
stays up. The default run sends a few hundred cases; ``-m slow`` sends 10,000."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.artifact import load_private_key, read_manifest, sign_manifest
from agent.protocol import (
    REPLY_PREFIX,
    VERBS,
    deploy_command,
    device_topic,
    dumps,
    encode_tensor,
    new_request_id,
)
from models.fleet import FINAL_STATES, Fleet
from tests.support.fleet import AgentProcess, CountingStore, Watcher, deploy, online

Keys = tuple[Path, Path]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
tensors = st.fixed_dictionaries(
    {},
    optional={
        "shape": st.lists(st.integers(-2, 2**40), max_size=6) | json_values,
        "dtype": st.sampled_from(["float32", "int8", "float64", "object", "bool", ""])
        | json_values,
        "data": st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()) | json_values,
    },
)
KEYS = ("model", "inputs", "digest", "deploy_id", "manifest", "signature", "url", "sha256",
        "size", "pin", "bitstream_url", "reply_to")  # fmt: skip


@st.composite
def commands(draw: st.DrawFn, model_input: dict[str, Any]) -> tuple[str, bytes | dict[str, Any]]:
    """(verb, raw payload or a body that gets a fresh request id when sent)."""
    verb = draw(st.sampled_from([*VERBS, "reboot", ""]))
    kind = draw(st.sampled_from(["bytes", "json", "fields", "infer"]))
    if kind == "bytes":
        return verb, draw(st.binary(max_size=200))
    if kind == "json":
        return verb, json.dumps(draw(json_values)).encode()
    body: dict[str, Any] = draw(st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6))
    if kind == "infer":
        verb = "infer"
        body["model"] = draw(st.sampled_from(["tiny_cnn", "nope", ""]) | json_values)
        body["inputs"] = draw(
            st.just({"input": model_input})
            | st.dictionaries(st.sampled_from(["input", "x"]), tensors, max_size=2)
            | json_values
        )
    if draw(st.booleans()):
        body["reply_to"] = REPLY_PREFIX + draw(st.text("abc/", max_size=10))
    if verb == "undeploy" and body.get("model") == "tiny_cnn":
        body["model"] = "other"  # keep the model the infer cases use
    return verb, body


def manifest_mutations(manifest: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """The real manifest with one value somewhere replaced, deleted, or a key added."""

    def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        out = [prefix]
        if isinstance(value, dict):
            for k, v in value.items():
                out += paths(v, (*prefix, k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                out += paths(v, (*prefix, i))
        return out

    @st.composite
    def mutate(draw: st.DrawFn) -> dict[str, Any]:
        copy = json.loads(json.dumps(manifest))
        path = draw(st.sampled_from(paths(copy)[1:]))
        parent = copy
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
        else:
            parent[path[-1]] = draw(json_values)
        return copy

    return mutate()


def structured(reply: dict[str, Any]) -> bool:
    if reply.get("ok") is True or reply.get("state") == "active":
        return True
    error = reply.get("error")
    return (
        isinstance(error, dict)
        and isinstance(error.get("code"), str)
        and isinstance(error.get("message"), str)
        and (reply.get("ok") is False or reply.get("state") in FINAL_STATES)
    )


def fuzz(
    commands_n: int,
    manifests_n: int,
    agents: Callable[..., AgentProcess],
    broker_url: str,
    fleet: Fleet,
    store: CountingStore,
    build: Callable[..., Path],
    keys: Keys,
) -> None:
    agent = agents()
    watcher = Watcher(broker_url, topics="#")  # replies may go anywhere under boost/v1
    try:
        online(watcher, agent)
        artifact = build("tiny_cnn")
        assert [o.state for o in deploy(fleet, store, artifact)] == ["active"]
        model_input = encode_tensor(np.zeros((1, 3, 32, 32), np.float32))
        counts = {"commands": 0, "manifests": 0, "errors": 0}

        def answer_to(verb: str, payload: bytes | dict[str, Any]) -> dict[str, Any]:
            """The answer to a raw payload, or to a body under a fresh request id (a repeated
            id would be answered from the agent's memory of it)."""
            mark = watcher.mark()
            request_id = new_request_id()
            identified = isinstance(payload, dict) and verb in VERBS
            if isinstance(payload, dict):
                payload = dumps({**payload, "request_id": request_id})
            watcher.client.publish(device_topic("dev1", f"cmd/{verb}"), payload, qos=1)
            if identified:
                return watcher.answer(request_id, mark, timeout_s=30)
            return watcher.wait_for(
                lambda t, p: t.endswith("/events") and "error" in p and p["request_id"] is None,
                30,
                mark,
            )

        @settings(max_examples=commands_n, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(command=commands(model_input))
        def one_command(command: tuple[str, bytes | dict[str, Any]]) -> None:
            reply = answer_to(*command)
            assert structured(reply), (command, reply)
            counts["commands"] += 1
            counts["errors"] += "error" in reply

        one_command()

        manifest, _ = read_manifest(artifact)
        url, digest, size = store.publish(artifact)
        signer = load_private_key(keys[0])

        @settings(max_examples=manifests_n, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(mutated=manifest_mutations(json.loads(manifest)))
        def one_manifest(mutated: dict[str, Any]) -> None:
            raw = json.dumps(mutated).encode()
            command = deploy_command(raw, sign_manifest(raw, signer), url, digest, size)
            reply = answer_to("deploy", command)
            assert structured(reply), (mutated, reply)
            counts["manifests"] += 1
            counts["errors"] += "error" in reply

        one_manifest()
        assert agent.process is not None and agent.process.poll() is None
        log = agent.log_text()
        crash = log.find("Traceback")
        assert crash < 0, log[max(0, crash - 1000) : crash + 3000]
        # Still serving: the model answers and its state is intact.
        mark = watcher.mark()
        request_id = watcher.send(
            "dev1", "infer", {"model": "tiny_cnn", "inputs": {"input": model_input}}
        )
        assert watcher.answer(request_id, mark)["ok"]
        print(
            f"\nfuzz cases: {counts['commands']} commands + {counts['manifests']} signed "
            f"manifests, {counts['errors']} structured errors, 0 crashes"
        )
    finally:
        watcher.close()


@pytest.mark.parametrize(
    ("commands_n", "manifests_n"), [(300, 100), pytest.param(7000, 3000, marks=pytest.mark.slow)]
)
def test_fuzzed_commands_and_manifests(
    agents: Callable[..., AgentProcess],
    broker: Any,
    fleet: Fleet,
    store: CountingStore,
    build: Callable[..., Path],
    keys: Keys,
    commands_n: int,
    manifests_n: int,
) -> None:
    fuzz(commands_n, manifests_n, agents, broker.url, fleet, store, build, keys)


def test_oversized_and_deeply_nested_commands(
    agents: Callable[..., AgentProcess], watcher: Watcher
) -> None:
    agent = agents(extra="max_command_bytes = 4096")
    online(watcher, agent)
    for payload, code in (
        (dumps({"request_id": "big", "model": "m", "pad": "x" * 5000}), "too-large"),
        (b"[" * 2000 + b"]" * 2000, "bad-json"),
    ):
        mark = watcher.mark()
        watcher.client.publish(device_topic("dev1", "cmd/infer"), payload, qos=1)
        reply = watcher.wait_for(lambda t, p: "error" in p, 30, mark)
        assert reply["request_id"] is None and reply["error"]["code"] == code, reply
    mark = watcher.mark()
    request_id = watcher.send("dev1", "ping", {})
    assert watcher.answer(request_id, mark)["ok"]
