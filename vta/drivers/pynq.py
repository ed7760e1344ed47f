"""The ``pynq`` driver: VTA bitstreams on Zynq boards through the ``pynq`` package.

Follows VTA-ISA.md section 6: the bitstream is programmed with ``pynq.Bitstream(path).download()``
(the published VTA bitstreams have no .hwh, so no ``Overlay``), the four modules' registers are
mapped with ``pynq.MMIO``, and buffers come from ``pynq.allocate`` (physically contiguous; each is
over-allocated so the handed-out address is aligned as the DMA needs). ``copy_in`` flushes the CPU
cache, ``copy_out`` invalidates it. ``pynq`` is imported when a driver opens, never on import.

The compute stage's "done" register keeps the previous run's 1 until a GEMM or ALU op runs, so
``run`` accepts only streams that begin with one (``vta.runtime.CLEAR_DONE``, which every
``ProgramBuilder`` stream starts with) and then polls for 1 until the deadline.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from vta import isa
from vta.config import VtaConfig
from vta.drivers.base import DeviceBuffer, Driver, HostData, check_span, host_bytes
from vta.errors import DriverError

REGISTER_WINDOW = 0x1000
FETCH, LOAD, COMPUTE, STORE = range(4)
# Register offsets of the HLS modules (VTA-ISA.md section 6).
CONTROL = 0x00
FETCH_COUNT, FETCH_ADDRESS = 0x10, 0x18
COMPUTE_DONE = 0x18
START, AUTO_RESTART = 0x1, 0x81
#: Registers cleared before every run: (module, offset).
CLEARED = ((LOAD, 0x10), (LOAD, 0x18), (COMPUTE, 0x20), (COMPUTE, 0x28), (STORE, 0x10))
POLL_S = 1e-4


@dataclass(frozen=True)
class Board:
    name: str
    registers: int  # the fetch module's window; load, compute and store follow 0x1000 apart
    device_tree_model: str  # what /proc/device-tree/model starts with on this board
    zynqmp: bool  # Zynq UltraScale+: the PS port widths may need setting after programming


BOARDS = {
    board.name: board
    for board in (
        Board("pynq-z1", 0x43C00000, "TUL PYNQ-Z1", zynqmp=False),
        Board("ultra96", 0xA0000000, "Avnet Ultra96", zynqmp=True),
        Board("zcu104", 0xA0000000, "ZynqMP ZCU104", zynqmp=True),
    )
}


@dataclass(frozen=True)
class PortWidth:
    """Where a ZynqMP PS port's data width is set: a 2-bit field at ``shift`` in each of
    ``registers`` (physical addresses), holding ``codes[width]``."""

    registers: tuple[int, ...]
    shift: int
    codes: dict[int, int]


_MASTER = {32: 0, 64: 1, 128: 2}  # FPD_SLCR AXI_FS: DW_SS0_SEL, DW_SS1_SEL
_SLAVE = {128: 0, 64: 1, 32: 2}  # AFIFM RDCTRL and WRCTRL: FABRIC_WIDTH
PORT_WIDTHS = {
    "m_axi_hpm0_fpd": PortWidth((0xFD615000,), 8, _MASTER),
    "m_axi_hpm1_fpd": PortWidth((0xFD615000,), 10, _MASTER),
    **{
        port: PortWidth((base, base + 0x14), 0, _SLAVE)
        for port, base in (
            ("s_axi_hpc0_fpd", 0xFD360000),
            ("s_axi_hpc1_fpd", 0xFD370000),
            ("s_axi_hp0_fpd", 0xFD380000),
            ("s_axi_hp1_fpd", 0xFD390000),
            ("s_axi_hp2_fpd", 0xFD3A0000),
            ("s_axi_hp3_fpd", 0xFD3B0000),
        )
    },
}


def board_of(model: str) -> Board | None:
    """The board whose device-tree model string ``model`` is, if it is one the driver knows."""
    for board in BOARDS.values():
        if model.startswith(board.device_tree_model):
            return board
    return None


def probe_fpga(root: Path = Path("/")) -> list[dict[str, Any]]:
    """The FPGA managers the kernel exposes under ``root`` (``/sys/class/fpga_manager``), with
    the board the device tree names. Which design an FPGA holds is not readable from the
    hardware, so none is reported; a board this driver does not know is reported by its model."""
    managers = sorted((root / "sys/class/fpga_manager").glob("*/state"))
    if not managers:
        return []
    model_file = root / "proc/device-tree/model"
    model = model_file.read_text().strip("\0\n ") if model_file.is_file() else ""
    board = board_of(model)
    return [
        {
            "kind": "vta-fpga",
            "design": None,
            "board": board.name if board else model,
            "manager": state.parent.name,
            "state": state.read_text().strip(),
        }
        for state in managers
    ]


def import_pynq() -> ModuleType:
    try:
        return importlib.import_module("pynq")
    except ImportError as err:
        raise DriverError(
            "the pynq package is not installed: install the board's PYNQ image or "
            "`pip install mlinferbooster[pynq]`"
        ) from err


def program(bitstream: Path, board: Board, axi_widths: dict[str, int], pynq: ModuleType) -> None:
    """Load ``bitstream`` into ``board``'s FPGA (needs root), then give the ZynqMP PS ports the
    widths the design was built with: PYNQ learns them from a .hwh, which VTA bitstreams lack."""
    try:
        pynq.Bitstream(str(bitstream)).download()
    except (OSError, RuntimeError, ValueError) as err:
        raise DriverError(f"programming the FPGA with {bitstream} failed: {err}") from err
    if axi_widths and not board.zynqmp:
        raise DriverError(f"{board.name} has no settable AXI port widths")
    for port, width in sorted(axi_widths.items()):
        spec = PORT_WIDTHS[port]
        for register in spec.registers:
            page = pynq.MMIO(register & ~(REGISTER_WINDOW - 1), REGISTER_WINDOW)
            offset = register & (REGISTER_WINDOW - 1)
            value = page.read(offset) & ~(0b11 << spec.shift)
            page.write(offset, value | spec.codes[width] << spec.shift)


class PynqDriver(Driver):
    name = "pynq"

    def __init__(self, config: VtaConfig, board: Board, pynq: ModuleType | None = None) -> None:
        """Drive the VTA design ``config`` already programmed into ``board``'s FPGA; ``pynq``
        is the package (imported when not given)."""
        self.config = config
        self.board = board
        self._pynq = pynq or import_pynq()
        self._mmio = [
            self._pynq.MMIO(board.registers + k * REGISTER_WINDOW, REGISTER_WINDOW)
            for k in (FETCH, LOAD, COMPUTE, STORE)
        ]
        self._buffers: dict[int, tuple[Any, int]] = {}  # address -> (pynq buffer, offset)
        self._closed = False

    def _buffer(self, buffer: DeviceBuffer) -> tuple[Any, int]:
        if self._closed:
            raise DriverError("the pynq driver is closed")
        found = self._buffers.get(buffer.addr)
        if found is None or found[0].nbytes - found[1] < buffer.nbytes:
            raise DriverError(f"{buffer} is not a live buffer of this device (freed twice?)")
        return found

    def alloc(self, nbytes: int, align: int) -> DeviceBuffer:
        if self._closed:
            raise DriverError("the pynq driver is closed")
        if nbytes <= 0 or align <= 0 or align & (align - 1):
            raise DriverError(
                f"cannot allocate {nbytes} bytes aligned to {align}: need a positive size and a "
                "power-of-two alignment"
            )
        try:
            raw = self._pynq.allocate(shape=(nbytes + align - 1,), dtype=np.uint8)
        except (MemoryError, RuntimeError, OSError) as err:
            raise DriverError(
                f"out of contiguous memory for {nbytes} bytes: free buffers or enlarge the CMA "
                f"region ({err})"
            ) from err
        offset = -int(raw.device_address) % align
        address = int(raw.device_address) + offset
        self._buffers[address] = (raw, offset)
        return DeviceBuffer(address, nbytes)

    def free(self, buffer: DeviceBuffer) -> None:
        raw, _ = self._buffer(buffer)
        del self._buffers[buffer.addr]
        raw.freebuffer()

    def copy_in(self, buffer: DeviceBuffer, data: HostData, offset: int = 0) -> None:
        raw, start = self._buffer(buffer)
        values = host_bytes(data)
        check_span(buffer, offset, values.size, "copy in")
        raw[start + offset : start + offset + values.size] = values
        raw.flush()

    def copy_out(self, buffer: DeviceBuffer, nbytes: int, offset: int = 0) -> bytes:
        raw, start = self._buffer(buffer)
        check_span(buffer, offset, nbytes, "copy out")
        raw.invalidate()
        return bytes(raw[start + offset : start + offset + nbytes])

    def run(self, program: DeviceBuffer, count: int, timeout_s: float) -> None:
        raw, start = self._buffer(program)
        check_span(program, 0, count * isa.INSN_BYTES, "program")
        first = isa.decode(int.from_bytes(bytes(raw[start : start + 16]), "little"), self.config)
        if count == 0 or not isinstance(first, isa.GemmInsn | isa.AluInsn):
            raise DriverError(
                "a stream for the FPGA must start with a GEMM or ALU op, which clears the stale "
                "'done' of the last run (build it with vta.runtime.ProgramBuilder)"
            )
        fetch, load, compute, store = self._mmio
        fetch.write(FETCH_COUNT, count)
        fetch.write(FETCH_ADDRESS, program.addr)
        for module, offset in CLEARED:
            self._mmio[module].write(offset, 0)
        fetch.write(CONTROL, START)
        for module in (load, compute, store):
            module.write(CONTROL, AUTO_RESTART)
        deadline = time.monotonic() + timeout_s
        while compute.read(COMPUTE_DONE) != 1:
            if time.monotonic() > deadline:
                raise DriverError(
                    f"the FPGA did not finish {count} instructions within {timeout_s} s: the "
                    "design may be hung; program the bitstream again"
                )
            time.sleep(POLL_S)

    def close(self) -> None:
        """Release every buffer still allocated (the registers need no release)."""
        if self._closed:
            return
        self._closed = True
        for raw, _ in self._buffers.values():
            raw.freebuffer()
        self._buffers.clear()
