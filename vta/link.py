"""The serial coprocessor's wire protocol: frames, commands, statuses (no I/O here).

A frame is ``payload || crc32(payload)`` (little-endian, zlib's CRC-32), COBS-encoded, followed
by a zero byte: zero never occurs inside an encoded frame, so a receiver that sees garbage drops
bytes up to the next zero and is back in step. A request payload is ``command, flags, seq``
(``<BBH``) and a body; the reply echoes the command and the sequence number and carries a status
(``<BBH``: command, status, seq). A request repeated with the same sequence number is answered
from the device's copy of its last reply, so retrying after a lost or corrupted reply never runs
a command twice. The firmware's header (``vta_hw.h``) is generated from these tables.

Bodies (all integers little-endian):

=========  =====================================  ==============================================
command    request body                           reply body (status OK)
=========  =====================================  ==============================================
HELLO      u16 protocol version                   u16 version, u32 DRAM bytes, u32 max data
                                                  bytes per frame, design id (ASCII)
WRITE      u32 address, data                      empty
READ       u32 address, u32 length                the data
RUN        u32 program address, u32 instruction   the run's 7 counters, u64 each, in the order
           count, u8 flags (bit 0: HLS mode)      of ``vta.sim.Counters``
RESET      empty                                  empty (SRAM, counters and DRAM cleared)
=========  =====================================  ==============================================

A reply with another status carries a UTF-8 message that says what went wrong.
"""

from __future__ import annotations

import enum
import struct
import zlib

PROTOCOL_VERSION = 1
#: Header of every payload: command, flags (requests) or status (replies), sequence number.
HEADER = struct.Struct("<BBH")
RUN_FLAG_HLS = 0x01
#: Sequence number of a reply to a frame whose own sequence number could not be trusted.
NO_SEQ = 0xFFFF
COUNTERS = struct.Struct("<7Q")


class Command(enum.IntEnum):
    HELLO = 1
    WRITE = 2
    READ = 3
    RUN = 4
    RESET = 5


class Status(enum.IntEnum):
    OK = 0
    CRC = 1  # the request arrived damaged: send it again
    FRAME = 2  # the request is too long or not valid COBS
    UNKNOWN_COMMAND = 3
    BAD_LENGTH = 4  # the body does not have the command's length
    OUT_OF_RANGE = 5  # an address range outside the device's DRAM
    ENCODING = 6  # an instruction does not decode
    SIMULATION = 7  # the program breaks an ISA rule
    HLS = 8  # the program uses what the FPGA design cannot run (HLS mode)
    DEADLOCK = 9
    VERSION = 10  # the device does not speak the requested protocol version


class FrameError(ValueError):
    """Bytes between two delimiters that are not a frame (bad COBS, short, CRC mismatch)."""


def cobs_encode(data: bytes) -> bytes:
    out = bytearray()
    block = bytearray()
    for byte in data:
        if byte:
            block.append(byte)
            if len(block) == 254:
                out += bytes([255]) + block
                block.clear()
        else:
            out += bytes([len(block) + 1]) + block
            block.clear()
    out += bytes([len(block) + 1]) + block
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(data):
        code = data[i]
        if code == 0 or i + code > len(data):
            raise FrameError(f"not COBS: code {code} at byte {i} of {len(data)}")
        block = data[i + 1 : i + code]
        if 0 in block:
            raise FrameError("not COBS: a zero byte inside a block")
        out += block
        i += code
        if code < 255 and i < len(data):
            out.append(0)
    return bytes(out)


def encode_frame(payload: bytes) -> bytes:
    """``payload`` with its CRC, COBS-encoded and delimited: ready for the wire."""
    return cobs_encode(payload + zlib.crc32(payload).to_bytes(4, "little")) + b"\x00"


def decode_frame(encoded: bytes) -> bytes:
    """The payload of one frame (without its delimiter); raises ``FrameError`` when damaged."""
    raw = cobs_decode(encoded)
    if len(raw) < HEADER.size + 4:
        raise FrameError(f"a frame of {len(raw)} bytes is shorter than a header and a CRC")
    payload, crc = raw[:-4], int.from_bytes(raw[-4:], "little")
    if zlib.crc32(payload) != crc:
        raise FrameError("CRC mismatch")
    return payload
