"""Fault injection with real processes, a real broker and real HTTP: the agent killed at random
points of deployments, the broker restarted, the store cutting connections or stalling, a full
disk, damaged cache files. Each test prints the counts the closing notes quote."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.artifact import Manifest, read_manifest
from agent.config import BuildConfig, MqttConfig
from agent.deploy import DISK_MARGIN
from agent.protocol import decode_tensor, deploy_command, infer_command
from models.broker import LocalBroker
from models.fleet import FINAL_STATES, Fleet
from tests.support.fleet import (
    AgentProcess,
    CountingStore,
    Fault,
    Watcher,
    assert_cache_consistent,
    deploy,
    golden,
    online,
    resign,
)

Keys = tuple[Path, Path]


def final_event(
    watcher: Watcher, deploy_id: str, after: int, timeout_s: float = 90
) -> dict[str, Any]:
    return watcher.wait_for(
        lambda t, p: (
            t.endswith("/events")
            and p.get("deploy_id") == deploy_id
            and p.get("state") in FINAL_STATES
        ),
        timeout_s,
        after,
    )


@pytest.fixture
def versions(build: Callable[..., Path], keys: Keys, tmp_path: Path) -> list[Path]:
    """Four versions of the same real build (same weights, so one golden answer)."""
    base = build("tiny_cnn")
    return [resign(base, tmp_path / f"v{i}.boost", *keys, version=f"{i}") for i in range(1, 5)]


# -- SIGKILL at random points -----------------------------------------------------------------


def kill_during_deployments(
    kills: int,
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    store: CountingStore,
    build: Callable[..., Path],
    keys: Keys,
    tmp_path: Path,
) -> None:
    """Deploy versions of a VTA build in turn (its golden test runs on the simulator, so loading
    and testing take a while too) and SIGKILL the agent at a uniformly random moment of each
    deployment; after the restart the deployment must complete and the cache be consistent."""
    rng = random.Random(kills)
    base = build("tiny_cnn", "vta")
    versions = [resign(base, tmp_path / f"k{i}.boost", *keys, version=f"{i}") for i in range(4)]
    inputs, expected = golden(versions[0], tmp_path / "golden", keys[1])
    published = [(store.publish(v), read_manifest(v)) for v in versions]
    entry = max(v.stat().st_size for v in versions)
    # Room for three builds: the oldest is evicted as the versions go round.
    agent = agents(extra=f"[agent.cache]\nmax_bytes = {int(entry * 3.6)}\n")
    store.pace_s = 0.05  # the download takes about as long as the rest
    online(watcher, agent)
    phase_at_kill: Counter[str] = Counter()
    duration = 0.0
    for i in range(kills + 1):
        (url, digest, size), (manifest, signature) = published[i % len(published)]
        command = deploy_command(manifest, signature, url, digest, size)
        mark = watcher.mark()
        sent = time.monotonic()
        watcher.send("dev1", "deploy", command)
        if i == 0:  # the first one is not killed: it measures how long a deployment takes
            final = final_event(watcher, command["deploy_id"], mark)
            duration = time.monotonic() - sent
        else:
            time.sleep(max(0.0, sent + rng.uniform(0.0, duration) - time.monotonic()))
            agent.stop(signal.SIGKILL)
            states = [e["state"] for e in watcher.events(command["request_id"]) if "bytes" not in e]
            phase_at_kill[states[-1] if states else "before accepted"] += 1
            agent.start()
            final = final_event(watcher, command["deploy_id"], mark)
        assert final["state"] == "active", (final, agent.log_text()[-4000:])
        assert_cache_consistent(agent.state_dir, keys[1])
        state = json.loads((agent.state_dir / "state.json").read_text())
        assert state["models"]["tiny_cnn"]["active"] == digest
        ask = infer_command("tiny_cnn", inputs)
        mark = watcher.mark()
        watcher.send("dev1", "infer", ask)
        reply = watcher.answer(ask["request_id"], mark)
        assert reply["ok"] and reply["digest"] == digest, reply
        ((name, raw),) = reply["outputs"].items()
        assert np.array_equal(decode_tensor(name, raw), expected[0])
    log = agent.log_text()
    assert "damaged" not in log and "Traceback" not in log, log[-4000:]
    print(
        f"\nkills survived: {kills} (deployment {duration * 1e3:.0f} ms); last event seen before "
        f"each kill: {dict(phase_at_kill)}"
    )


@pytest.mark.parametrize("kills", [20, pytest.param(100, marks=pytest.mark.slow)])
def test_sigkill_at_random_points_of_deployments(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    store: CountingStore,
    build: Callable[..., Path],
    keys: Keys,
    tmp_path: Path,
    kills: int,
) -> None:
    kill_during_deployments(kills, agents, watcher, store, build, keys, tmp_path)


def test_a_deployment_the_agent_keeps_dying_in_is_given_up(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    store: CountingStore,
    versions: list[Path],
) -> None:
    agent = agents()
    online(watcher, agent)
    url, digest, size = store.publish(versions[0])
    command = deploy_command(*read_manifest(versions[0]), url, digest, size)
    store.faults = [Fault(after=0, stall_s=3.0)] * 3  # every attempt hangs in the download
    mark = watcher.mark()
    watcher.send("dev1", "deploy", command)
    for _ in range(3):
        watcher.wait_for(lambda t, p: p.get("state") == "downloading", 30, mark)
        mark = watcher.mark()
        agent.stop(signal.SIGKILL)
        agent.start()
    final = final_event(watcher, command["deploy_id"], 0)
    assert final["state"] == "failed" and final["error"]["code"] == "crashed", final
    assert "stopped 3 times" in final["detail"]


# -- the broker restarts -----------------------------------------------------------------------


def test_broker_restart_during_a_deployment_and_an_inference_burst(
    agents: Callable[..., AgentProcess],
    broker: LocalBroker,
    store: CountingStore,
    versions: list[Path],
    keys: Keys,
    tmp_path: Path,
) -> None:
    agent = agents()
    config = BuildConfig(mqtt=MqttConfig(url=broker.url))
    inputs, expected = golden(versions[0], tmp_path / "golden", keys[1])
    with Fleet(config) as fleet:
        fleet.select("dev1", wait_s=30)
        store.pace_s = 0.1  # the download takes about a second
        outcome: list[Any] = []
        deploying = threading.Thread(
            target=lambda: outcome.extend(deploy(fleet, store, versions[0]))
        )
        deploying.start()
        deadline = time.monotonic() + 30
        while store.body_bytes == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        broker.stop()  # in the middle of the download
        time.sleep(1.0)
        broker.start()
        deploying.join(120)
        assert [o.state for o in outcome] == ["active"], (outcome, agent.log_text()[-3000:])
        assert agent.log_text().count("model tiny_cnn: version 1 active") == 1

        store.pace_s = 0.0

        def ask(i: int) -> dict[str, Any]:
            return fleet.infer("dev1", "tiny_cnn", inputs, 60)

        with ThreadPoolExecutor(4) as pool:
            answers = [pool.submit(ask, i) for i in range(200)]
            time.sleep(0.3)
            broker.stop()
            time.sleep(1.0)
            broker.start()
            replies = [a.result(90) for a in answers]
    assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]][:3]
    for reply in replies:
        ((name, raw),) = reply["outputs"].items()
        np.testing.assert_allclose(decode_tensor(name, raw), expected[0], rtol=1e-5, atol=1e-6)
    assert agent.process is not None and agent.process.poll() is None
    print(f"\nbroker restarts survived: 2; inference answers: {len(replies)} of 200")


# -- the store cuts connections -----------------------------------------------------------------


def test_downloads_resume_after_dropped_connections(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    fleet: Fleet,
    store: CountingStore,
    versions: list[Path],
) -> None:
    agent = agents()
    online(watcher, agent)
    rng = random.Random(5)
    interruptions, ratios = 0, []
    for artifact in versions[:3]:
        size = artifact.stat().st_size
        offsets = sorted(rng.sample(range(1, size), 5))
        # Each response is cut where the file reaches the next offset.
        store.faults = [Fault(cut=b - a) for a, b in zip([0, *offsets], offsets, strict=False)]
        before = store.body_bytes
        (outcome,) = deploy(fleet, store, artifact)
        assert outcome.state == "active", (outcome, agent.log_text()[-3000:])
        assert store.faults == []
        interruptions += 5
        ratio = (store.body_bytes - before) / size
        ratios.append(ratio)
        assert ratio <= 1.1, ratio
        verifying = next(e for e in outcome.events if e["state"] == "verifying")
        assert verifying["detail"] == f"{size} bytes transferred"
    print(
        f"\ninterruptions survived: {interruptions}; bytes sent / artifact size: {max(ratios):.4f}"
    )


# -- a stuck step ---------------------------------------------------------------------------------


def test_a_stuck_step_times_out_and_the_queue_goes_on(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    store: CountingStore,
    versions: list[Path],
) -> None:
    agent = agents(extra="step_timeout_s = 2.0")
    online(watcher, agent)
    commands = []
    for artifact in versions[:2]:
        url, digest, size = store.publish(artifact)
        commands.append(deploy_command(*read_manifest(artifact), url, digest, size))
    store.faults = [Fault(after=0, stall_s=8.0)]  # the first download stalls
    mark = watcher.mark()
    for command in commands:
        watcher.send("dev1", "deploy", command)
    stuck = final_event(watcher, commands[0]["deploy_id"], mark, 30)
    assert stuck["state"] == "failed" and stuck["error"]["code"] == "timeout", stuck
    assert stuck["detail"].startswith("downloading: no progress for 2 s")
    assert final_event(watcher, commands[1]["deploy_id"], mark, 30)["state"] == "active"
    # Once the stalled transfer wakes up, its abandoned step ends without effect; the build
    # can be deployed again.
    time.sleep(8.0)
    retry = {**commands[0], "deploy_id": "retry", "request_id": "retry"}
    mark = watcher.mark()
    watcher.send("dev1", "deploy", retry)
    assert final_event(watcher, "retry", mark)["state"] == "active"
    assert "the abandoned step ended" in agent.log_text()
    assert_cache_consistent(agent.state_dir, agent.public_key)


# -- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs, mounted by the test (root only) where the agent ``dev1`` keeps its
    state."""
    mount = tmp_path / "dev1" / "state"
    mount.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A file that leaves about ``leave`` bytes free on ``disk`` (none when 0)."""
    filler = disk / "filler"
    todo = shutil.disk_usage(disk).free - leave
    block = b"\0" * (1 << 20)
    with open(filler, "ab", buffering=0) as out:
        try:
            while todo > 0:
                todo -= out.write(block[:todo])
        except OSError:  # the disk is full
            assert leave == 0
    return filler


def test_disk_full_fails_cleanly_and_eviction_makes_room(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    fleet: Fleet,
    store: CountingStore,
    versions: list[Path],
    keys: Keys,
    small_disk: Path,
) -> None:
    agent = agents()
    state_dir = small_disk
    online(watcher, agent)
    for artifact in versions[:3]:  # v3 active, v2 last-good, v1 evictable
        assert [o.state for o in deploy(fleet, store, artifact)] == ["active"]

    # The disk fills up while v4 downloads: a clean failure, nothing half written stays.
    store.pace_s = 0.3
    filler: list[Path] = []
    mark = watcher.mark()

    def v4_downloading(topic: str, payload: dict[str, Any]) -> bool:
        # v4's own event: the watcher may still be receiving v3's when v3's deploy returns
        return payload.get("state") == "downloading" and payload.get("version") == "4"

    filling = threading.Thread(
        target=lambda: (
            watcher.wait_for(v4_downloading, 30, mark),
            filler.append(fill(small_disk, 0)),
        )
    )
    filling.start()
    (full,) = deploy(fleet, store, versions[3])
    filling.join()
    assert full.state == "rolled-back", full
    assert full.events[-1]["error"]["code"] == "disk-full", full.events[-1]
    assert "the partial download was removed" in full.detail
    assert list((state_dir / "cache" / "sha256").glob(".*")) == []
    assert_cache_consistent(state_dir, keys[1])
    assert fleet.infer(
        "dev1", "tiny_cnn", golden(versions[2], versions[2].parent / "g", keys[1])[0], 30
    )["ok"]

    # Too little room even after evicting v1: refused before any download.
    filler[0].unlink()
    store.pace_s = 0.0
    requests = store.requests
    fill(small_disk, DISK_MARGIN)
    (refused,) = deploy(fleet, store, versions[3])
    assert refused.state == "rejected" and refused.events[-1]["error"]["code"] == "disk-space"
    assert store.requests == requests
    assert "after evicting what may be evicted" in refused.detail

    # Room once v1 is evicted: the deployment evicts it and goes through. The runtime keeps
    # every library it loaded mapped, so v1's space comes free only in a fresh agent, which
    # loads just the active v3.
    (disk_filler := small_disk / "filler").unlink()
    agent.stop()
    mark = watcher.mark()
    agent.start()
    online(watcher, agent, mark)
    manifest = read_manifest(versions[3])[0]
    unpacked = sum(f.size for f in Manifest.from_json(manifest).files) + 4 * len(manifest)
    fill(small_disk, versions[3].stat().st_size + unpacked + DISK_MARGIN - 64 * 1024)
    mark = watcher.mark()
    (ok,) = deploy(fleet, store, versions[3])
    assert ok.state == "active", (ok, agent.log_text()[-3000:])
    evicted = watcher.wait_for(lambda t, p: p.get("state") == "evicted", 10, mark)
    assert (
        evicted["reason"].startswith("disk full")
        and evicted["digest"] == store.publish(versions[0])[1]
    )
    disk_filler.unlink()
    assert assert_cache_consistent(state_dir, keys[1]) == 3


# -- damaged cache files ------------------------------------------------------------------------


def test_damaged_cache_entries_are_quarantined_and_downloaded_again(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    fleet: Fleet,
    store: CountingStore,
    versions: list[Path],
    keys: Keys,
    tmp_path: Path,
) -> None:
    agent = agents()
    online(watcher, agent)
    inputs, _ = golden(versions[0], tmp_path / "golden", keys[1])
    v1, v2 = (store.publish(v)[1] for v in versions[:2])
    for artifact in versions[:2]:
        assert [o.state for o in deploy(fleet, store, artifact)] == ["active"]
    entries = agent.state_dir / "cache" / "sha256"

    def damage(digest: str) -> None:
        library = entries / digest / "model.so"
        data = bytearray(library.read_bytes())
        data[len(data) // 2] ^= 0xFF
        library.write_bytes(bytes(data))

    # The active build and the index are damaged while the agent is down.
    agent.stop()
    damage(v2)
    (agent.state_dir / "cache" / "index.json").write_text('{"version": 1, "entries": {"x"')
    mark = watcher.mark()
    agent.start()
    quarantined = watcher.wait_for(lambda t, p: p.get("state") == "evicted", 30, mark)
    assert quarantined["digest"] == v2 and quarantined["reason"].startswith("damaged, moved to")
    repaired = watcher.wait_for(
        lambda t, p: (
            str(p.get("request_id")).startswith("repair-") and p.get("state") in FINAL_STATES
        ),
        60,
        mark,
    )
    assert repaired["state"] == "active" and repaired["digest"] == v2, repaired
    assert fleet.infer("dev1", "tiny_cnn", inputs, 30)["ok"]
    jail = agent.state_dir / "cache" / "quarantine"
    assert [p.name.split("-")[0] for p in jail.iterdir()] == [v2]

    # A cached older build found damaged when deployed again is downloaded again.
    damage(v1)
    requests = store.requests
    (again,) = deploy(fleet, store, versions[0])
    assert again.state == "active", again
    states = [e["state"] for e in again.events if "bytes" not in e]
    assert states[:3] == ["accepted", "loading", "downloading"] and states[-1] == "active"
    assert store.requests > requests
    assert sorted(p.name.split("-")[0] for p in jail.iterdir()) == sorted([v1, v2])
    assert assert_cache_consistent(agent.state_dir, keys[1]) == 2
    state = json.loads((agent.state_dir / "state.json").read_text())
    assert state["models"]["tiny_cnn"] == {
        "active": v1,
        "version": "1",
        "last_good": v2,
        "variants": [],
    }
