"""Shared fixtures: a signing key pair, a config pointing into a temporary directory, and
session-wide compiled artifacts (real TVM compiles, reused by every test that needs one)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.artifact import generate_keypair
from agent.config import BuildConfig, MqttConfig
from models import zoo
from models.broker import LocalBroker, free_port
from models.compiler import CompileRequest, compile_model
from models.fleet import Fleet
from models.progress import Progress
from tests.support.firmware import build_host
from tests.support.fleet import AgentProcess, CountingStore, Watcher, WorkerProcess
from vta.config import VtaConfig

REPO = Path(__file__).resolve().parent.parent
Keys = tuple[Path, Path]


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(private key, public key) of a fresh build host identity."""
    private = tmp_path_factory.mktemp("keys") / "build.key"
    return private, generate_keypair(private)


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def zoo_model(zoo_dir: Path) -> Callable[[str], Path]:
    """Export a zoo model to ONNX (and its inputs to the .npz beside it) once per session;
    returns the ONNX path."""

    def export(name: str) -> Path:
        path = zoo_dir / f"{name}.onnx"
        if not path.exists():
            model = zoo.get(name)
            model.save(str(path))
            model.save_inputs(str(path.with_suffix(".npz")))
        return path

    return export


@pytest.fixture(scope="session")
def build(
    tmp_path_factory: pytest.TempPathFactory,
    keys: tuple[Path, Path],
    zoo_model: Callable[[str], Path],
) -> Callable[..., Path]:
    """Compile a zoo model for a target once per session; returns the artifact path.

    ``as_name`` and ``version`` give the build another model name or version (another artifact)."""
    out_dir = tmp_path_factory.mktemp("artifacts")
    tuning = tmp_path_factory.mktemp("tuning")
    cache: dict[tuple[str, str, str | None, str | None, str], Path] = {}

    def compile_once(
        name: str,
        target: str = "x86_64",
        board: str | None = None,
        as_name: str | None = None,
        version: str = "1",
    ) -> Path:
        key = (name, target, board, as_name, version)
        if key not in cache:
            label = f"{as_name or name}-{version}-{target}-{board or 'default'}"
            source = zoo_model(name)
            request = CompileRequest(
                model=source,
                target=target,
                board=board,
                output=out_dir / f"{label}.boost",
                name=as_name,
                version=version,
                calibration=source.with_suffix(".npz") if target == "vta" else None,
            )
            cache[key] = compile_model(
                request, tuning, keys[0], "test-builder", Progress(False)
            ).artifact
        return cache[key]

    return compile_once


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <module> ...`` in a fresh process, as a user would run the command."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BOOST_")}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


# -- the deploy loop's moving parts, fresh for each test ----------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    with LocalBroker(free_port(), tmp_path / "broker") as running:
        yield running


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CountingStore]:
    server = CountingStore(tmp_path / "store")
    server.start_background()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def watcher(broker: LocalBroker) -> Iterator[Watcher]:
    w = Watcher(broker.url)
    yield w
    w.close()


@pytest.fixture
def agents(
    tmp_path: Path, broker: LocalBroker, store: CountingStore, keys: Keys
) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(
        device: str = "dev1",
        extra: str = "",
        protocol: str = "5",
        env: dict[str, str] | None = None,
    ) -> AgentProcess:
        agent = AgentProcess(
            tmp_path / device, device, broker.url, store.url, keys[1], extra, protocol, env or {}
        )
        started.append(agent.start())
        return agent

    yield start
    for agent in started:
        if agent.process is not None:
            agent.process.kill()
            agent.process.wait()


@pytest.fixture
def fleet(broker: LocalBroker) -> Iterator[Fleet]:
    with Fleet(BuildConfig(mqtt=MqttConfig(url=broker.url))) as f:
        yield f


@pytest.fixture(scope="session")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Callable[[VtaConfig], Path]:
    """The firmware's host build for a VTA design, built once per design and session."""
    built: dict[str, Path] = {}

    def host_build(cfg: VtaConfig) -> Path:
        if cfg.bitstream_id not in built:
            out = tmp_path_factory.mktemp(f"firmware-{cfg.bitstream_id}")
            built[cfg.bitstream_id] = build_host(cfg, out)
        return built[cfg.bitstream_id]

    return host_build


@pytest.fixture
def workers(
    tmp_path: Path, broker: LocalBroker, store: CountingStore, keys: Keys
) -> Iterator[Callable[[str], WorkerProcess]]:
    """``boost-build worker`` processes sharing the test store's directory."""
    started: list[WorkerProcess] = []

    def start(name: str) -> WorkerProcess:
        root = tmp_path / name
        root.mkdir()
        (root / "deploy.toml").write_text(
            f'[build]\nstore_dir = "{store.store.root}"\nsigning_key = "{keys[0]}"\n'
            f'tuning_db = "{tmp_path / "tuning"}"\ntune_minutes = 0\n'
            f'[build.serve]\npublic_url = "{store.url}"\n[build.mqtt]\nurl = "{broker.url}"\n'
        )
        with open(root / "worker.log", "wb") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "models.cli",
                    "--config",
                    str(root / "deploy.toml"),
                    "worker",
                    "--id",
                    name,
                ],
                stdout=log,
                stderr=log,
                cwd=REPO,
            )
        worker = WorkerProcess(root, process)
        started.append(worker)
        deadline = time.monotonic() + 60
        while "taking build requests" not in worker.log:
            assert process.poll() is None and time.monotonic() < deadline, worker.log
            time.sleep(0.1)
        return worker

    yield start
    for worker in started:
        worker.process.kill()
        worker.process.wait()
