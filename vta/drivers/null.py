"""The ``null`` driver: accepts allocations, copies and runs, and refuses to invent results.

Useful to exercise the host side of a program (building, uploading, running) where no device
exists; reading anything back raises, so nothing downstream can mistake silence for an answer.
"""

from __future__ import annotations

from vta.config import VtaConfig
from vta.drivers.base import Allocator, DeviceBuffer, Driver, HostData, check_span, host_bytes
from vta.errors import DriverError
from vta.isa import INSN_BYTES

_ADDRESS_SPACE = 1 << 32
_RESERVED = 4096


class NullDriver(Driver):
    name = "null"

    def __init__(self, config: VtaConfig) -> None:
        self.config = config
        self._allocator = Allocator(_RESERVED, _ADDRESS_SPACE - _RESERVED)

    def alloc(self, nbytes: int, align: int) -> DeviceBuffer:
        return self._allocator.alloc(nbytes, align)

    def free(self, buffer: DeviceBuffer) -> None:
        self._allocator.free(buffer)

    def copy_in(self, buffer: DeviceBuffer, data: HostData, offset: int = 0) -> None:
        self._allocator.check(buffer)
        check_span(buffer, offset, host_bytes(data).size, "copy in")

    def copy_out(self, buffer: DeviceBuffer, nbytes: int, offset: int = 0) -> bytes:
        raise DriverError(
            "the null driver computes nothing and returns no results; use the sim driver or "
            "real hardware to read data back"
        )

    def run(self, program: DeviceBuffer, count: int, timeout_s: float) -> None:
        self._allocator.check(program)
        check_span(program, 0, count * INSN_BYTES, "program")

    def close(self) -> None:
        """Nothing to release."""
