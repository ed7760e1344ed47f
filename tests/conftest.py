"""Shared fixtures: a signing key pair, a config pointing into a temporary directory, and
session-wide compiled artifacts (real TVM compiles, reused by every test that needs one)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.artifact import generate_keypair
from models import zoo
from models.compiler import CompileRequest, compile_model
from models.progress import Progress

REPO = Path(__file__).resolve().parent.parent


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
    """Export a zoo model to ONNX once per session; returns its path."""

    def export(name: str) -> Path:
        path = zoo_dir / f"{name}.onnx"
        if not path.exists():
            zoo.get(name).save(str(path))
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
            request = CompileRequest(
                model=zoo_model(name),
                target=target,
                board=board,
                output=out_dir / f"{label}.boost",
                name=as_name,
                version=version,
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
