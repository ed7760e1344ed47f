"""The pynq driver against a scripted register double: the exact accesses of VTA-ISA.md section 6
in order, deadlines, alignment, cache maintenance and buffer release. A real-board test runs only
when asked for (``BOOST_FPGA_BOARD=pynq-z1 pytest -m fpga``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.pynq_double import ScriptedPynq
from tests.support.vta_layers import reference, run_on
from vta import isa
from vta.config import VtaConfig
from vta.drivers.base import DeviceBuffer
from vta.drivers.pynq import BOARDS, PynqDriver, import_pynq, probe_fpga
from vta.errors import DriverError
from vta.isa import FinishInsn, MemId, MemInsn
from vta.lower import ConvSpec, lower
from vta.runtime import CLEAR_DONE

CFG = VtaConfig()
PROGRAM = isa.encode_program([CLEAR_DONE, FinishInsn()], CFG)
START_SEQUENCE = [
    ("write", "fetch", 0x10, 2),
    ("write", "fetch", 0x18, 0x1F000000),
    ("write", "load", 0x10, 0),
    ("write", "load", 0x18, 0),
    ("write", "compute", 0x20, 0),
    ("write", "compute", 0x28, 0),
    ("write", "store", 0x10, 0),
    ("write", "fetch", 0x00, 0x1),
    ("write", "load", 0x00, 0x81),
    ("write", "compute", 0x00, 0x81),
    ("write", "store", 0x00, 0x81),
]


@pytest.fixture
def double() -> Iterator[ScriptedPynq]:
    scripted = ScriptedPynq()
    yield scripted
    scripted.assert_done()


def uploaded(double: ScriptedPynq, driver: PynqDriver, data: bytes, address: int) -> DeviceBuffer:
    double.expect(("allocate", len(data) + 15, address), ("flush", address))
    buffer = driver.alloc(len(data), 16)
    driver.copy_in(buffer, data)
    return buffer


def test_a_run_writes_the_registers_in_order_and_polls_done(double: ScriptedPynq) -> None:
    driver = PynqDriver(CFG, BOARDS["pynq-z1"], double)
    program = uploaded(double, driver, PROGRAM, 0x1F000000)
    double.expect(
        *START_SEQUENCE,
        ("read", "compute", 0x18, 0),
        ("read", "compute", 0x18, 0),
        ("read", "compute", 0x18, 1),
    )
    driver.run(program, 2, timeout_s=5)
    double.expect(("free", 0x1F000000))
    driver.close()


def test_a_run_that_never_finishes_fails_at_its_deadline(double: ScriptedPynq) -> None:
    driver = PynqDriver(CFG, BOARDS["pynq-z1"], double)
    program = uploaded(double, driver, PROGRAM, 0x1F000000)
    double.expect(*START_SEQUENCE, *[("read", "compute", 0x18, 0)] * 100_000)
    with pytest.raises(DriverError, match=r"did not finish 2 instructions within 0.05 s"):
        driver.run(program, 2, timeout_s=0.05)
    double.expected.clear()  # the polls left over
    double.expect(("free", 0x1F000000))
    driver.close()


def test_a_stream_that_cannot_clear_done_is_refused_before_any_register_access(
    double: ScriptedPynq,
) -> None:
    driver = PynqDriver(CFG, BOARDS["pynq-z1"], double)
    stale = isa.encode_program(
        [MemInsn(memory_type=MemId.UOP, sram_base=0, dram_base=0, y_size=0, x_size=0,
                 x_stride=0), FinishInsn()], CFG
    )  # fmt: skip
    program = uploaded(double, driver, stale, 0x1F000000)
    with pytest.raises(DriverError, match="must start with a GEMM or ALU op"):
        driver.run(program, 2, timeout_s=1)
    double.expect(("free", 0x1F000000))
    driver.close()


def test_buffers_are_aligned_copies_flush_and_reads_invalidate(double: ScriptedPynq) -> None:
    driver = PynqDriver(CFG, BOARDS["pynq-z1"], double)
    double.expect(("allocate", 1000 + 255, 0x1F000010))
    weights = driver.alloc(1000, 256)
    assert weights.addr == 0x1F000100 and weights.nbytes == 1000
    data = np.arange(1000, dtype=np.int32).astype(np.uint8)
    double.expect(("flush", 0x1F000010), ("invalidate", 0x1F000010))
    driver.copy_in(weights, data)
    assert driver.copy_out(weights, 1000) == data.tobytes()
    with pytest.raises(DriverError, match="does not fit"):
        driver.copy_in(weights, data, offset=1)
    double.expect(("allocate", 16, 0x1F100000), ("free", 0x1F100000))
    driver.free(driver.alloc(16, 1))
    # close releases what is still allocated, exactly once
    double.expect(("free", 0x1F000010))
    driver.close()
    driver.close()
    with pytest.raises(DriverError, match="closed"):
        driver.alloc(16, 16)


def test_without_the_pynq_package_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynq", None)
    with pytest.raises(DriverError, match=r"pip install mlinferbooster\[pynq\]"):
        import_pynq()


@pytest.mark.fpga
@pytest.mark.parametrize("case", ["conv3x3", "dense"])
def test_lowered_layers_on_a_real_board(case: str) -> None:
    """On a board with VTA programmed: lowered layers match the numpy reference bit for bit."""
    board = os.environ.get("BOOST_FPGA_BOARD")
    if not board:
        pytest.skip("set BOOST_FPGA_BOARD (e.g. pynq-z1) on a board with VTA programmed")
    spec = {
        "conv3x3": ConvSpec(16, 32, 14, 14, (3, 3), (1, 1), (1, 1, 1, 1), shift=8, clip=(0, 127)),
        "dense": ConvSpec(512, 10, 1, 1, (1, 1), (1, 1), (0, 0, 0, 0), shift=9, clip=(-127, 127)),
    }[case]
    rng = np.random.default_rng(0)
    x = rng.integers(-127, 128, (spec.in_channels, spec.height, spec.width), dtype=np.int8)
    w = rng.integers(-127, 128, (spec.out_channels, spec.in_channels, *spec.kernel), np.int8)
    bias = rng.integers(-5000, 5000, spec.out_channels, dtype=np.int32)
    layer = lower(spec, w, bias, CFG)
    with PynqDriver(CFG, BOARDS[board]) as fpga:
        got = run_on(fpga, layer, x)
    assert np.array_equal(got, reference(spec, x, w, bias))


def test_the_fpga_probe_reads_the_fpga_manager_and_the_board(tmp_path: Path) -> None:
    assert probe_fpga(tmp_path) == []
    manager = tmp_path / "sys/class/fpga_manager/fpga0"
    manager.mkdir(parents=True)
    (manager / "state").write_text("operating\n")
    (manager / "name").write_text("Xilinx Zynq FPGA Manager\n")
    model = tmp_path / "proc/device-tree/model"
    model.parent.mkdir(parents=True)
    model.write_text("TUL PYNQ-Z1\0")
    assert probe_fpga(tmp_path) == [
        {"kind": "vta-fpga", "design": None, "board": "pynq-z1", "manager": "fpga0",
         "state": "operating"}
    ]  # fmt: skip
    model.write_text("Some Other Board\0")
    assert probe_fpga(tmp_path)[0]["board"] == "Some Other Board"
