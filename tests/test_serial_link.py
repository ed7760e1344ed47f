"""The serial driver on a bad line and with bad devices: retries, resynchronisation, deadlines,
discovery, a device that disappears. The device is the firmware's host build."""

from __future__ import annotations

import os
import signal
import threading
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.firmware import FirmwareProcess
from tests.support.noisy_line import NoisyLine
from vta import isa
from vta.config import VtaConfig
from vta.drivers.base import DeviceBuffer
from vta.drivers.serial import DeviceLostError, SerialDriver, discover
from vta.isa import AluInsn, AluOp, FinishInsn, GemmInsn, Insn, MemId, MemInsn, Uop
from vta.link import Command, Status
from vta.runtime import CLEAR_DONE

Firmware = Callable[[VtaConfig], Path]
CFG = VtaConfig()


@pytest.fixture
def device(firmware: Firmware) -> Iterator[FirmwareProcess]:
    with FirmwareProcess(firmware(CFG), dram_bytes=4 << 20) as process:
        yield process


def counting_program(driver: SerialDriver, out: DeviceBuffer, uop: DeviceBuffer) -> list[Insn]:
    """acc[0] += 1, then store it: run n times, the output holds n (wrapped to int8)."""
    loop = dict(uop_bgn=0, uop_end=1, iter_out=1, iter_in=1, dst_factor_out=0, dst_factor_in=0,
                src_factor_out=0, src_factor_in=0)  # fmt: skip
    return [
        MemInsn(memory_type=MemId.UOP, sram_base=0, dram_base=uop.addr // 4, y_size=1, x_size=1,
                x_stride=1),
        AluInsn(alu_opcode=AluOp.ADD, use_imm=True, imm=1, push_next=True, **loop),
        MemInsn(is_store=True, memory_type=MemId.OUT, sram_base=0, dram_base=out.addr // 16,
                y_size=1, x_size=1, x_stride=1, pop_prev=True, push_prev=True),
        FinishInsn(pop_next=True),
    ]  # fmt: skip


def test_a_damaged_line_costs_retries_not_results(device: FirmwareProcess) -> None:
    line = NoisyLine(device.port, seed=7, damage=0.1, garbage=0.1)
    try:
        driver = SerialDriver(line.port, hls=False, answer_s=0.2)
        with driver:
            rng = np.random.default_rng(0)
            data = rng.integers(0, 256, 50_000, dtype=np.uint8)
            buffer = driver.alloc(data.size, 256)
            driver.copy_in(buffer, data)
            assert driver.copy_out(buffer, data.size) == data.tobytes()
            out, uop = driver.alloc(16, 16), driver.alloc(4, 4)
            driver.copy_in(uop, isa.encode_uops([Uop(0, 0, 0)], CFG))
            stream = isa.encode_program(counting_program(driver, out, uop), CFG)
            program = driver.alloc(len(stream), 16)
            driver.copy_in(program, stream)
            for n in range(1, 41):
                driver.run(program, len(stream) // 16, timeout_s=5)
                # Every run happened exactly once, whatever the line did to its frames.
                assert driver.copy_out(out, 1)[0] == n
                assert driver.counters.alu_counter == 1
        assert line.faults > 10 and driver.link.retries > 5
    finally:
        line.close()


def test_a_device_that_disappears_mid_run_is_reported(device: FirmwareProcess) -> None:
    driver = SerialDriver(device.port)
    loop = dict(uop_bgn=0, uop_end=1, iter_out=16000, iter_in=16000, dst_factor_out=0,
                dst_factor_in=1, src_factor_out=0, src_factor_in=0)  # fmt: skip
    stream = isa.encode_program([GemmInsn(**loop), FinishInsn()], CFG)  # minutes of work
    program = driver.alloc(len(stream), 16)
    driver.copy_in(program, stream)
    threading.Timer(0.5, device.stop).start()
    started = time.monotonic()
    with pytest.raises(DeviceLostError, match=r"disappeared .*reconnect it"):
        driver.run(program, 2, timeout_s=60)
    assert time.monotonic() - started < 10
    driver.close()


def test_a_silent_device_times_out_with_a_clear_error(device: FirmwareProcess) -> None:
    driver = SerialDriver(device.port, answer_s=0.2)
    stream = isa.encode_program([CLEAR_DONE, FinishInsn()], CFG)
    program = driver.alloc(len(stream), 16)
    driver.copy_in(program, stream)
    os.kill(device.process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(DeviceLostError, match="no valid answer after 8 attempts"):
            driver.copy_out(driver.alloc(16, 16), 16)
        # A run is not sent again for silence: its deadline is the deadline.
        started = time.monotonic()
        with pytest.raises(DeviceLostError, match=r"no answer within 0\.7 s"):
            driver.run(program, 2, timeout_s=0.5)
        assert time.monotonic() - started < 1.5
    finally:
        os.kill(device.process.pid, signal.SIGCONT)
        driver.close()


def test_the_device_refuses_bad_requests_with_a_status(device: FirmwareProcess) -> None:
    with SerialDriver(device.port) as driver:
        with pytest.raises(Exception) as raised:
            driver.link.read(4 << 20, 16)
        assert getattr(raised.value, "status", None) == Status.OUT_OF_RANGE
        assert "READ past the end of the device's DRAM" in str(raised.value)
        with pytest.raises(Exception) as raised:
            driver.link.request(Command.RESET, b"x")
        assert getattr(raised.value, "status", None) == Status.BAD_LENGTH


def test_discovery_advertises_only_ports_that_answer_the_handshake(
    device: FirmwareProcess,
) -> None:
    silent_master, silent = os.openpty()
    chatty_master, chatty = os.openpty()
    for fd in (silent, chatty):
        tty.setraw(fd)
    stop = threading.Event()

    def chatter() -> None:  # a device that talks, but not our protocol
        while not stop.is_set():
            os.write(chatty_master, b"$GPGGA,123519,4807.038,N*47\r\n\x00")
            time.sleep(0.01)

    talker = threading.Thread(target=chatter, daemon=True)
    talker.start()
    try:
        found = discover([os.ttyname(silent), os.ttyname(chatty), device.port])
    finally:
        stop.set()
        talker.join()
        for fd in (silent_master, silent, chatty_master, chatty):
            os.close(fd)
    assert [(c.port, c.design, c.dram_bytes) for c in found] == [
        (device.port, CFG.bitstream_id, 4 << 20)
    ]
