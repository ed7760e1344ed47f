"""The commands as a user runs them: ``boost-build serve`` with its own broker, ``boost-agent
start``, then ``boost-build devices``, ``deploy`` and ``infer`` from the shell; ``probe`` and
``status``; fatal configuration errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from models import zoo
from models.broker import free_port
from tests.conftest import REPO, run_cli

Keys = tuple[Path, Path]


def _spawn(args: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOST_")}
    env["PYTHONPATH"] = str(REPO)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args], cwd=cwd, env=env, stdout=out, stderr=out
        )


@pytest.fixture
def lab(tmp_path: Path, keys: Keys) -> Iterator[Path]:
    """A lab directory whose deploy.toml leaves [build.mqtt] url empty: serve runs the broker."""
    http, mqtt = free_port(), free_port()
    (tmp_path / "deploy.toml").write_text(
        f'[agent]\ndevice_id = "bench-1"\ngroups = ["lab"]\ntrusted_keys = ["{keys[1]}"]\n'
        f'allowed_hosts = ["http://127.0.0.1:{http}"]\n'
        f'[agent.mqtt]\nurl = "mqtt://127.0.0.1:{mqtt}"\n'
        f'[build]\nsigning_key = "{keys[0]}"\n'
        f"[build.serve]\nport = {http}\nbroker_port = {mqtt}\n"
    )
    processes = [_spawn(["models.cli", "serve"], tmp_path, tmp_path / "serve.log")]
    yield tmp_path
    for process in processes:
        process.send_signal(signal.SIGINT)
        process.wait(30)


def test_serve_agent_deploy_devices_infer_from_the_shell(
    lab: Path, build: Callable[..., Path]
) -> None:
    time.sleep(1.0)
    agent = _spawn(["agent.cli", "start"], lab, lab / "agent.log")
    try:
        devices = run_cli("models.cli", "devices", "--json", "--wait", "15", cwd=lab)
        assert devices.returncode == 0, devices.stderr + (lab / "agent.log").read_text()
        doc = json.loads(devices.stdout)["bench-1"]
        assert doc["online"] is True and doc["caps"]["groups"] == ["lab"]

        deployed = run_cli(
            "models.cli", "deploy", str(build("digits_cnn")), "--to", "group:lab", cwd=lab
        )
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert "bench-1: smoke-testing" in deployed.stdout
        assert "bench-1              active        golden test passed" in deployed.stdout

        table = run_cli("models.cli", "devices", cwd=lab)
        assert "bench-1              yes     x86_64   vta-sim" in table.stdout
        assert "digits_cnn@1" in table.stdout

        model = zoo.get("digits_cnn")
        assert model.test_set is not None
        images, labels = model.test_set
        np.save(lab / "x.npy", images[:1])
        out = lab / "out.npz"
        inferred = run_cli(
            "models.cli",
            "infer",
            "bench-1",
            "digits_cnn",
            "--input",
            "x.npy",
            "-o",
            "out.npz",
            cwd=lab,
        )
        assert inferred.returncode == 0, inferred.stderr
        assert f"argmax {int(labels[0])}" in inferred.stdout
        with np.load(out) as data:
            (logits,) = data.values()
        assert int(np.argmax(logits)) == int(labels[0])

        missing = run_cli("models.cli", "infer", "bench-1", "nope", "--input", "x.npy", cwd=lab)
        assert missing.returncode == 1
        assert "bench-1 has no active model 'nope' loaded" in missing.stderr

        failed = run_cli(
            "models.cli",
            "deploy",
            str(build("tiny_cnn", "aarch64")),
            "--to",
            "caps:arch=x86_64",
            cwd=lab,
        )
        assert failed.returncode == 1
        assert "bench-1              incompatible  built for aarch64-linux-gnu" in failed.stdout
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0

    status = run_cli("agent.cli", "status", cwd=lab)
    assert status.returncode == 0, status.stderr
    assert "digits_cnn" in status.stdout and "cache: 1 entries" in status.stdout


def test_probe_prints_the_capability_document(tmp_path: Path) -> None:
    result = run_cli("agent.cli", "probe", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    caps = json.loads(result.stdout)
    assert caps["cpu"]["triple"] == "x86_64-linux-gnu"
    assert {"kind": "vta-sim", "design": "1x16_i8w8a32_15_15_18_17", "board": "sim"} in caps[
        "accelerators"
    ]


def test_start_fails_fast_on_a_bad_config(tmp_path: Path) -> None:
    (tmp_path / "deploy.toml").write_text('[agent]\ndevice_id = "a/b"\n')
    result = run_cli("agent.cli", "start", cwd=tmp_path)
    assert result.returncode == 1
    assert "device id 'a/b' must be 1-128 characters" in result.stderr
    (tmp_path / "deploy.toml").write_text('[agent.mqtt]\nurl = "http://x"\n')
    result = run_cli("agent.cli", "start", cwd=tmp_path)
    assert result.returncode == 1
    assert "[agent.mqtt] url: expected mqtt://host:port or mqtts://host:port" in result.stderr
    (tmp_path / "deploy.toml").write_text("[agent]\n")
    result = run_cli("agent.cli", "start", cwd=tmp_path)
    assert result.returncode == 1
    assert "build.pub: public key not found; copy the build host's .pub file" in result.stderr
