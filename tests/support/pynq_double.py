"""A scripted stand-in for the ``pynq`` package: every access the driver makes (allocations,
cache maintenance, register writes and reads, bitstream downloads) must be the next one the test
expects, in order. It checks our side of the contract and computes nothing."""

from __future__ import annotations

from typing import Any

import numpy as np

Event = tuple[Any, ...]
#: The register pages by name: pynq-z1's VTA modules, and the ZynqMP port width registers.
MODULES = {
    0x43C00000: "fetch", 0x43C01000: "load", 0x43C02000: "compute", 0x43C03000: "store",
    0xFD615000: "fpd_slcr", 0xFD360000: "afifm0",
}  # fmt: skip


class FakeBuffer(np.ndarray):  # type: ignore[type-arg]
    device_address: int
    double: ScriptedPynq

    def flush(self) -> None:
        self.double.access("flush", self.device_address)

    def invalidate(self) -> None:
        self.double.access("invalidate", self.device_address)

    def freebuffer(self) -> None:
        self.double.access("free", self.device_address)


class ScriptedMmio:
    def __init__(self, double: ScriptedPynq, name: str) -> None:
        self.double, self.name = double, name

    def write(self, offset: int, value: int) -> None:
        self.double.access("write", self.name, offset, value)

    def read(self, offset: int) -> int:
        value = self.double.access("read", self.name, offset)
        assert isinstance(value, int)
        return value


class ScriptedPynq:
    """Pass as the driver's ``pynq``. ``expect`` queues accesses; a read's expected event ends
    with the value it returns, an allocation's with the device address it gets."""

    def __init__(self) -> None:
        self.expected: list[Event] = []
        self.seen: list[Event] = []

    def expect(self, *events: Event) -> None:
        self.expected.extend(events)

    def access(self, *event: Any) -> object:
        assert self.expected, f"unexpected access {event}; nothing more was expected"
        want = self.expected.pop(0)
        answers = want[:0]
        if want[0] in ("read", "allocate"):
            want, answers = want[:-1], want[-1:]
        assert event == want, f"access {len(self.seen)}: expected {want}, got {event}"
        self.seen.append(event)
        return answers[0] if answers else None

    def assert_done(self) -> None:
        assert not self.expected, f"expected accesses that never happened: {self.expected}"

    # -- the pynq API the driver uses ------------------------------------------------------

    def MMIO(self, base: int, length: int) -> ScriptedMmio:  # noqa: N802 (pynq's name)
        assert length == 0x1000
        return ScriptedMmio(self, MODULES[base])

    def allocate(self, shape: tuple[int], dtype: type) -> FakeBuffer:
        address = self.access("allocate", shape[0])
        buffer = np.zeros(shape, dtype=dtype).view(FakeBuffer)
        buffer.device_address = int(address)  # type: ignore[call-overload]
        buffer.double = self
        return buffer

    def Bitstream(self, path: str) -> _Bitstream:  # noqa: N802 (pynq's name)
        return _Bitstream(self, path)


class _Bitstream:
    def __init__(self, double: ScriptedPynq, path: str) -> None:
        self.double, self.path = double, path

    def download(self) -> None:
        self.double.access("download", self.path)
