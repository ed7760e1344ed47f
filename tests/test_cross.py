"""Cross-compiled ARM artifacts: the right ELF, and the aarch64 one runs under qemu-user."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.artifact import load_public_key, open_artifact
from tests.conftest import REPO

ELF_MACHINE = {"aarch64": 183, "armv7": 40}  # EM_AARCH64, EM_ARM
ELF_CLASS = {"aarch64": 2, "armv7": 1}  # ELFCLASS64, ELFCLASS32
WHEEL_CACHE = Path.home() / ".cache" / "mlinferbooster" / "aarch64-wheels"
FFI_INCLUDE = Path(importlib.util.find_spec("tvm_ffi").origin).parent / "include"  # type: ignore[union-attr]


def elf_header(path: Path) -> tuple[int, int, int]:
    """(class, data encoding, machine) from an ELF header."""
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF object"
    return head[4], head[5], int.from_bytes(head[18:20], "little")


@pytest.mark.parametrize(
    ("target", "board"), [("aarch64", None), ("armv7", "pynq-z1"), ("aarch64", "ultra96")]
)
def test_cross_artifacts_are_elf_of_the_right_architecture(
    target: str,
    board: str | None,
    build: Callable[..., Path],
    keys: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    verified = open_artifact(build("tiny_cnn", target, board), [load_public_key(keys[1])], tmp_path)
    m = verified.manifest
    assert elf_header(verified.path(m.library)) == (ELF_CLASS[target], 1, ELF_MACHINE[target])
    assert m.target.name == target
    if target == "armv7":
        assert m.target.tvm_target["mfloat-abi"] == "hard"
        assert m.target.tvm_target["mcpu"] == "cortex-a9"
        assert "neon" in m.target.cpu_features
    if board == "ultra96":
        assert m.target.tvm_target["mcpu"] == "cortex-a53"
        assert m.builder["board"] == "ultra96"


@pytest.mark.parametrize(("board", "cpu"), [("pynq-z1", "armv7"), ("zcu104", "aarch64")])
def test_vta_builds_take_the_boards_host_cpu(
    board: str, cpu: str, build: Callable[..., Path], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """--target vta --board B: VTA layers plus a library for B's CPU (golden data from this
    host's build of the same module on the simulator)."""
    verified = open_artifact(build("tiny_cnn", "vta", board), [load_public_key(keys[1])], tmp_path)
    m = verified.manifest
    assert elf_header(verified.path(m.library)) == (ELF_CLASS[cpu], 1, ELF_MACHINE[cpu])
    assert (m.target.name, m.builder["board"]) == ("vta", board)
    assert m.target.accelerator == "vta:1x16_i8w8a32_15_15_18_17"
    assert m.quantization is not None and m.quantization["vta"]["layers"] == 2


@pytest.fixture(scope="session")
def aarch64_runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libtvm_ffi and libtvm_runtime for aarch64 from the registry's wheels of our versions."""
    versions = {dist: importlib.metadata.version(dist) for dist in ("apache-tvm", "apache-tvm-ffi")}
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    wanted = [f"{dist}=={version}" for dist, version in versions.items()]
    if len(list(WHEEL_CACHE.glob("*.whl"))) < 2:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "--platform",
                "manylinux_2_28_aarch64",
                "--python-version",
                f"{sys.version_info.major}.{sys.version_info.minor}",
                "-d",
                str(WHEEL_CACHE),
                *wanted,
            ],
            check=True,
        )
    libs = tmp_path_factory.mktemp("aarch64-libs")
    for wheel in WHEEL_CACHE.glob("*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.endswith(("/libtvm_runtime.so", "/libtvm_ffi.so")):
                    (libs / Path(name).name).write_bytes(zf.read(name))
    assert sorted(p.name for p in libs.iterdir()) == ["libtvm_ffi.so", "libtvm_runtime.so"]
    runner = libs / "vm_runner"
    subprocess.run(
        [
            "aarch64-linux-gnu-g++",
            "-std=c++17",
            "-O1",
            f"-I{FFI_INCLUDE}",
            "-o",
            str(runner),
            str(REPO / "tests/support/vm_runner.cc"),
            f"-L{libs}",
            "-Wl,--no-as-needed",
            "-ltvm_ffi",
            "-ltvm_runtime",
        ],
        check=True,
    )
    return libs


def test_aarch64_artifact_runs_under_qemu_and_matches_x86(
    build: Callable[..., Path], keys: tuple[Path, Path], aarch64_runtime: Path, tmp_path: Path
) -> None:
    assert shutil.which("qemu-aarch64"), "qemu-user is required: apt-get install qemu-user"
    trusted = [load_public_key(keys[1])]
    arm = open_artifact(build("tiny_cnn", "aarch64"), trusted, tmp_path / "arm")
    x86 = open_artifact(build("tiny_cnn"), trusted, tmp_path / "x86")
    from agent.runtime import TvmRuntime

    x86_model = TvmRuntime().load(x86.path("model.so"), x86.manifest.inputs, x86.manifest.outputs)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    x.tofile(tmp_path / "in.bin")
    subprocess.run(
        [
            "qemu-aarch64",
            "-L",
            "/usr/aarch64-linux-gnu",
            "-E",
            f"LD_LIBRARY_PATH={aarch64_runtime}",
            str(aarch64_runtime / "vm_runner"),
            str(arm.path("model.so")),
            str(tmp_path / "in.bin"),
            "1,3,32,32",
            str(tmp_path / "out.bin"),
        ],
        check=True,
        timeout=120,
    )
    got = np.fromfile(tmp_path / "out.bin", np.float32)
    expected = x86_model.run({"input": x})[0].reshape(-1)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
