"""A stand-in for the ``pynq`` package on a simulated Zynq board, for agent processes in tests
(put ``tests/support/fake_board`` on their PYTHONPATH and ``FAKE_BOARD_ROOT`` in their
environment).

The board is the directory ``FAKE_BOARD_ROOT`` (see ``tests.support.fake_board.make_board``): its
``sys/class/fpga_manager`` and ``proc/device-tree/model`` are what the agent probes. A "bitstream"
is a JSON file ``{"design": ID, "behaviour": ...}``: ``Bitstream(path).download()`` loads it into
the fabric (``fabric.json``) and appends it to ``programmed.log``. The fabric runs the loaded
design on the VTA simulator when the driver writes the start registers of VTA-ISA.md section 6,
so a program's results land in the memory ``allocate`` handed out. Behaviours: ``ok``;
``refuse`` (the FPGA manager rejects the file); ``hang`` (runs never finish); ``idle``
("finishes" without computing anything).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from vta.config import from_design_id
from vta.sim import Dram, Simulator

WINDOW = 0x1000
STORE_START = 3 * WINDOW  # the store module's control register, written last to start a run
_dram = np.zeros(256 << 20, np.uint8)
_next_free = 1 << 20
_registers: dict[int, int] = {}


def _root() -> Path:
    return Path(os.environ["FAKE_BOARD_ROOT"])


def _fabric() -> dict[str, Any]:
    path = _root() / "fabric.json"
    loaded: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    return loaded


class Bitstream:
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def download(self) -> None:
        root = _root()
        manager = root / "sys/class/fpga_manager/fpga0"
        with open(root / "programmed.log", "a") as log:
            log.write(f"{self.path}\n")
        try:
            design = json.loads(self.path.read_bytes())
            refused = design["behaviour"] == "refuse"
        except (ValueError, KeyError, TypeError) as err:
            refused, design = True, {"error": str(err)}
        if refused:
            (manager / "state").write_text("write init error\n")
            (root / "fabric.json").unlink(missing_ok=True)
            raise RuntimeError(f"the FPGA manager rejected {self.path}")
        (root / "fabric.json").write_text(json.dumps(design))
        (manager / "state").write_text("operating\n")


class MMIO:
    def __init__(self, base: int, length: int) -> None:
        self.base, self.length = base, length

    def read(self, offset: int) -> int:
        return _registers.get(self.base + offset, 0)

    def write(self, offset: int, value: int) -> None:
        address = self.base + offset
        _registers[address] = value
        if address % (4 * WINDOW) == STORE_START and value == 0x81:
            _run(address - STORE_START)


def _run(fetch: int) -> None:
    compute_done = fetch + 2 * WINDOW + 0x18
    _registers[compute_done] = 0
    fabric = _fabric()
    behaviour = fabric.get("behaviour")
    if behaviour == "hang":
        return
    if behaviour == "ok":
        count, address = _registers[fetch + 0x10], _registers[fetch + 0x18]
        program = _dram[address : address + 16 * count].tobytes()
        Simulator(from_design_id(fabric["design"]), Dram(_dram), hls=True).run(program)
    _registers[compute_done] = 1


class _Buffer(np.ndarray):  # type: ignore[type-arg]
    device_address: int

    def flush(self) -> None:
        pass

    def invalidate(self) -> None:
        pass

    def freebuffer(self) -> None:
        pass


def allocate(shape: tuple[int, ...], dtype: Any) -> _Buffer:
    global _next_free
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    address = _next_free
    _next_free += -(-nbytes // 4096) * 4096
    if _next_free > _dram.size:
        raise MemoryError("the fake board's memory is used up")
    buffer = _dram[address : address + nbytes].view(dtype).reshape(shape).view(_Buffer)
    buffer.device_address = address
    return buffer
