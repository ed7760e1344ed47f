"""Named build targets and boards: each maps to a TVM dict target plus the compiler that links it.

``boost-build targets`` prints this table. The x86_64 target is the build host's own CPU, with the
real ``mcpu`` asked from LLVM (``mcpu: native`` would silently become generic).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from agent.capabilities import ISA_FEATURES
from agent.errors import BoostError


@dataclass(frozen=True)
class Board:
    name: str
    target: str
    mcpu: str
    cores: int
    description: str


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    triple: str
    tvm_target: dict[str, Any]
    compiler: str
    """The C++ compiler driver that links the exported shared library."""
    apt_package: str
    """The Debian package that provides ``compiler``."""
    mcpu: str = ""
    cores: int = 0
    board: str = ""
    accelerator: str = ""
    """``vta:<design>`` when layers run on VTA; the rest is built for the board's CPU."""

    def tvm_dict(self) -> dict[str, Any]:
        """The TVM dict target for this spec (host mcpu and cores filled in for x86_64)."""
        out = {"kind": "llvm", "mtriple": self.triple, **self.tvm_target}
        if self.mcpu:
            out["mcpu"] = self.mcpu
        if self.cores:
            out["num-cores"] = self.cores
        return out

    def check_compiler(self) -> str:
        """Path of the compiler, or an error naming the package to install."""
        path = shutil.which(self.compiler)
        if path is None:
            raise BoostError(
                f"target {self.name}: compiler {self.compiler} not found; install it with "
                f"'apt-get install {self.apt_package}'"
            )
        return path


TARGETS: dict[str, TargetSpec] = {
    spec.name: spec
    for spec in (
        TargetSpec(
            name="x86_64",
            description="this build host's x86-64 CPU (mcpu detected)",
            triple="x86_64-linux-gnu",
            tvm_target={},
            compiler="g++",
            apt_package="g++",
        ),
        TargetSpec(
            name="aarch64",
            description="64-bit ARM Linux (Raspberry Pi 4 / Ultra96 class)",
            triple="aarch64-linux-gnu",
            tvm_target={},
            compiler="aarch64-linux-gnu-g++",
            apt_package="g++-aarch64-linux-gnu",
            mcpu="cortex-a72",
            cores=4,
        ),
        TargetSpec(
            name="armv7",
            description="32-bit ARM Linux, hard float, NEON (PYNQ-Z1's Cortex-A9 class)",
            triple="armv7a-linux-gnueabihf",
            tvm_target={"mattr": ["+neon", "+vfp3"], "mfloat-abi": "hard"},
            compiler="arm-linux-gnueabihf-g++",
            apt_package="g++-arm-linux-gnueabihf",
            mcpu="cortex-a9",
            cores=2,
        ),
    )
}

BOARDS: dict[str, Board] = {
    board.name: board
    for board in (
        Board("pynq-z1", "armv7", "cortex-a9", 2, "Digilent PYNQ-Z1 (Zynq-7020)"),
        Board("de10nano", "armv7", "cortex-a9", 2, "Terasic DE10-Nano (Cyclone V SoC)"),
        Board("ultra96", "aarch64", "cortex-a53", 4, "Avnet Ultra96 (Zynq UltraScale+ ZU3EG)"),
        Board("zcu104", "aarch64", "cortex-a53", 4, "Xilinx ZCU104 (Zynq UltraScale+ ZU7EV)"),
        Board("rpi4", "aarch64", "cortex-a72", 4, "Raspberry Pi 4"),
    )
}


#: ``--target vta``: the board whose CPU runs what VTA does not; ``sim`` is this build host.
VTA_TARGET = "vta"
VTA_SIM_BOARD = "sim"


def resolve(name: str, board: str | None = None) -> TargetSpec:
    """The named target, specialised for a board when one is given."""
    if name == VTA_TARGET:
        from vta.config import VtaConfig

        design = VtaConfig().bitstream_id
        chosen = board or VTA_SIM_BOARD
        if chosen == VTA_SIM_BOARD:
            host = resolve("x86_64")
        elif chosen in BOARDS:
            host = resolve(BOARDS[chosen].target, chosen)
        else:
            raise BoostError(
                f"unknown board {chosen!r} for --target vta; known: {VTA_SIM_BOARD} (this host "
                f"with the simulator), {', '.join(BOARDS)}"
            )
        return replace(
            host,
            name=VTA_TARGET,
            description=f"VTA {design} with the {chosen} host CPU",
            board=chosen,
            accelerator=f"vta:{design}",
        )
    if name not in TARGETS:
        raise BoostError(
            f"unknown target {name!r}; known targets: {', '.join(TARGETS)}, {VTA_TARGET} "
            "(see 'boost-build targets')"
        )
    spec = TARGETS[name]
    if board is not None:
        if board not in BOARDS:
            raise BoostError(f"unknown board {board!r}; known boards: {', '.join(BOARDS)}")
        b = BOARDS[board]
        if b.target != name:
            raise BoostError(
                f"board {board} runs target {b.target}, not {name}; use --target {b.target}"
            )
        spec = replace(spec, mcpu=b.mcpu, cores=b.cores, board=board)
    if name == "x86_64":
        from models import tvm_backend

        mcpu = tvm_backend.host_cpu()
        # LLVM names the CPU model, but a hypervisor may hide some of its features (AMX, FP16 ...):
        # turn off what this CPU model implies and the host does not report.
        absent = tvm_backend.cpu_model_features(mcpu, ISA_FEATURES) - tvm_backend.host_features()
        spec = replace(
            spec,
            mcpu=mcpu,
            cores=len(os.sched_getaffinity(0)),
            tvm_target={**spec.tvm_target, "mattr": [f"-{f}" for f in sorted(absent)]}
            if absent
            else spec.tvm_target,
        )
    return spec


def for_device(caps: Mapping[str, Any]) -> TargetSpec:
    """The CPU target that runs on the device a capability document describes."""
    triple = (caps.get("cpu") or {}).get("triple")
    for spec in TARGETS.values():
        if spec.triple == triple:
            return resolve(spec.name)
    raise BoostError(
        f"no build target for a {triple or 'unknown'} CPU; this build host builds for "
        f"{', '.join(s.triple for s in TARGETS.values())}"
    )
