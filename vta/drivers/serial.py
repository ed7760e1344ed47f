"""The ``serial`` driver: VTA programs run by the firmware coprocessor over a serial line.

The device (``firmware/``, or its host build behind a pseudo-terminal) holds the DRAM; this
driver allocates in it, copies in and out with WRITE/READ frames and runs programs with RUN
(``vta.link`` is the protocol). Every request has a deadline; a damaged reply, or the device's
complaint about a damaged request, sends the request again with the same sequence number, which
the device answers from its copy of the last reply, so nothing runs twice. Garbage on the line
costs at most the frame it lands in. A device that disappears raises ``DeviceLostError``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import serial
import serial.tools.list_ports

from vta import link
from vta.config import VtaConfig, from_design_id
from vta.drivers.base import (
    DeviceBuffer,
    Driver,
    HostAllocated,
    HostData,
    check_span,
    host_bytes,
)
from vta.errors import (
    DeadlockError,
    DriverError,
    EncodingError,
    HlsError,
    SimulationError,
    VtaConfigError,
    VtaError,
)
from vta.isa import INSN_BYTES
from vta.link import Command, Status
from vta.sim import Counters

log = logging.getLogger(__name__)

DEFAULT_BAUD = 921600
#: How long a device may take to answer a request other than RUN, beyond the time on the wire.
ANSWER_S = 1.0
#: How long discovery waits for a port to answer the handshake (each attempt).
HELLO_TIMEOUT_S = 0.25
#: Sends of one request before it fails (the first and the retries).
ATTEMPTS = 8
#: How long a valid reply may trail a damaged frame before the request goes again.
SETTLE_S = 0.02
_RESERVED = 4096


class DeviceLostError(DriverError):
    """The coprocessor stopped answering or its port went away."""


class DeviceReplyError(DriverError):
    """The coprocessor refused a request (a link-level status such as OUT_OF_RANGE)."""

    def __init__(self, status: Status, message: str) -> None:
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class Coprocessor:
    """What a coprocessor's handshake says about it."""

    port: str
    design: str
    dram_bytes: int
    max_data: int

    def capability(self) -> dict[str, object]:
        return {
            "kind": "vta-serial",
            "design": self.design,
            "board": "serial",
            "port": self.port,
            "dram_bytes": self.dram_bytes,
        }


def _error(status: Status, message: str, where: str) -> VtaError:
    text = f"{where}: {message}"
    if status == Status.ENCODING:
        return EncodingError(text)
    if status == Status.SIMULATION:
        return SimulationError(text)
    if status == Status.HLS:
        return HlsError(text)
    if status == Status.DEADLOCK:
        return DeadlockError(text, {"device": message})
    return DeviceReplyError(status, f"{text} ({status.name})")


class SerialLink:
    """Requests and replies over one open port: framing, sequence numbers, retries, deadlines."""

    def __init__(self, port: serial.SerialBase, baudrate: int, answer_s: float = ANSWER_S) -> None:
        self.port = port
        self.answer_s = answer_s
        self.name = str(port.port)
        self.baudrate = baudrate
        self._seq = 0
        self._rx = bytearray()
        self.max_data = 256  # data bytes a frame carries; the handshake tells
        self.retries = 0  # requests sent again, for figures and tests

    def _settle_s(self) -> float:
        """After a damaged frame, how long a valid answer may still take to arrive (the damaged
        one may have been a stale duplicate) before the request is sent again."""
        return SETTLE_S + self.wire_s(2 * (self.max_data + 64))

    def wire_s(self, nbytes: int) -> float:
        """Seconds ``nbytes`` take on the line (10 bits a byte)."""
        return nbytes * 10 / self.baudrate

    def request(self, command: Command, body: bytes = b"", *, run_s: float | None = None) -> bytes:
        """Send one request and return the body of its reply. ``run_s`` is the time the device
        may compute (RUN); every request also gets ``answer_s`` and its time on the wire."""
        self._seq = (self._seq + 1) % link.NO_SEQ
        seq = self._seq
        frame = link.encode_frame(link.HEADER.pack(command, 0, seq) + body)
        answer_s = self.answer_s + self.wire_s(len(frame) + 64)
        # A RUN is sent again only after damage; silence past its deadline ends it.
        patience = answer_s if run_s is None else answer_s + run_s
        where = f"serial coprocessor {self.name}, {command.name}"
        for attempt in range(ATTEMPTS):
            if attempt:
                self.retries += 1
            self._write(frame, where)
            deadline = time.monotonic() + patience
            damaged = False  # a damaged frame arrived: the answer may have been lost
            while True:
                raw = self._read_frame(deadline, where)
                if raw is None and run_s is not None and not damaged:
                    raise DeviceLostError(
                        f"{where}: no answer within {patience:.1f} s: the program runs longer "
                        "than its deadline or the device hangs; reset the coprocessor"
                    )
                if raw is None:
                    break  # silence, or nothing valid after damage: send again
                try:
                    payload = link.decode_frame(raw)
                    got, status_code, got_seq = link.HEADER.unpack_from(payload)
                except link.FrameError as err:
                    log.debug("%s: damaged reply (%s)", where, err)
                    damaged = True
                    deadline = min(deadline, time.monotonic() + self._settle_s())
                    continue
                if got_seq == link.NO_SEQ and status_code in (Status.CRC, Status.FRAME):
                    log.debug("%s: the device got a damaged request", where)
                    damaged = True
                    deadline = min(deadline, time.monotonic() + self._settle_s())
                    continue
                if got_seq != seq or got != command:
                    continue  # the answer to an earlier request
                reply = payload[link.HEADER.size :]
                try:
                    status = Status(status_code)
                except ValueError:
                    status = Status.FRAME
                if status != Status.OK:
                    raise _error(status, reply.decode("utf-8", "replace"), where)
                return reply
        raise DeviceLostError(
            f"{where}: no valid answer after {ATTEMPTS} attempts of "
            f"{patience:.1f} s: check that the coprocessor is powered, connected and runs the "
            "firmware"
        )

    def _write(self, data: bytes, where: str) -> None:
        try:
            self.port.write(data)
            self.port.flush()
        except (serial.SerialException, OSError) as err:
            raise DeviceLostError(f"{where}: the port went away ({err}); reconnect it") from err

    def _read_frame(self, deadline: float, where: str) -> bytes | None:
        """The bytes up to the next delimiter, or None when the deadline passes first."""
        while True:
            end = self._rx.find(0)
            if end >= 0:
                raw = bytes(self._rx[:end])
                del self._rx[: end + 1]
                if raw:
                    return raw
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                self.port.timeout = left
                chunk = self.port.read(max(1, self.port.in_waiting))
            except (serial.SerialException, OSError) as err:
                raise DeviceLostError(
                    f"{where}: the device disappeared ({err}); reconnect it and restart"
                ) from err
            self._rx += chunk

    def write(self, address: int, data: bytes) -> None:
        """Write device memory at a physical ``address``, in frames of ``max_data`` bytes."""
        for start in range(0, len(data), self.max_data):
            chunk = data[start : start + self.max_data]
            self.request(Command.WRITE, (address + start).to_bytes(4, "little") + chunk)

    def read(self, address: int, nbytes: int) -> bytes:
        out = bytearray()
        for start in range(0, nbytes, self.max_data):
            length = min(self.max_data, nbytes - start)
            body = (address + start).to_bytes(4, "little") + length.to_bytes(4, "little")
            out += self.request(Command.READ, body)
        return bytes(out)

    def run(self, address: int, count: int, *, hls: bool, timeout_s: float) -> Counters:
        """Run ``count`` instructions at ``address``; the run's counters."""
        flags = link.RUN_FLAG_HLS if hls else 0
        body = address.to_bytes(4, "little") + count.to_bytes(4, "little") + bytes([flags])
        return Counters(*link.COUNTERS.unpack(self.request(Command.RUN, body, run_s=timeout_s)))

    def reset(self) -> None:
        """Clear the device's SRAM and DRAM, as at power-on."""
        self.request(Command.RESET)

    def hello(self, port: str) -> Coprocessor:
        # A lone delimiter ends whatever partial frame the device holds; stale input goes.
        self._write(b"\x00", f"serial coprocessor {self.name}")
        self.port.reset_input_buffer()
        self._rx.clear()
        reply = self.request(Command.HELLO, link.PROTOCOL_VERSION.to_bytes(2, "little"))
        if len(reply) < 10:
            raise DeviceReplyError(
                Status.BAD_LENGTH, f"{port}: a HELLO reply of {len(reply)} bytes"
            )
        version = int.from_bytes(reply[0:2], "little")
        if version != link.PROTOCOL_VERSION:
            raise DeviceReplyError(
                Status.VERSION,
                f"{port}: the firmware speaks protocol {version}, this driver "
                f"{link.PROTOCOL_VERSION}: update the firmware or the agent",
            )
        info = Coprocessor(
            port=port,
            design=reply[10:].decode("ascii", "replace"),
            dram_bytes=int.from_bytes(reply[2:6], "little"),
            max_data=int.from_bytes(reply[6:10], "little"),
        )
        self.max_data = info.max_data
        return info


class SerialDriver(HostAllocated, Driver):
    name = "serial"

    def __init__(
        self,
        port: str,
        *,
        baudrate: int = DEFAULT_BAUD,
        hls: bool = True,
        answer_s: float = ANSWER_S,
    ) -> None:
        """Open ``port`` (a device path or a pyserial URL) and shake hands. ``hls`` runs every
        program in the firmware's HLS-compatible mode, as a board would; ``answer_s`` is how
        long the device may take to answer (plus the time on the wire, plus a run's time)."""
        try:
            handle = serial.serial_for_url(port, baudrate=baudrate, timeout=HELLO_TIMEOUT_S)
        except (serial.SerialException, OSError, ValueError) as err:
            raise DriverError(f"cannot open serial port {port}: {err}") from err
        self.link = SerialLink(handle, baudrate, answer_s)
        try:
            self.info = self.link.hello(port)
            self.config: VtaConfig = from_design_id(self.info.design)
        except (VtaError, VtaConfigError):
            handle.close()
            raise
        self.hls = hls
        self.counters = Counters()  # of the last run
        super().__init__(_RESERVED, self.info.dram_bytes - _RESERVED)

    def copy_in(self, buffer: DeviceBuffer, data: HostData, offset: int = 0) -> None:
        self._check(buffer)
        raw = host_bytes(data)
        check_span(buffer, offset, raw.size, "copy in")
        self.link.write(buffer.addr + offset, raw.tobytes())

    def copy_out(self, buffer: DeviceBuffer, nbytes: int, offset: int = 0) -> bytes:
        self._check(buffer)
        check_span(buffer, offset, nbytes, "copy out")
        return self.link.read(buffer.addr + offset, nbytes)

    def run(self, program: DeviceBuffer, count: int, timeout_s: float) -> None:
        self._check(program)
        check_span(program, 0, count * INSN_BYTES, "program")
        self.counters = self.link.run(program.addr, count, hls=self.hls, timeout_s=timeout_s)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.link.port.close()


def candidate_ports(extra: Iterable[str] = ()) -> list[str]:
    """USB serial adapters the system lists, then ``extra`` (configured ports, pyserial URLs).

    Built-in UARTs are left out: they are often a console, and a handshake would write to it.
    """
    ports = [p.device for p in serial.tools.list_ports.comports() if p.vid is not None]
    return list(dict.fromkeys([*ports, *extra]))


def discover(extra: Iterable[str] = (), baudrate: int = DEFAULT_BAUD) -> list[Coprocessor]:
    """Every port whose device answers the firmware's handshake; the others are left alone."""
    found = []
    configured = set(extra)
    for port in candidate_ports(extra):
        try:
            driver = SerialDriver(port, baudrate=baudrate, answer_s=HELLO_TIMEOUT_S)
        except (VtaError, VtaConfigError) as err:
            # A port someone named in serial_ports deserves to hear why it is not used.
            report = log.warning if port in configured else log.debug
            report("serial port %s is not a VTA coprocessor: %s", port, err)
            continue
        found.append(driver.info)
        driver.close()
    return found
