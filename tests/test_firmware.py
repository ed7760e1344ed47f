"""The firmware coprocessor against the Python simulator: the same programs, the same results.

The firmware's host build serves a pseudo-terminal; the serial driver talks to it exactly as to a
board on a USB port. Random valid programs (``tests/support/vta_random``) run on both and must
leave identical DRAM, accumulators and counters; invalid ones must fail the same way.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.support import vta_random
from tests.support.firmware import FIRMWARE, REPO, FirmwareProcess
from tests.support.vta_random import CONFIGS
from vta import isa
from vta.cli import main as vta_main
from vta.config import VtaConfig
from vta.drivers.serial import SerialDriver
from vta.errors import VtaError
from vta.isa import AluInsn, AluOp, FinishInsn, Insn, MemId, MemInsn, Uop
from vta.sim import Counters, Dram, Simulator

Firmware = Callable[[VtaConfig], Path]

DRAM_BYTES = 256 << 10
PROGRAM_AT = 128 << 10  # random programs address DRAM below 64 KiB
DUMP_AT = 160 << 10
DUMP_ENTRIES = 64  # accumulators random programs can touch (indices stay below 32)
DEFAULT_PROGRAMS = 1200
SLOW_PROGRAMS = 10200
MUTATED_PROGRAMS = 300


def test_the_committed_header_is_current(tmp_path: Path) -> None:
    header = FIRMWARE / "include" / "vta_hw.h"
    assert vta_main(["header", "-o", str(header), "--check"]) == 0
    stale = tmp_path / "vta_hw.h"
    stale.write_text(header.read_text().replace("VTA_ACC_DEPTH 2048", "VTA_ACC_DEPTH 1024"))
    assert vta_main(["header", "-o", str(stale), "--check"]) == 1


def dump_program(cfg: VtaConfig) -> list[Insn]:
    """Stores every byte of the first accumulators: low byte, SHR 8, next byte, ... (4 rounds)."""
    out_eb = cfg.elem_bytes(MemId.OUT)
    uop_at = (DUMP_AT - 64) // isa.UOP_BYTES
    insns: list[Insn] = [
        MemInsn(memory_type=MemId.UOP, sram_base=0, dram_base=uop_at, y_size=1, x_size=1,
                x_stride=1, push_next=True)
    ]  # fmt: skip
    for k in range(4):
        insns.append(
            MemInsn(is_store=True, memory_type=MemId.OUT, sram_base=0,
                    dram_base=DUMP_AT // out_eb + k * DUMP_ENTRIES, y_size=1, x_size=DUMP_ENTRIES,
                    x_stride=DUMP_ENTRIES, pop_prev=True, push_prev=True)
        )  # fmt: skip
        if k < 3:
            insns.append(
                AluInsn(alu_opcode=AluOp.SHR, use_imm=True, imm=8, uop_bgn=0, uop_end=1,
                        iter_out=DUMP_ENTRIES, iter_in=1, dst_factor_out=1, dst_factor_in=0,
                        src_factor_out=1, src_factor_in=0, pop_next=True, push_next=True)
            )  # fmt: skip
    insns.append(FinishInsn(pop_next=True))
    return insns


def dump_region(cfg: VtaConfig) -> tuple[int, int]:
    return DUMP_AT - 64, 64 + 4 * DUMP_ENTRIES * cfg.elem_bytes(MemId.OUT)


class Pair:
    """One design on both implementations: the simulator and a firmware process."""

    def __init__(self, cfg: VtaConfig, binary: Path) -> None:
        self.cfg = cfg
        self.firmware = FirmwareProcess(binary, dram_bytes=DRAM_BYTES)
        self.driver = SerialDriver(self.firmware.port, hls=False)
        assert self.driver.config == cfg
        self.dump = isa.encode_program(dump_program(cfg), cfg)
        self.dump_uop = isa.encode_uops([Uop(0, 0, 0)], cfg)

    def close(self) -> None:
        self.driver.close()
        self.firmware.stop()

    def run(self, image: bytes, program: bytes, hls: bool = False) -> tuple[object, object]:
        """(simulator outcome, firmware outcome): counters and memory, or the error class."""
        sim = Simulator(self.cfg, Dram.zeros(DRAM_BYTES), hls=hls)
        sim.dram.data[: len(image)] = np.frombuffer(image, np.uint8)
        link = self.driver.link
        link.reset()
        link.write(0, image)
        link.write(PROGRAM_AT, program)
        outcomes = []
        for execute in (
            lambda: sim.run(program),
            lambda: link.run(PROGRAM_AT, len(program) // 16, hls=hls, timeout_s=10),
        ):
            try:
                counters: Counters | type[VtaError] = execute()
            except VtaError as err:
                counters = type(err)
            outcomes.append(counters)
        if not isinstance(outcomes[0], Counters) or not isinstance(outcomes[1], Counters):
            return outcomes[0], outcomes[1]
        # Expose the accumulators, then compare memory.
        for data, at in ((self.dump_uop, DUMP_AT - 64), (self.dump, PROGRAM_AT)):
            sim.dram.data[at : at + len(data)] = np.frombuffer(data, np.uint8)
            link.write(at, data)
        sim.run(self.dump)
        link.run(PROGRAM_AT, len(self.dump) // 16, hls=False, timeout_s=10)
        start, size = dump_region(self.cfg)
        sim_memory = (
            sim.dram.data[: len(image)].tobytes() + sim.dram.data[start : start + size].tobytes()
        )
        fw_memory = link.read(0, len(image)) + link.read(start, size)
        return (outcomes[0], sim_memory), (outcomes[1], fw_memory)


@pytest.fixture(params=list(CONFIGS), scope="module")
def pair(request: pytest.FixtureRequest, firmware: Firmware) -> Iterator[Pair]:
    cfg = CONFIGS[request.param]
    both = Pair(cfg, firmware(cfg))
    yield both
    both.close()


def _random_programs(pair: Pair, seeds: range) -> None:
    for seed in seeds:
        rng = random.Random(seed)
        image = bytes(vta_random.dram_image(pair.cfg, rng))
        program = vta_random.program(pair.cfg, rng, rng.randint(1, 60))
        sim, fw = pair.run(image, isa.encode_program(program, pair.cfg))
        assert isinstance(sim, tuple), f"seed {seed}: the simulator raised {sim}"
        assert sim == fw, f"seed {seed}, design {pair.cfg.bitstream_id}"


def test_random_programs_agree(pair: Pair) -> None:
    _random_programs(pair, range(DEFAULT_PROGRAMS // len(CONFIGS)))


@pytest.mark.slow
def test_many_random_programs_agree(pair: Pair) -> None:
    start = DEFAULT_PROGRAMS // len(CONFIGS)
    _random_programs(pair, range(start, start + SLOW_PROGRAMS // len(CONFIGS)))


def test_mutated_programs_fail_alike(pair: Pair) -> None:
    """Random programs with flipped opcode, flag, memory-type and SRAM bits: whatever the
    simulator does (run, deadlock, reject), the firmware does too, in both modes."""
    outcomes: set[str] = set()
    for seed in range(MUTATED_PROGRAMS // len(CONFIGS)):
        rng = random.Random(10_000 + seed)
        image = bytes(vta_random.dram_image(pair.cfg, rng))
        program = bytearray(isa.encode_program(vta_random.program(pair.cfg, rng, 20), pair.cfg))
        for _ in range(rng.randint(1, 3)):
            insn = rng.randrange(len(program) // 16)
            bit = rng.randrange(26)  # opcode, flags, memory type / reset, SRAM base / uop range
            program[insn * 16 + bit // 8] ^= 1 << (bit % 8)
        hls = seed % 2 == 1
        sim, fw = pair.run(image, bytes(program), hls=hls)
        assert sim == fw, f"seed {seed}, hls {hls}, design {pair.cfg.bitstream_id}"
        outcomes.add(sim.__name__ if isinstance(sim, type) else "ran")
    # The mutations reach the error paths as well as the normal one.
    assert "ran" in outcomes and len(outcomes) >= 3, outcomes


def _hls_violations(cfg: VtaConfig) -> dict[str, list[Insn]]:
    loop = dict(uop_bgn=0, uop_end=1, iter_out=1, iter_in=1, dst_factor_out=0, dst_factor_in=0,
                src_factor_out=0, src_factor_in=0)  # fmt: skip
    uop = MemInsn(memory_type=MemId.UOP, sram_base=0, dram_base=0, y_size=1, x_size=1, x_stride=1)
    store = MemInsn(is_store=True, memory_type=MemId.OUT, sram_base=0, dram_base=0, y_size=1,
                    x_size=1, x_stride=1)  # fmt: skip
    return {
        "mul": [uop, AluInsn(alu_opcode=AluOp.MUL, use_imm=True, imm=3, **loop), FinishInsn()],
        "shift": [uop, AluInsn(alu_opcode=AluOp.SHR, use_imm=True, imm=16, **loop), FinishInsn()],
        "acc8": [replace(uop, memory_type=MemId.ACC_8BIT), FinishInsn()],
        "stale store": [
            replace(uop, memory_type=MemId.ACC, push_next=True),
            replace(store, pop_prev=True, push_prev=True),
            FinishInsn(pop_next=True),
        ],
        "hazard": [
            uop,
            isa.GemmInsn(**{**loop, "iter_in": 2}),
            FinishInsn(),
        ],
    }


@pytest.mark.parametrize("case", ["mul", "shift", "acc8", "stale store", "hazard"])
def test_hls_mode_refuses_what_the_fpga_cannot_run(firmware: Firmware, case: str) -> None:
    cfg = VtaConfig()
    program = isa.encode_program(_hls_violations(cfg)[case], cfg)
    image = bytes(4096)
    both = Pair(cfg, firmware(cfg))
    try:
        sim, fw = both.run(image, program, hls=True)
        assert sim == fw and getattr(sim, "__name__", None) == "HlsError", (sim, fw)
        relaxed_sim, relaxed_fw = both.run(image, program, hls=False)
        assert relaxed_sim == relaxed_fw and isinstance(relaxed_sim, tuple)
    finally:
        both.close()


@pytest.mark.parametrize("target", ["host", "cortex-m"])
def test_firmware_builds_with_no_warnings(tmp_path: Path, target: str) -> None:
    """-Werror is on; the Cortex-M image also links with --fatal-warnings and no C library."""
    result = subprocess.run(
        ["make", "-C", str(FIRMWARE), target, f"BUILD={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    image = {"host": "host/vta-coprocessor", "cortex-m": "cortex-m/vta-coprocessor.elf"}[target]
    assert (tmp_path / image).stat().st_size > 0
