"""The VTA instruction set as data.

One table of ``(field, width)`` per instruction kind drives the encoder, the decoder and the
disassembler (and, later, the firmware's C header). Field widths that depend on the design come
from the configuration; fields are packed from bit 0 in table order, and a field that would
straddle bit 64 starts at bit 64 instead (VTA-ISA.md section 2.1).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vta.errors import EncodingError

if TYPE_CHECKING:
    from vta.config import VtaConfig

OPCODE_BITS = 3
MEMORY_TYPE_BITS = 3
SRAM_ADDR_BITS = 16
DRAM_ADDR_BITS = 32
SIZE_BITS = 16
STRIDE_BITS = 16
PAD_BITS = 4
ITER_BITS = 14
ALU_OPCODE_BITS = 3
IMM_BITS = 16
INSN_BYTES = 16
UOP_BYTES = 4


class Opcode(enum.IntEnum):
    LOAD = 0
    STORE = 1
    GEMM = 2
    FINISH = 3
    ALU = 4


class MemId(enum.IntEnum):
    UOP = 0
    WGT = 1
    INP = 2
    ACC = 3
    OUT = 4
    ACC_8BIT = 5


class AluOp(enum.IntEnum):
    MIN = 0
    MAX = 1
    ADD = 2
    SHR = 3
    MUL = 4


class Stage(enum.IntEnum):
    """The three hardware modules, each fed by its own instruction queue."""

    LOAD = 0
    COMPUTE = 1
    STORE = 2


# -- instructions -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Insn:
    """Dependency flags every instruction carries (bits 3..6)."""

    pop_prev: bool = False
    pop_next: bool = False
    push_prev: bool = False
    push_next: bool = False

    @property
    def opcode(self) -> Opcode:
        raise NotImplementedError

    @property
    def stage(self) -> Stage:
        """The queue the fetch module routes this instruction to."""
        return Stage.COMPUTE


@dataclass(frozen=True, kw_only=True)
class MemInsn(Insn):
    """LOAD or STORE of a 2-D block; the DRAM address counts elements of ``memory_type``."""

    is_store: bool = False
    memory_type: MemId
    sram_base: int
    dram_base: int
    y_size: int
    x_size: int
    x_stride: int
    y_pad_0: int = 0
    y_pad_1: int = 0
    x_pad_0: int = 0
    x_pad_1: int = 0

    @property
    def opcode(self) -> Opcode:
        return Opcode.STORE if self.is_store else Opcode.LOAD

    @property
    def pads(self) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) zero padding."""
        return (self.y_pad_0, self.y_pad_1, self.x_pad_0, self.x_pad_1)

    @property
    def stage(self) -> Stage:
        if self.is_store:
            return Stage.STORE
        if self.memory_type in (MemId.INP, MemId.WGT):
            return Stage.LOAD
        return Stage.COMPUTE


@dataclass(frozen=True, kw_only=True)
class LoopInsn(Insn):
    """What GEMM and ALU share: a micro-op range run inside two affine loops."""

    reset: bool = False
    uop_bgn: int
    uop_end: int
    iter_out: int
    iter_in: int
    dst_factor_out: int
    dst_factor_in: int
    src_factor_out: int
    src_factor_in: int


@dataclass(frozen=True, kw_only=True)
class GemmInsn(LoopInsn):
    wgt_factor_out: int = 0
    wgt_factor_in: int = 0

    @property
    def opcode(self) -> Opcode:
        return Opcode.GEMM


@dataclass(frozen=True, kw_only=True)
class AluInsn(LoopInsn):
    alu_opcode: AluOp
    use_imm: bool = False
    imm: int = 0

    @property
    def opcode(self) -> Opcode:
        return Opcode.ALU


@dataclass(frozen=True, kw_only=True)
class FinishInsn(Insn):
    @property
    def opcode(self) -> Opcode:
        return Opcode.FINISH


@dataclass(frozen=True)
class Uop:
    """A micro-op: accumulator index, input (GEMM) or accumulator (ALU) index, weight index."""

    dst: int
    src: int
    wgt: int = 0


# -- layouts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    name: str
    lo: int
    width: int
    signed: bool = False

    @property
    def hi(self) -> int:
        return self.lo + self.width - 1


@dataclass(frozen=True)
class Layout:
    kind: str
    fields: tuple[Field, ...]

    @property
    def bits(self) -> int:
        return max(f.hi for f in self.fields) + 1

    def pack(self, values: dict[str, int], what: str) -> int:
        word = 0
        for f in self.fields:
            value = int(values[f.name])
            low, high = (
                (-(1 << (f.width - 1)), (1 << (f.width - 1)) - 1)
                if f.signed
                else (
                    0,
                    (1 << f.width) - 1,
                )
            )
            if not low <= value <= high:
                raise EncodingError(
                    f"{what}: {f.name} = {value} does not fit its {f.width}-bit field "
                    f"({low}..{high})"
                )
            word |= (value & ((1 << f.width) - 1)) << f.lo
        return word

    def unpack(self, word: int) -> dict[str, int]:
        values = {}
        for f in self.fields:
            value = (word >> f.lo) & ((1 << f.width) - 1)
            if f.signed and value >> (f.width - 1):
                value -= 1 << f.width
            values[f.name] = value
        return values


def _place(kind: str, spec: Sequence[tuple[str, int, bool]]) -> Layout:
    """Pack fields from bit 0; one that would straddle bit 64 starts at bit 64 (hw_spec.h)."""
    placed = []
    lo = 0
    for name, width, signed in spec:
        if lo < 64 < lo + width:
            lo = 64
        placed.append(Field(name, lo, width, signed))
        lo += width
    return Layout(kind, tuple(placed))


_COMMON = (
    ("opcode", OPCODE_BITS, False),
    ("pop_prev", 1, False),
    ("pop_next", 1, False),
    ("push_prev", 1, False),
    ("push_next", 1, False),
)


@functools.cache
def layouts(cfg: VtaConfig) -> dict[str, Layout]:
    """The field tables of every instruction kind and of the micro-op, for one design."""
    loop = (
        ("reset", 1, False),
        ("uop_bgn", cfg.log_uop_depth, False),
        ("uop_end", cfg.log_uop_depth + 1, False),
        ("iter_out", ITER_BITS, False),
        ("iter_in", ITER_BITS, False),
        ("dst_factor_out", cfg.log_acc_depth, False),
        ("dst_factor_in", cfg.log_acc_depth, False),
        # The ALU's source is an accumulator index, but the original design gives the source
        # factors (and the micro-op source field) the input buffer's index width for both kinds.
        ("src_factor_out", cfg.log_inp_depth, False),
        ("src_factor_in", cfg.log_inp_depth, False),
    )
    return {
        "MEM": _place(
            "MEM",
            (
                *_COMMON,
                ("memory_type", MEMORY_TYPE_BITS, False),
                ("sram_base", SRAM_ADDR_BITS, False),
                ("dram_base", DRAM_ADDR_BITS, False),
                ("y_size", SIZE_BITS, False),
                ("x_size", SIZE_BITS, False),
                ("x_stride", STRIDE_BITS, False),
                ("y_pad_0", PAD_BITS, False),
                ("y_pad_1", PAD_BITS, False),
                ("x_pad_0", PAD_BITS, False),
                ("x_pad_1", PAD_BITS, False),
            ),
        ),
        "GEMM": _place(
            "GEMM",
            (
                *_COMMON,
                *loop,
                ("wgt_factor_out", cfg.log_wgt_depth, False),
                ("wgt_factor_in", cfg.log_wgt_depth, False),
            ),
        ),
        "ALU": _place(
            "ALU",
            (
                *_COMMON,
                *loop,
                ("alu_opcode", ALU_OPCODE_BITS, False),
                ("use_imm", 1, False),
                ("imm", IMM_BITS, True),
            ),
        ),
        "FINISH": _place("FINISH", _COMMON),
        "UOP": _place(
            "UOP",
            (
                ("dst", cfg.log_acc_depth, False),
                ("src", cfg.log_inp_depth, False),
                ("wgt", cfg.log_wgt_depth, False),
            ),
        ),
    }


_FLAGS = ("pop_prev", "pop_next", "push_prev", "push_next")
_KIND = {
    Opcode.LOAD: "MEM",
    Opcode.STORE: "MEM",
    Opcode.GEMM: "GEMM",
    Opcode.ALU: "ALU",
    Opcode.FINISH: "FINISH",
}


def _kind(insn: Insn) -> str:
    return _KIND[insn.opcode]


def _values(insn: Insn) -> dict[str, int]:
    values = {f.name: getattr(insn, f.name) for f in dataclasses.fields(insn)}
    values["opcode"] = insn.opcode
    return values


# -- encoder and decoder ------------------------------------------------------------------------


def encode(insn: Insn, cfg: VtaConfig) -> int:
    """The 128-bit instruction word (bit 0 of the int is bit 0 of the instruction)."""
    return layouts(cfg)[_kind(insn)].pack(_values(insn), type(insn).__name__)


def decode(word: int, cfg: VtaConfig, where: str = "instruction") -> Insn:
    try:
        opcode = Opcode(word & ((1 << OPCODE_BITS) - 1))
    except ValueError as err:
        raise EncodingError(f"{where}: unknown opcode {word & 7} (expected 0..4)") from err
    values: dict[str, Any] = layouts(cfg)[_KIND[opcode]].unpack(word)
    del values["opcode"]
    flags = {k: bool(values.pop(k)) for k in _FLAGS}
    if opcode in (Opcode.LOAD, Opcode.STORE):
        try:
            memory_type = MemId(values.pop("memory_type"))
        except ValueError as err:
            raise EncodingError(f"{where}: unknown memory type (expected 0..5)") from err
        return MemInsn(**flags, is_store=opcode == Opcode.STORE, memory_type=memory_type, **values)
    if opcode == Opcode.GEMM:
        reset = bool(values.pop("reset"))
        return GemmInsn(**flags, reset=reset, **values)
    if opcode == Opcode.ALU:
        reset = bool(values.pop("reset"))
        use_imm = bool(values.pop("use_imm"))
        try:
            alu_opcode = AluOp(values.pop("alu_opcode"))
        except ValueError as err:
            raise EncodingError(f"{where}: unknown ALU opcode (expected 0..4)") from err
        return AluInsn(**flags, reset=reset, use_imm=use_imm, alu_opcode=alu_opcode, **values)
    return FinishInsn(**flags)


def encode_uop(uop: Uop, cfg: VtaConfig) -> int:
    return layouts(cfg)["UOP"].pack(dataclasses.asdict(uop), "Uop")


def decode_uop(word: int, cfg: VtaConfig) -> Uop:
    return Uop(**layouts(cfg)["UOP"].unpack(word))


def encode_program(insns: Iterable[Insn], cfg: VtaConfig) -> bytes:
    """Raw little-endian 128-bit instructions, the format of program files and DRAM streams."""
    return b"".join(encode(insn, cfg).to_bytes(INSN_BYTES, "little") for insn in insns)


def decode_program(data: bytes, cfg: VtaConfig) -> list[Insn]:
    if len(data) % INSN_BYTES:
        raise EncodingError(
            f"a program is a sequence of {INSN_BYTES}-byte instructions; got {len(data)} bytes "
            f"({len(data) % INSN_BYTES} left over)"
        )
    return [
        decode(
            int.from_bytes(data[i : i + INSN_BYTES], "little"),
            cfg,
            f"instruction {i // INSN_BYTES}",
        )
        for i in range(0, len(data), INSN_BYTES)
    ]


def encode_uops(uops: Iterable[Uop], cfg: VtaConfig) -> bytes:
    return b"".join(encode_uop(u, cfg).to_bytes(UOP_BYTES, "little") for u in uops)


# -- disassembler -------------------------------------------------------------------------------

_NAMED = {"memory_type": MemId, "alu_opcode": AluOp}
_HEX = {"dram_base"}


def disassemble(insn: Insn, cfg: VtaConfig) -> str:
    """One line: mnemonic, every field of the table by name, then the dependency flags."""
    values = _values(insn)
    parts = [insn.opcode.name]
    for f in layouts(cfg)[_kind(insn)].fields:
        if f.name == "opcode" or f.name in _FLAGS:
            continue
        value = values[f.name]
        if f.name in _NAMED:
            parts.append(_NAMED[f.name](value).name)
        elif f.name in _HEX:
            parts.append(f"{f.name}={value:#x}")
        else:
            parts.append(f"{f.name}={int(value)}")
    flags = [name for name in _FLAGS if values[name]]
    if flags:
        parts.append("[" + " ".join(flags) + "]")
    return " ".join(parts)


def disassemble_program(insns: Sequence[Insn], cfg: VtaConfig) -> list[str]:
    width = len(str(max(len(insns) - 1, 0)))
    return [f"{i:>{width}}: {disassemble(insn, cfg)}" for i, insn in enumerate(insns)]
