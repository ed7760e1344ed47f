"""The command-queue runtime's instruction rules, and the sim and null drivers' contract."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.vta_random import CONFIGS
from vta import isa
from vta.config import VtaConfig
from vta.drivers.base import Allocator, DeviceBuffer
from vta.drivers.null import NullDriver
from vta.drivers.sim import SimDriver
from vta.errors import DriverError, VtaError
from vta.isa import AluOp, FinishInsn, GemmInsn, Insn, MemId, MemInsn, Stage, Uop
from vta.runtime import CommandQueue, Loop, UopKernel

DEFAULT = VtaConfig()


def _lines(insns: list[Insn]) -> list[str]:
    """Mnemonic, memory type and dependency flags: what the rules decide."""
    out = []
    for insn in insns:
        name = insn.opcode.name
        if isinstance(insn, MemInsn):
            name += f" {insn.memory_type.name} x={insn.x_size}"
        flags = [f for f in ("pop_prev", "pop_next", "push_prev", "push_next") if getattr(insn, f)]
        out.append(" ".join([name, *flags]))
    return out


def test_pops_ride_on_the_next_instruction_and_pushes_on_the_previous() -> None:
    driver = SimDriver(DEFAULT)
    q = CommandQueue(driver)
    buffer = q.alloc(16 * 4, MemId.INP)
    q.load_2d(MemId.INP, buffer, 0, x_size=4, y_size=1, x_stride=4, sram_base=0)
    q.dep_push(Stage.LOAD, Stage.COMPUTE)  # attaches to the load
    q.dep_pop(Stage.LOAD, Stage.COMPUTE)
    q.gemm(UopKernel((Uop(0, 0, 0),)), reset=True)  # the uop load carries the pop
    q.dep_push(Stage.COMPUTE, Stage.LOAD)  # attaches to the GEMM
    q.dep_push(Stage.COMPUTE, Stage.LOAD)  # the GEMM already pushes: a no-op carries it
    q.dep_pop(Stage.COMPUTE, Stage.LOAD)
    q.dep_pop(Stage.COMPUTE, Stage.LOAD)  # a second pending pop commits the first as a no-op
    q.load_2d(MemId.INP, buffer, 0, x_size=4, y_size=1, x_stride=4, sram_base=0)
    assert _lines(q.synchronize()) == [
        "GEMM",  # CLEAR_DONE starts every stream
        "LOAD INP x=4 push_next",
        "LOAD UOP x=1 pop_prev",
        "GEMM push_prev",
        "LOAD UOP x=0 push_prev",
        "LOAD INP x=0 pop_next",
        "LOAD INP x=4 pop_next",
        # the synchronize epilogue: FINISH waits for the last store and the last load
        "STORE OUT x=0 push_prev",
        "LOAD INP x=0 push_next",
        "LOAD UOP x=0 pop_prev pop_next",
        "FINISH",
    ]


def test_tokens_only_pass_between_neighbouring_stages() -> None:
    q = CommandQueue(SimDriver(DEFAULT))
    with pytest.raises(VtaError, match="no dependency queue runs from LOAD to STORE"):
        q.dep_push(Stage.LOAD, Stage.STORE)


def test_kernels_stay_resident_and_the_uop_buffer_starts_over_when_full() -> None:
    cfg = CONFIGS["1x4_i8w8a32_10_10_12_12"]  # 256 micro-op entries
    q = CommandQueue(SimDriver(cfg))
    big = UopKernel(tuple(Uop(i % 16, 0, 0) for i in range(200)))
    other = UopKernel(tuple(Uop(i % 16, 0, 0) for i in range(100)), (Loop(2, 16, 0),))
    q.gemm(big, reset=True)
    q.gemm(big, reset=True)  # resident: no second load
    q.gemm(other, reset=True)  # 200 + 100 > 256: placed at 0, evicting the first
    q.gemm(other, reset=True)  # resident
    q.gemm(big, reset=True)  # 100 + 200 > 256: starts over at 0 again
    insns = q.synchronize()
    loads = [i for i in insns if isinstance(i, MemInsn) and i.memory_type == MemId.UOP and i.x_size]
    assert [(i.sram_base, i.x_size) for i in loads] == [(0, 200), (0, 100), (0, 200)]
    gemms = [i for i in insns if isinstance(i, GemmInsn)]
    assert [(g.uop_bgn, g.uop_end, g.iter_out) for g in gemms] == [
        (0, 0, 1),  # CLEAR_DONE
        (0, 200, 1), (0, 200, 1), (0, 100, 2), (0, 100, 2), (0, 200, 1),
    ]  # fmt: skip
    # the image holds each kernel once
    uop_loads = {i.dram_base for i in loads}
    assert len(uop_loads) == 2


def test_runtime_errors_name_the_problem() -> None:
    driver = SimDriver(DEFAULT)
    q = CommandQueue(driver)
    with pytest.raises(VtaError, match="at most 2 loops"):
        UopKernel((Uop(0, 0, 0),), (Loop(1, 0, 0),) * 3)
    with pytest.raises(VtaError, match="at least one micro-op"):
        UopKernel(())
    misaligned = DeviceBuffer(driver.alloc(512, 16).addr + 16, 256)
    with pytest.raises(VtaError, match="not aligned to the 256-byte WGT element"):
        q.load_2d(MemId.WGT, misaligned, 0, x_size=1, y_size=1, x_stride=1, sram_base=0)
    small = q.alloc(64, MemId.INP)
    with pytest.raises(
        VtaError, match=r"a 2x4 INP block at element 0 \(stride 4\) runs past the 64-byte"
    ):
        q.load_2d(MemId.INP, small, 0, x_size=4, y_size=2, x_stride=4, sram_base=0)


def test_sim_driver_round_trips_memory_and_checks_buffers() -> None:
    driver = SimDriver(DEFAULT, dram_bytes=1 << 20)
    buffer = driver.alloc(100, 64)
    assert buffer.addr % 64 == 0 and buffer.addr >= 4096
    data = np.arange(100, dtype=np.uint8)
    driver.copy_in(buffer, data)
    assert driver.copy_out(buffer, 50, offset=50) == bytes(range(50, 100))
    with pytest.raises(DriverError, match="copy in of 8 bytes at offset 96 does not fit"):
        driver.copy_in(buffer, bytes(8), offset=96)
    driver.free(buffer)
    with pytest.raises(DriverError, match="is not a live buffer"):
        driver.copy_out(buffer, 1)
    driver.close()
    with pytest.raises(DriverError, match="closed"):
        driver.alloc(16, 16)


def test_null_driver_accepts_work_and_refuses_results() -> None:
    with NullDriver(DEFAULT) as driver:
        q = CommandQueue(driver)
        out = q.alloc(64, MemId.OUT)
        q.alu(UopKernel((Uop(0, 0, 0),)), AluOp.ADD, 1)
        q.store_2d(out, 0, x_size=4, y_size=1, x_stride=4, sram_base=0)
        insns = q.synchronize()  # uploaded and "run" without complaint
        assert isinstance(insns[-1], FinishInsn)
        with pytest.raises(DriverError) as err:
            driver.copy_out(out, 64)
    assert str(err.value) == (
        "the null driver computes nothing and returns no results; use the sim driver or real "
        "hardware to read data back"
    )


def test_allocator_aligns_reuses_and_merges() -> None:
    allocator = Allocator(4096, 4096)
    a = allocator.alloc(100, 256)
    b = allocator.alloc(1000, 256)
    assert (a, b) == (DeviceBuffer(4096, 100), DeviceBuffer(4352, 1000))
    with pytest.raises(DriverError, match="out of device memory"):
        allocator.alloc(3000, 16)
    allocator.free(a)
    allocator.free(b)
    whole = allocator.alloc(4096, 4096)
    assert whole == DeviceBuffer(4096, 4096)  # freed blocks merged back into one
    allocator.free(whole)
    with pytest.raises(DriverError, match="freed twice"):
        allocator.free(whole)
    with pytest.raises(DriverError, match="power-of-two alignment"):
        allocator.alloc(16, 3)


def test_program_bytes_are_what_the_driver_runs() -> None:
    driver = SimDriver(DEFAULT)
    q = CommandQueue(driver)
    q.alu(UopKernel((Uop(0, 0, 0),)), AluOp.ADD, 5)
    insns = q.synchronize()
    assert isa.decode_program(isa.encode_program(insns, DEFAULT), DEFAULT) == insns
    assert int(driver.simulator.acc[0, 0, 0]) == 5
