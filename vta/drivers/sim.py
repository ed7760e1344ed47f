"""The ``sim`` driver: the functional simulator behind the driver contract.

Device memory is a byte array whose offset is the physical address (address 0 is never handed
out). The simulator never blocks: a program that cannot finish raises ``DeadlockError``.
"""

from __future__ import annotations

from vta.config import VtaConfig
from vta.drivers.base import (
    DeviceBuffer,
    Driver,
    HostAllocated,
    HostData,
    check_span,
    host_bytes,
)
from vta.isa import INSN_BYTES
from vta.sim import Dram, Simulator

DEFAULT_DRAM_BYTES = 256 << 20
_RESERVED = 4096


class SimDriver(HostAllocated, Driver):
    name = "sim"

    def __init__(
        self, config: VtaConfig, *, dram_bytes: int = DEFAULT_DRAM_BYTES, hls: bool = False
    ) -> None:
        self.config = config
        self.dram = Dram.zeros(dram_bytes)
        self.simulator = Simulator(config, self.dram, hls=hls)
        super().__init__(_RESERVED, dram_bytes - _RESERVED)

    def copy_in(self, buffer: DeviceBuffer, data: HostData, offset: int = 0) -> None:
        self._check(buffer)
        raw = host_bytes(data)
        check_span(buffer, offset, raw.size, "copy in")
        start = buffer.addr + offset
        self.dram.data[start : start + raw.size] = raw

    def copy_out(self, buffer: DeviceBuffer, nbytes: int, offset: int = 0) -> bytes:
        self._check(buffer)
        check_span(buffer, offset, nbytes, "copy out")
        start = buffer.addr + offset
        return self.dram.data[start : start + nbytes].tobytes()

    def run(self, program: DeviceBuffer, count: int, timeout_s: float) -> None:
        # The simulator runs synchronously and raises instead of hanging, so the deadline of
        # the contract has nothing to bound here.
        self._check(program)
        check_span(program, 0, count * INSN_BYTES, "program")
        self.simulator.run(self.copy_out(program, count * INSN_BYTES))

    def close(self) -> None:
        self._closed = True
