"""Agent figure (``tests/bench_suite.py --only agent``): deploy command → active (cold, a 16 MB
artifact) and re-activation from the cache, start → birth, idle RSS, and an inference's round trip
over MQTT against a direct call of the same build. Real Mosquitto, a real agent process, the store
over HTTP."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.artifact import generate_keypair, load_public_key, open_artifact, read_manifest
from agent.config import BuildConfig, MqttConfig
from agent.engines import median_ms
from agent.protocol import deploy_command
from agent.runtime import TvmRuntime
from models import zoo
from models.broker import LocalBroker, free_port
from models.compiler import CompileRequest, compile_model
from models.fleet import Fleet
from models.progress import Progress
from tests.support.figures import Figure, default_tuning
from tests.support.fleet import AgentProcess, CountingStore, Watcher

MODEL = "mobilenetv2"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def timed_deploy(watcher: Watcher, store: CountingStore, artifact: Path) -> tuple[float, str]:
    url, digest, size = store.publish(artifact)
    manifest, signature = read_manifest(artifact)
    command = deploy_command(manifest, signature, url, digest, size)
    mark = watcher.mark()
    start = time.perf_counter()
    watcher.send("bench", "deploy", command)
    final = watcher.answer(command["request_id"], mark, timeout_s=300)
    seconds = time.perf_counter() - start
    assert final["state"] == "active", final
    path = " > ".join(e["state"] for e in watcher.events(command["request_id"]) if "bytes" not in e)
    return seconds, path


def measure(model_name: str, repeats: int, quick: bool) -> dict[str, Any]:
    """Medians over ``repeats`` agent processes of every agent figure."""
    tuning_db, minutes = default_tuning(quick)
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp_name:
        tmp = Path(tmp_name)
        key = tmp / "build.key"
        public = generate_keypair(key)
        model_path = tmp / f"{model_name}.onnx"
        model = zoo.get(model_name)
        model.save(str(model_path))
        artifacts = []
        for version in ("1", "2"):
            request = CompileRequest(
                model=model_path,
                target="x86_64",
                version=version,
                output=tmp / f"v{version}.boost",
                tune_minutes=minutes,
            )
            artifacts.append(
                compile_model(request, tuning_db, key, "bench", Progress(False)).artifact
            )
        verified = open_artifact(artifacts[0], [load_public_key(public)], tmp / "direct")
        manifest = verified.manifest
        direct = TvmRuntime().load(
            verified.path(manifest.library), manifest.inputs, manifest.outputs
        )
        feeds = {spec.name: model.sample_inputs[spec.name][:1] for spec in manifest.inputs}
        figures: dict[str, list[float]] = {
            k: [] for k in ("birth_s", "idle_mb", "loaded_mb", "cold_s", "warm_s", "mqtt_ms")
        }
        paths: dict[str, str] = {}
        with LocalBroker(free_port(), tmp / "broker") as broker:
            store = CountingStore(tmp / "store")
            store.start_background()
            watcher = Watcher(broker.url)
            fleet = Fleet(BuildConfig(mqtt=MqttConfig(url=broker.url)))
            for run in range(repeats):
                agent = AgentProcess(tmp / f"agent{run}", "bench", broker.url, store.url, public)
                mark = watcher.mark()
                start = time.perf_counter()
                agent.start()
                watcher.state("bench", True, mark)
                figures["birth_s"].append(time.perf_counter() - start)
                assert agent.process is not None
                time.sleep(1.0)
                figures["idle_mb"].append(rss_mb(agent.process.pid))
                seconds, paths["cold"] = timed_deploy(watcher, store, artifacts[0])
                figures["cold_s"].append(seconds)
                time.sleep(1.0)
                figures["loaded_mb"].append(rss_mb(agent.process.pid))
                fleet.infer("bench", model_name, feeds, 60)  # warm-up
                figures["mqtt_ms"].append(
                    median_ms(lambda: fleet.infer("bench", model_name, feeds, 60), runs=10)
                )
                timed_deploy(watcher, store, artifacts[1])
                seconds, paths["re-activation"] = timed_deploy(watcher, store, artifacts[0])
                figures["warm_s"].append(seconds)
                agent.stop()
            fleet.close()
            watcher.close()
            store.shutdown()
            store.server_close()
        local_ms = median_ms(lambda: direct.run(feeds))
        artifact_mb = artifacts[0].stat().st_size / 1e6
    out: dict[str, Any] = {k: statistics.median(v) for k, v in figures.items()}
    out.update(
        model=model_name,
        artifact_mb=artifact_mb,
        local_ms=local_ms,
        paths=paths,
    )
    return out


def figures(quick: bool) -> list[Figure]:
    model_name, repeats = ("tiny_cnn", 1) if quick else (MODEL, 3)
    m = measure(model_name, repeats, quick)
    fig = Figure(
        "agent",
        f"Agent: deployment, start, memory and inference ({m['model']}, "
        f"{m['artifact_mb']:.1f} MB artifact)",
        ["figure", "value", "unit", "compared with", "ratio"],
    )
    cold, warm, idle, loaded = m["cold_s"], m["warm_s"], m["idle_mb"], m["loaded_mb"]
    fig.rows = [
        ["deploy command -> active, cold", cold, "s", "", ""],
        ["re-activation from the cache", warm, "s", "cold deploy", warm / cold],
        ["start -> birth", m["birth_s"], "s", "", ""],
        ["idle RSS, before any model (runtime not loaded)", idle, "MB", "", ""],
        ["idle RSS, runtime and model loaded", loaded, "MB", "before any model", loaded / idle],
        ["inference round trip over MQTT", m["mqtt_ms"], "ms", "direct call",
         m["mqtt_ms"] / m["local_ms"]],
        ["inference, direct call of the build", m["local_ms"], "ms", "", ""],
    ]  # fmt: skip
    fig.notes += [
        f"medians of {repeats} agent processes; real Mosquitto, the store over HTTP",
        f"cold: {m['paths']['cold']}; re-activation: {m['paths']['re-activation']}",
    ]

    def plot(ax: Any) -> None:
        labels = ["cold deploy (s)", "re-activation (s)", "start -> birth (s)"]
        ax.bar(labels, [m["cold_s"], m["warm_s"], m["birth_s"]])
        ax.set_ylabel("seconds")

    fig.plot = plot
    return [fig]
