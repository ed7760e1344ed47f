"""The driver contract every VTA backend implements, and the physical-address allocator.

A driver owns device memory (physical addresses the instructions carry) and runs an instruction
stream that lives in that memory. Backends: ``sim`` (the functional simulator), ``serial`` (the
firmware coprocessor), ``pynq`` (Zynq FPGA boards) and ``null`` (accepts work, refuses to return
results).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from vta.config import VtaConfig
from vta.errors import DriverError

#: What ``copy_in`` accepts: anything exposing a contiguous byte buffer.
HostData = bytes | bytearray | memoryview | NDArray[np.generic]


@dataclass(frozen=True)
class DeviceBuffer:
    """A block of device memory; ``addr`` is the physical byte address instructions use."""

    addr: int
    nbytes: int


class Driver(Protocol):
    """Allocate, copy in, copy out, run, close. Every backend is one module behind this."""

    name: str
    config: VtaConfig

    def alloc(self, nbytes: int, align: int) -> DeviceBuffer: ...

    def free(self, buffer: DeviceBuffer) -> None: ...

    def copy_in(self, buffer: DeviceBuffer, data: HostData, offset: int = 0) -> None: ...

    def copy_out(self, buffer: DeviceBuffer, nbytes: int, offset: int = 0) -> bytes: ...

    def run(self, program: DeviceBuffer, count: int, timeout_s: float) -> None:
        """Run ``count`` instructions stored at ``program`` until FINISH or the deadline."""

    def close(self) -> None: ...

    def __enter__(self) -> Driver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def host_bytes(data: HostData) -> NDArray[np.uint8]:
    """The bytes of a host object as a flat uint8 array (no copy when possible)."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)


def check_span(buffer: DeviceBuffer, offset: int, nbytes: int, what: str) -> None:
    if offset < 0 or nbytes < 0 or offset + nbytes > buffer.nbytes:
        raise DriverError(
            f"{what} of {nbytes} bytes at offset {offset} does not fit the {buffer.nbytes}-byte "
            f"buffer at {buffer.addr:#x}"
        )


class HostAllocated:
    """What drivers share whose device memory is allocated on the host: the allocator over the
    device's physical range, live-buffer checks and the closed state."""

    name: str

    def __init__(self, base: int, size: int) -> None:
        self._allocator = Allocator(base, size)
        self._closed = False

    def _check(self, buffer: DeviceBuffer | None) -> None:
        if self._closed:
            raise DriverError(f"the {self.name} driver is closed")
        if buffer is not None:
            self._allocator.check(buffer)

    def alloc(self, nbytes: int, align: int) -> DeviceBuffer:
        self._check(None)
        return self._allocator.alloc(nbytes, align)

    def free(self, buffer: DeviceBuffer) -> None:
        self._check(None)
        self._allocator.free(buffer)


class Allocator:
    """First-fit allocation of aligned buffers in the physical range ``[base, base + size)``."""

    def __init__(self, base: int, size: int) -> None:
        self._free: list[tuple[int, int]] = [(base, base + size)]  # sorted (start, end)
        self._live: dict[int, tuple[int, int]] = {}  # addr -> (block start, block end)

    def alloc(self, nbytes: int, align: int) -> DeviceBuffer:
        if nbytes <= 0 or align <= 0 or align & (align - 1):
            raise DriverError(
                f"cannot allocate {nbytes} bytes aligned to {align}: need a positive size and a "
                "power-of-two alignment"
            )
        for i, (start, end) in enumerate(self._free):
            addr = -(-start // align) * align
            if addr + nbytes <= end:
                del self._free[i]
                if addr + nbytes < end:
                    self._free.insert(i, (addr + nbytes, end))
                if start < addr:
                    self._free.insert(i, (start, addr))
                self._live[addr] = (addr, addr + nbytes)
                return DeviceBuffer(addr, nbytes)
        raise DriverError(
            f"out of device memory: no free block of {nbytes} bytes aligned to {align}; free "
            "buffers or give the device more memory"
        )

    def check(self, buffer: DeviceBuffer) -> None:
        """Raise unless ``buffer`` is a live allocation of this allocator."""
        if self._live.get(buffer.addr) != (buffer.addr, buffer.addr + buffer.nbytes):
            raise DriverError(f"{buffer} is not a live buffer of this device (freed twice?)")

    def free(self, buffer: DeviceBuffer) -> None:
        self.check(buffer)
        start, end = self._live.pop(buffer.addr)
        i = bisect.bisect(self._free, (start, end))
        if i < len(self._free) and self._free[i][0] == end:
            end = self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][1] == start:
            start = self._free.pop(i - 1)[0]
            i -= 1
        self._free.insert(i, (start, end))
