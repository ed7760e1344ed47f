"""``--target vta`` end to end: real builds (quantize, partition, lower, compile), deployed over
a real Mosquitto to agents whose VTA layers run on the simulator.

The device must reproduce the build host's own simulated result bit for bit (the artifact's
golden data is that result), and the measured agreement with the float model is recorded in the
manifest and checked here against bounds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.artifact import Manifest, read_manifest
from agent.cache import Source
from models.fleet import Fleet, decode_outputs
from tests.conftest import Keys, run_cli
from tests.support.firmware import FirmwareProcess
from tests.support.fleet import AgentProcess, CountingStore, Watcher, deploy, golden, online
from vta.config import VtaConfig

VTA = "vta:1x16_i8w8a32_15_15_18_17"


def manifest_of(artifact: Path) -> Manifest:
    return Manifest.from_json(read_manifest(artifact)[0])


def deploy_and_compare(
    name: str,
    artifact: Path,
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    fleet: Fleet,
    store: CountingStore,
    keys: Keys,
    tmp_path: Path,
    agent: AgentProcess | None = None,
) -> None:
    if agent is None:
        agent = agents()
        online(watcher, agent)
    (outcome,) = deploy(fleet, store, artifact)
    assert outcome.state == "active", (outcome, agent.log_text())
    inputs, expected = golden(artifact, tmp_path / "golden", keys[1])
    reply = fleet.infer("dev1", name, inputs, 120)
    assert reply["ok"], reply
    (got,) = decode_outputs(reply).values()
    assert got.dtype == expected[0].dtype and np.array_equal(got, expected[0]), (
        f"the device's result differs from the build host's simulated result by up to "
        f"{np.abs(got - expected[0]).max()}"
    )


def test_tiny_cnn_on_a_simulated_vta_device(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    fleet: Fleet,
    store: CountingStore,
    build: Callable[..., Path],
    keys: Keys,
    tmp_path: Path,
) -> None:
    artifact = build("tiny_cnn", "vta")
    manifest = manifest_of(artifact)
    assert manifest.target.accelerator == VTA and manifest.target.name == "vta"
    assert {"vta.json", "vta.bin"} <= {f.path for f in manifest.files}
    quant = manifest.quantization
    assert quant is not None and quant["vta"]["layers"] == 2  # the RGB stem stays on the CPU
    agreement = quant["accuracy"]["calibration_set"]
    assert agreement["top1_agreement"] >= 0.75
    assert agreement["max_abs_error"] <= 0.1 * agreement["output_max_abs"]
    deploy_and_compare("tiny_cnn", artifact, agents, watcher, fleet, store, keys, tmp_path)


def test_vta_build_is_refused_before_download_without_the_accelerator(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    fleet: Fleet,
    store: CountingStore,
    build: Callable[..., Path],
) -> None:
    agent = agents(extra='backends = ["cpu"]')
    online(watcher, agent)
    caps = watcher.wait_for(lambda topic, payload: topic.endswith("dev1/caps"))
    assert caps["accelerators"] == []
    artifact = build("tiny_cnn", "vta")
    # The fleet itself sends nothing to an incompatible device...
    assert deploy(fleet, store, artifact)[0].state == "incompatible"
    # ...and the agent refuses the command on its own before any download.
    requests = store.requests
    from agent.protocol import deploy_command

    url, digest, size = store.publish(artifact)
    manifest, signature = read_manifest(artifact)
    command = deploy_command(manifest, signature, url, digest, size)
    mark = watcher.mark()
    watcher.send("dev1", "deploy", command)
    answer = watcher.answer(command["request_id"], mark)
    assert answer["state"] == "rejected" and VTA in answer["detail"], answer
    assert store.requests == requests


def test_device_memory_follows_the_ram_tier(
    build: Callable[..., Path], keys: Keys, tmp_path: Path
) -> None:
    """A model's VTA layers leave the device when its module leaves memory: unloaded, or
    evicted from the RAM tier by another model."""
    from agent.artifact import open_artifact, sha256_file
    from agent.config import AgentConfig, CacheConfig
    from agent.registry import Registry
    from vta.bundle import Bundle
    from vta.drivers.sim import SimDriver
    from vta.engine import VtaEngine, register

    engine = VtaEngine(SimDriver(VtaConfig(), hls=True))
    register(engine)
    config = AgentConfig(
        state_dir=tmp_path / "state",
        trusted_keys=(keys[1],),
        cache=CacheConfig(ram_max_bytes=1),  # room for one module at a time
    )
    registry = Registry(config, lambda eviction: None, engine)
    registry.open()
    builds = {}
    for version in ("1", "2"):
        artifact = build("tiny_cnn", "vta", version=version)
        digest = sha256_file(artifact)
        staged = registry.disk.staging(digest)
        open_artifact(artifact, registry.trusted, staged)
        manifest, signature = read_manifest(artifact)
        source = Source("http://store/a", artifact.stat().st_size, "", "")
        registry.disk.install(digest, staged, manifest, signature, source)
        builds[digest] = Bundle.load(registry.disk.path(digest)).build_id
    first, second = builds
    registry.load(first)
    assert builds[first] in engine
    registry.load(second)  # evicts the first from the RAM tier
    assert builds[first] not in engine and builds[second] in engine
    registry.unload(second)
    assert builds[second] not in engine
    engine.close()


def test_real_weights_lose_at_most_one_point(build: Callable[..., Path]) -> None:
    """digits_cnn, trained here on scikit-learn's digits: test-set accuracy float vs VTA-int8."""
    test = manifest_of(build("digits_cnn", "vta")).quantization["accuracy"]["test_set"]  # type: ignore[index]
    assert test["samples"] >= 400
    assert test["float_accuracy"] >= 0.95
    assert test["quantized_accuracy"] >= test["float_accuracy"] - 0.01, test


def test_disassembler_reads_the_artifact(build: Callable[..., Path], tmp_path: Path) -> None:
    artifact = build("tiny_cnn", "vta")
    result = run_cli("vta", "disasm", str(artifact), "--layer", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# layer 0: conv2d 16->32")
    assert any(" GEMM " in line for line in lines) and lines[-1].split(": ")[1] == "FINISH"
    whole = run_cli("vta", "disasm", str(artifact), cwd=tmp_path)
    assert whole.stdout.count("# layer ") == 2


def test_resnet18_on_a_simulated_vta_device(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    fleet: Fleet,
    store: CountingStore,
    build: Callable[..., Path],
    keys: Keys,
    tmp_path: Path,
) -> None:
    artifact = build("resnet18", "vta")
    quant = manifest_of(artifact).quantization
    assert quant is not None
    # Every convolution after the stem, residual adds included, and the classifier.
    assert quant["vta"]["layers"] == 20
    agreement = quant["accuracy"]["calibration_set"]
    assert agreement["max_abs_error"] <= 0.1 * agreement["output_max_abs"], agreement
    deploy_and_compare("resnet18", artifact, agents, watcher, fleet, store, keys, tmp_path)


@pytest.mark.parametrize("name", ["tiny_cnn", "resnet18"])
def test_a_model_on_the_serial_coprocessor(
    name: str,
    firmware: Callable[[VtaConfig], Path],
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    fleet: Fleet,
    store: CountingStore,
    build: Callable[..., Path],
    keys: Keys,
    tmp_path: Path,
) -> None:
    """The agent finds the firmware's host build on a pseudo-terminal (a configured serial
    port), advertises it, and its VTA layers run there, bit for bit as the simulator ran them."""
    with FirmwareProcess(firmware(VtaConfig())) as device:
        extra = f'backends = ["vta-serial", "vta-sim", "cpu"]\nserial_ports = ["{device.port}"]'
        mark = watcher.mark()
        agent = agents(extra=extra)
        online(watcher, agent)
        caps = watcher.wait_for(lambda topic, payload: topic.endswith("dev1/caps"), after=mark)
        assert caps["accelerators"] == [
            {"kind": "vta-serial", "design": VTA.split(":")[1], "board": "serial",
             "port": device.port, "dram_bytes": 64 << 20}
        ]  # fmt: skip
        artifact = build(name, "vta")
        deploy_and_compare(name, artifact, agents, watcher, fleet, store, keys, tmp_path, agent)
        assert "VTA layers run on vta-serial" in agent.log_text()
