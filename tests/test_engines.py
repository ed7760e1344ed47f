"""Engine selection in the agent: a CPU build and a VTA build of one model, deployed one after the
other to a real agent, are both kept; the agent times them on their golden inputs and routes
inference to the faster (or, with ``prefer = "accelerator"``, to the accelerator); when the
accelerator dies the CPU build takes over without a failed request."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.engines import Measured, Ranking, median_ms
from models.fleet import Fleet, decode_outputs
from tests.conftest import Keys
from tests.support.firmware import FirmwareProcess
from tests.support.fleet import AgentProcess, CountingStore, Watcher, deploy, golden, online
from vta.config import VtaConfig


def test_ranking_orders_by_preference_and_latency_and_keeps_the_last_build() -> None:
    builds = [
        Measured("a" * 64, "tvm", 2.0),
        Measured("b" * 64, "vta-serial", 5.0),
        Measured("c" * 64, "vta-sim", error="golden test FAILED"),
    ]
    fastest = Ranking([dataclasses.replace(m) for m in builds], "fastest")
    assert [m.engine for m in fastest.builds] == ["tvm", "vta-serial", "vta-sim"]
    accelerator = Ranking(builds, "accelerator")
    assert [m.engine for m in accelerator.builds] == ["vta-serial", "tvm", "vta-sim"]
    assert accelerator.to_json()["serving"] == "vta-serial"
    assert accelerator.fail("b" * 64, "port went away") == builds[0]
    assert accelerator.to_json()["engines"][2] == {
        "engine": "vta-serial", "digest": "b" * 64, "latency_ms": 5.0, "error": "port went away"
    }  # fmt: skip
    assert accelerator.fail("a" * 64, "crashed") is None  # the last working build stays
    assert accelerator.serving() == builds[0] and builds[0].error is None


def test_median_ms_stops_at_its_budget() -> None:
    calls = []
    assert median_ms(lambda: calls.append(time.sleep(0.02)), runs=100, budget_s=0.1) >= 20
    assert 2 <= len(calls) <= 8  # the warm-up and about 0.1 s of timed runs


def activate(fleet: Fleet, store: CountingStore, artifact: Path) -> dict[str, Any]:
    """Deploy ``artifact`` to dev1; its final (``active``) event."""
    (outcome,) = deploy(fleet, store, artifact)
    assert outcome.state == "active", outcome
    return outcome.events[-1]


def model_doc(
    watcher: Watcher, done: Callable[[dict[str, Any]], bool], after: int = 0
) -> dict[str, Any]:
    """dev1's first retained ``models`` document (from ``after``) whose tiny_cnn satisfies
    ``done``."""
    doc = watcher.wait_for(
        lambda t, p: t.endswith("dev1/models") and done(p["models"].get("tiny_cnn", {})),
        60,
        after,
    )
    result: dict[str, Any] = doc["models"]["tiny_cnn"]
    return result


def infer(fleet: Fleet, inputs: dict[str, np.ndarray]) -> tuple[dict[str, Any], np.ndarray]:
    reply = fleet.infer("dev1", "tiny_cnn", inputs, 60)
    assert reply["ok"], reply
    (out,) = decode_outputs(reply).values()
    return reply, out


def test_the_faster_build_serves_and_both_are_reported(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    fleet: Fleet,
    store: CountingStore,
    build: Callable[..., Path],
    keys: Keys,
    tmp_path: Path,
) -> None:
    online(watcher, agents())
    cpu, vta = build("tiny_cnn"), build("tiny_cnn", "vta")
    first = activate(fleet, store, cpu)
    assert first["serving"] == "tvm"
    assert [e["latency_ms"] for e in first["engines"]] == [None]  # nothing to compare with

    final = activate(fleet, store, vta)
    timed = {e["engine"]: e for e in final["engines"]}
    assert set(timed) == {"tvm", "vta-sim"}, final
    assert all(e["latency_ms"] > 0 and "error" not in e for e in timed.values()), final
    fastest = min(timed.values(), key=lambda e: e["latency_ms"])
    print(
        f"tiny_cnn: {final['serving']} serves; "
        + "; ".join(f"{k} {e['latency_ms']} ms" for k, e in timed.items())
    )
    assert final["serving"] == fastest["engine"] and final["engines"][0] == fastest
    models = model_doc(watcher, lambda m: m.get("digest") == store.publish(vta)[1])
    assert models["variants"] == [store.publish(cpu)[1]] and models["serving"] == final["serving"]

    inputs, expected = golden(cpu if fastest["engine"] == "tvm" else vta, tmp_path / "g", keys[1])
    reply, out = infer(fleet, inputs)
    assert reply["engine"] == fastest["engine"] and reply["digest"] == fastest["digest"]
    np.testing.assert_allclose(out, expected[0], rtol=1e-3, atol=1e-3)

    # Another version replaces both builds; the build it replaced becomes last-good.
    v2 = activate(fleet, store, build("tiny_cnn", version="2"))
    assert [e["engine"] for e in v2["engines"]] == ["tvm"]
    models = model_doc(watcher, lambda m: m.get("version") == "2")
    assert models["variants"] == [] and models["last_good"] == store.publish(vta)[1]


def test_a_failed_accelerator_hands_the_model_to_the_cpu_build(
    firmware: Callable[[VtaConfig], Path],
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    fleet: Fleet,
    store: CountingStore,
    build: Callable[..., Path],
    keys: Keys,
    tmp_path: Path,
) -> None:
    cpu, vta = build("tiny_cnn"), build("tiny_cnn", "vta")
    cpu_inputs, cpu_expected = golden(cpu, tmp_path / "cpu", keys[1])
    vta_inputs, vta_expected = golden(vta, tmp_path / "vta", keys[1])
    with FirmwareProcess(firmware(VtaConfig())) as device:
        agent = agents(
            extra=f'backends = ["vta-serial", "cpu"]\nserial_ports = ["{device.port}"]\n'
            'prefer = "accelerator"\nmetrics_interval_s = 1'
        )
        online(watcher, agent)
        activate(fleet, store, cpu)
        final = activate(fleet, store, vta)
        assert final["serving"] == "vta-serial", final
        assert {e["engine"] for e in final["engines"] if e["latency_ms"] > 0} == {
            "tvm",
            "vta-serial",
        }
        served = watcher.mark()  # metrics before this may still name the CPU build alone
        reply, out = infer(fleet, vta_inputs)
        assert reply["engine"] == "vta-serial" and np.array_equal(out, vta_expected[0])

        mark = watcher.mark()
        device.stop()  # the coprocessor dies between two requests

    reply, out = infer(fleet, cpu_inputs)
    assert reply["engine"] == "tvm", reply
    np.testing.assert_allclose(out, cpu_expected[0], rtol=1e-3, atol=1e-4)
    failed = watcher.wait_for(lambda t, p: p.get("state") == "engine-failed", 30, mark)
    assert failed["engine"] == "vta-serial" and failed["serving"]["engine"] == "tvm", failed
    print(f"engine-failed: {failed['detail']}")
    assert "went away" in failed["detail"], failed
    # The failed call counts for neither engine; the call it handed over counts once, for tvm.
    reports = watcher.metrics_until("tiny_cnn", lambda m: "tvm" in m.get("engines", {}), 30, served)
    calls: dict[str, int] = {}
    for report in reports:
        for engine, n in report.get("engines", {}).items():
            calls[engine] = calls.get(engine, 0) + n
    assert calls == {"vta-serial": 1, "tvm": 1}, reports
    watcher.metrics_until(
        "tiny_cnn", lambda m: m.get("serving", {}).get("serving") == "tvm", 30, watcher.mark()
    )
    assert fleet.infer("dev1", "tiny_cnn", cpu_inputs, 60)["engine"] == "tvm"

    # Started again with the coprocessor gone, the agent serves the model from the CPU build.
    agent.stop()
    mark = watcher.mark()
    agent.start()
    online(watcher, agent, mark)
    models = model_doc(watcher, lambda m: "serving" in m, mark)
    assert models["serving"] == "tvm", models
    (vta_entry,) = [e for e in models["engines"] if e["digest"] == store.publish(vta)[1]]
    assert "needs accelerator" in vta_entry["error"], vta_entry
    reply, out = infer(fleet, cpu_inputs)
    assert reply["engine"] == "tvm"
    np.testing.assert_allclose(out, cpu_expected[0], rtol=1e-3, atol=1e-4)
