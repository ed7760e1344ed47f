"""Agent figures: start → birth, idle RSS, deploy command → active (cold, ~10 MB artifact) and
re-activation from the cache. Real Mosquitto, a real agent process, the store over HTTP.

    .venv/bin/python -m tests.bench_agent [--repeats N]

Prints medians over the repeats; nothing here is asserted (figures, not tests).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from agent.artifact import generate_keypair, read_manifest
from agent.protocol import deploy_command
from models import zoo
from models.broker import LocalBroker, free_port
from models.compiler import CompileRequest, compile_model
from models.progress import Progress
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp_name:
        tmp = Path(tmp_name)
        key = tmp / "build.key"
        public = generate_keypair(key)
        model_path = tmp / f"{MODEL}.onnx"
        zoo.get(MODEL).save(str(model_path))
        artifacts = []
        for version in ("1", "2"):
            request = CompileRequest(
                model=model_path, target="x86_64", version=version, output=tmp / f"v{version}.boost"
            )
            artifacts.append(
                compile_model(request, tmp / "tuning", key, "bench", Progress(False)).artifact
            )
        size_mb = artifacts[0].stat().st_size / 1e6
        births, idle, loaded, cold, warm = [], [], [], [], []
        paths: dict[str, str] = {}
        with LocalBroker(free_port(), tmp / "broker") as broker:
            store = CountingStore(tmp / "store")
            store.start_background()
            watcher = Watcher(broker.url)
            for run in range(args.repeats):
                agent = AgentProcess(tmp / f"agent{run}", "bench", broker.url, store.url, public)
                mark = watcher.mark()
                start = time.perf_counter()
                agent.start()
                watcher.state("bench", True, mark)
                births.append(time.perf_counter() - start)
                assert agent.process is not None
                time.sleep(1.0)
                idle.append(rss_mb(agent.process.pid))
                seconds, paths["cold"] = timed_deploy(watcher, store, artifacts[0])
                cold.append(seconds)
                time.sleep(1.0)
                loaded.append(rss_mb(agent.process.pid))
                timed_deploy(watcher, store, artifacts[1])
                seconds, paths["re-activation"] = timed_deploy(watcher, store, artifacts[0])
                warm.append(seconds)
                agent.stop()
            watcher.close()
            store.shutdown()
            store.server_close()

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):8.3f}"

    ratio = statistics.median(cold) / statistics.median(warm)
    print(f"agent figures, median of {args.repeats} runs ({MODEL} artifact, {size_mb:.1f} MB)")
    print(f"  start -> birth (retained online state seen)  {med(births)} s")
    print(f"  idle RSS, no model loaded                     {med(idle)} MB")
    print(f"  RSS with the model active                     {med(loaded)} MB")
    print(f"  deploy command -> active, cold                {med(cold)} s  ({paths['cold']})")
    print(f"  re-activation of the last-good build          {med(warm)} s  ", end="")
    print(f"({paths['re-activation']})")
    print(f"  cold / re-activation                          {ratio:8.1f}x")


if __name__ == "__main__":
    main()
