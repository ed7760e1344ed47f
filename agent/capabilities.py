"""What this device can run: the capability document, and the check of a manifest against it.

Probing never raises and never assumes: a probe that cannot read what it needs reports nothing
(an empty list, ``None``) and logs why at debug level. The capability document is the union of the
probes; the same ``incompatibilities`` function decides on the device (before any byte is
downloaded) and on the build host (before a deploy command is sent).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import platform
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from agent.artifact import Manifest
from agent.config import AgentConfig

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"

# The ISA features that decide whether code built for one CPU runs on another, in LLVM's names.
# The build host records the subset its target enables; the device reports the subset it has.
ISA_FEATURES = frozenset(
    {
        "sse4.2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512dq",
        "avx512vl",
        "avx512vnni",
        "avx512bf16",
        "avx512fp16",
        "avxvnni",
        "amx-int8",
        "amx-bf16",
        "neon",
        "vfp3",
        "vfp4",
        "dotprod",
        "i8mm",
        "sve",
        "sve2",
        "fullfp16",
        "bf16",
    }
)

# /proc/cpuinfo flag -> LLVM feature name, for the flags whose names differ or matter.
_CPUINFO_FLAGS = {
    "sse4_2": "sse4.2",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512dq": "avx512dq",
    "avx512vl": "avx512vl",
    "avx512_vnni": "avx512vnni",
    "avx512_bf16": "avx512bf16",
    "avx512_fp16": "avx512fp16",
    "avx_vnni": "avxvnni",
    "amx_int8": "amx-int8",
    "amx_bf16": "amx-bf16",
    # ARM: "asimd" is NEON on aarch64, "neon" on armv7.
    "asimd": "neon",
    "neon": "neon",
    "vfpv3": "vfp3",
    "vfpv4": "vfp4",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "sve": "sve",
    "sve2": "sve2",
    "asimdhp": "fullfp16",
    "bf16": "bf16",
}

# Kernel machine name -> the target triple the build host uses for it.
TRIPLES = {
    "x86_64": "x86_64-linux-gnu",
    "aarch64": "aarch64-linux-gnu",
    "armv7l": "armv7a-linux-gnueabihf",
}

T = TypeVar("T")


def _safely(what: str, probe: Callable[[], T], empty: T) -> T:
    """Run one probe; a failure is logged and reported as ``empty``, never raised."""
    try:
        return probe()
    except (OSError, ValueError, KeyError, ImportError) as err:
        log.debug("probe %s: %s", what, err)
        return empty


def cpu_features(cpuinfo: str) -> list[str]:
    """The ISA features named by ``/proc/cpuinfo`` text, in LLVM's names."""
    found: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            found.update(_CPUINFO_FLAGS[f] for f in value.split() if f in _CPUINFO_FLAGS)
    return sorted(found)


def _memory_bytes() -> int | None:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def _tvm_runtime() -> dict[str, str]:
    version = importlib.metadata.version("apache-tvm")
    return {"version": version, "abi": runtime_abi(version)}


def runtime_abi(version: str) -> str:
    """The part of a TVM version that must match for a module to load: major.minor."""
    parts = version.split(".")
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        raise ValueError(f"not a TVM version: {version!r}")
    return f"{parts[0]}.{parts[1]}"


def _gpus() -> list[dict[str, Any]]:
    gpus = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        fields = dict(
            (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in info.open())
        )
        gpus.append({"kind": "cuda", "model": fields.get("Model", "?"), "bus": info.parent.name})
    return gpus


def _vta_sim(config: AgentConfig) -> list[dict[str, Any]]:
    from vta.config import VtaConfig

    return [{"kind": "vta-sim", "design": VtaConfig().bitstream_id, "board": "sim"}]


def _vta_fpga(config: AgentConfig) -> list[dict[str, Any]]:
    """FPGA managers, with the design the agent loaded in this boot (see ``agent.fpga``)."""
    from agent.fpga import Fpga
    from vta.drivers.pynq import BOARDS, probe_fpga

    found = probe_fpga(config.fpga_root)
    for accelerator in found:
        if accelerator["board"] in BOARDS:
            Fpga(config.state_dir, accelerator["board"], config.fpga_root).describe(accelerator)
    return found


def _vta_serial(config: AgentConfig) -> list[dict[str, Any]]:
    """Coprocessors on USB serial adapters or ``serial_ports`` that answer the firmware's
    handshake (the handshake reports the design)."""
    from vta.drivers.serial import discover

    return [c.capability() for c in discover(config.serial_ports, config.serial_baud)]


_ACCELERATOR_PROBES: dict[str, Callable[[AgentConfig], list[dict[str, Any]]]] = {
    "vta-fpga": _vta_fpga,
    "vta-serial": _vta_serial,
    "vta-sim": _vta_sim,
}


def probe_accelerators(config: AgentConfig) -> list[dict[str, Any]]:
    """The accelerators of ``config.backends`` that are present, in the order of the backends.

    Probing talks to hardware (a handshake on serial ports), so the daemon does it once at
    start-up, before any driver holds a device."""
    found: list[dict[str, Any]] = []
    for kind in config.backends:
        if kind in _ACCELERATOR_PROBES:
            found += _safely(kind, functools.partial(_ACCELERATOR_PROBES[kind], config), [])
    return found


def probe(
    device_id: str,
    groups: Iterable[str],
    backends: Iterable[str],
    state_dir: Path,
    accelerators: list[dict[str, Any]],
) -> dict[str, Any]:
    """The capability document of this device (DESIGN.md, "MQTT protocol v1"), with the
    accelerators ``probe_accelerators`` found."""
    machine = platform.machine()
    cpuinfo = _safely("cpuinfo", lambda: Path("/proc/cpuinfo").read_text(), "")
    disk_dir = state_dir if state_dir.exists() else Path(state_dir.anchor or "/")
    return {
        "device": device_id,
        "agent_version": AGENT_VERSION,
        "os": {"system": platform.system(), "release": platform.release()},
        "cpu": {
            "arch": machine,
            "triple": TRIPLES.get(machine),
            "features": cpu_features(cpuinfo),
            "cores": len(os.sched_getaffinity(0)),
        },
        "memory_bytes": _safely("memory", _memory_bytes, None),
        "disk_free_bytes": _safely("disk", lambda: shutil.disk_usage(disk_dir).free, None),
        "tvm_runtime": _safely("tvm runtime", _tvm_runtime, None),
        "gpus": _safely("gpus", _gpus, list[dict[str, Any]]()),
        "accelerators": list(accelerators),
        "backends": list(backends),
        "dtypes": ["float32", "float16", "int32", "int8", "uint8"],
        "groups": list(groups),
        "ts": time.time(),
    }


def default_device_id() -> str:
    return socket.gethostname()


def accelerator_ids(caps: dict[str, Any]) -> set[str]:
    """``vta:<design>`` (and plain kinds) for every accelerator in a capability document."""
    out = set()
    for acc in caps.get("accelerators") or []:
        out.add(str(acc.get("kind")))
        if acc.get("design"):
            out.add(f"vta:{acc['design']}")
    return out


def incompatibilities(manifest: Manifest, caps: dict[str, Any]) -> list[str]:
    """Why the build in ``manifest`` cannot run on the device described by ``caps`` (empty: it
    can). Each reason names what the build needs and what the device has."""
    problems = []
    cpu = caps.get("cpu") or {}
    if manifest.target.triple != cpu.get("triple"):
        problems.append(
            f"built for {manifest.target.triple}, the device is {cpu.get('triple') or 'unknown'}"
            f" ({cpu.get('arch', '?')})"
        )
    missing = sorted(set(manifest.target.cpu_features) - set(cpu.get("features") or []))
    if missing:
        problems.append(f"needs CPU features the device lacks: {', '.join(missing)}")
    runtime = caps.get("tvm_runtime") or {}
    try:
        needed = runtime_abi(manifest.tvm_version)
    except ValueError:
        needed = manifest.tvm_version
    if runtime.get("abi") != needed:
        problems.append(
            f"built with TVM {manifest.tvm_version}, the device runs TVM "
            f"{runtime.get('version') or 'none'} (the major.minor versions must match)"
        )
    accelerator = manifest.target.accelerator
    if accelerator and accelerator not in accelerator_ids(caps):
        ref = manifest.bitstream
        fpgas = [a for a in caps.get("accelerators") or [] if a.get("kind") == "vta-fpga"]
        if ref is None:
            problems.append(f"needs accelerator {accelerator}, which the device does not have")
        elif not any(a.get("board") == ref.board for a in fpgas):
            boards = ", ".join(str(a.get("board")) for a in fpgas) or "none"
            problems.append(
                f"needs accelerator {accelerator}, which the device does not have, or a "
                f"{ref.board} FPGA to program (its FPGA boards: {boards})"
            )
    return problems
