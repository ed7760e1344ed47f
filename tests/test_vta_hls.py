"""HLS-compatibility mode: each construct the FPGA design cannot run is flagged, and the
compliant form of each is accepted."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from tests.support.vta_device import Device
from vta.config import VtaConfig
from vta.errors import HlsError
from vta.isa import AluOp, MemId, Stage, Uop
from vta.runtime import UopKernel

DEFAULT = VtaConfig()
Emit = Callable[[Device], None]


def _device(hls: bool) -> Device:
    dev = Device(DEFAULT, hls=hls)
    values = dev.random(MemId.ACC, 4, np.random.default_rng(0)) % 8  # small shift amounts
    dev.queue.load_2d(MemId.ACC, dev.upload(MemId.ACC, values), 0, x_size=4, y_size=1,
                      x_stride=4, sram_base=0)  # fmt: skip
    return dev


def _uops(*pairs: tuple[int, int]) -> UopKernel:
    return UopKernel(tuple(Uop(d, s, 0) for d, s in pairs))


def _mul(dev: Device) -> None:
    dev.queue.alu(_uops((0, 1)), AluOp.MUL)


def _acc_8bit(dev: Device) -> None:
    buffer = dev.queue.alloc(64, MemId.ACC_8BIT)
    dev.queue.load_2d(MemId.ACC_8BIT, buffer, 0, x_size=1, y_size=1, x_stride=1, sram_base=8)


def _shift_imm(amount: int) -> Emit:
    def emit(dev: Device) -> None:
        dev.queue.alu(_uops((0, 0)), AluOp.SHR, amount)

    return emit


def _shift_tensor(amount: int) -> Emit:
    def emit(dev: Device) -> None:
        dev.queue.alu(_uops((1, 1)), AluOp.MIN, 0)  # acc[1] = min(acc[1], 0) ... then
        dev.queue.alu(_uops((1, 1)), AluOp.MAX, 0)  # acc[1] = 0
        dev.queue.alu(_uops((1, 1)), AluOp.ADD, amount)  # acc[1] = amount
        dev.queue.alu(_uops((0, 1)), AluOp.SHR)

    return emit


def _store_loaded(passed_through_alu: bool) -> Emit:
    def emit(dev: Device) -> None:
        if passed_through_alu:
            dev.queue.alu(UopKernel(tuple(Uop(i, 0, 0) for i in range(4))), AluOp.SHR, 0)
        dev.queue.dep_push(Stage.COMPUTE, Stage.STORE)
        dev.queue.dep_pop(Stage.COMPUTE, Stage.STORE)
        dev.queue.store_2d(dev.output(4), 0, x_size=4, y_size=1, x_stride=4, sram_base=0)

    return emit


def _gemm_writes(dsts: list[int]) -> Emit:
    def emit(dev: Device) -> None:
        dev.queue.gemm(UopKernel(tuple(Uop(d, 0, 0) for d in dsts)))

    return emit


def _padded_weights(pad: tuple[int, int, int, int]) -> Emit:
    def emit(dev: Device) -> None:
        buffer = dev.queue.alloc(256, MemId.WGT)
        dev.queue.load_2d(MemId.WGT, buffer, 0, x_size=1, y_size=1, x_stride=1, sram_base=0,
                          pad=pad)  # fmt: skip

    return emit


FORBIDDEN = {
    "MUL": (_mul, "the FPGA design has no ALU MUL"),
    "ACC_8BIT load": (_acc_8bit, "no 8-bit accumulator load"),
    "SHR imm 16": (_shift_imm(16), r"SHR by an amount outside -16..15"),
    "SHR imm -17": (_shift_imm(-17), r"SHR by an amount outside -16..15"),
    "SHR tensor 20": (_shift_tensor(20), r"SHR by an amount outside -16..15"),
    "store of a loaded tile": (_store_loaded(False), "which no GEMM or ALU op wrote"),
    "same accumulator, next issue": (_gemm_writes([0, 0, 1]), "GEMM issues 0 and 1 both write"),
    "same accumulator, two issues apart": (
        _gemm_writes([3, 1, 3]),
        "GEMM issues 0 and 2 both write accumulator 3",
    ),
    "padded weights": (_padded_weights((0, 0, 1, 0)), "ignores padding on weight loads"),
}

COMPLIANT = {
    "SHR imm 15": _shift_imm(15),
    "SHR imm -16": _shift_imm(-16),
    "SHR tensor -16": _shift_tensor(-16),
    "store after SHR 0": _store_loaded(True),
    "same accumulator three issues apart": _gemm_writes([0, 1, 2, 0, 1, 2]),
    "unpadded weights": _padded_weights((0, 0, 0, 0)),
}


@pytest.mark.parametrize("name", list(FORBIDDEN))
def test_hls_mode_flags(name: str) -> None:
    emit, message = FORBIDDEN[name]
    dev = _device(hls=True)
    emit(dev)
    with pytest.raises(HlsError, match=message):
        dev.queue.synchronize()
    relaxed = _device(hls=False)  # the functional reference runs it
    emit(relaxed)
    relaxed.queue.synchronize()


@pytest.mark.parametrize("name", list(COMPLIANT))
def test_hls_mode_accepts(name: str) -> None:
    dev = _device(hls=True)
    COMPLIANT[name](dev)
    dev.queue.synchronize()
