"""The VTA design configuration: one frozen object from which every derived value comes.

A configuration is the JSON document the original ``vta_config.json`` used (upper-case keys, all
sizes as log2). Widths, SRAM depths, element sizes, instruction bit layouts and the bitstream id
are all derived here or from this object, so the same id appears in manifests, cache keys,
capability documents and the firmware header.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vta import isa
from vta.errors import VtaConfigError

#: Bits of one instruction and one micro-op; fixed by the ISA.
INSN_BITS = 128
UOP_BITS = 32


@dataclass(frozen=True)
class VtaConfig:
    """One VTA design. The defaults are the published ``1x16_i8w8a32_15_15_18_17`` design."""

    target: str = "sim"
    hw_ver: str = "0.0.2"
    log_inp_width: int = 3
    log_wgt_width: int = 3
    log_acc_width: int = 5
    log_batch: int = 0
    log_block: int = 4
    log_uop_buff_size: int = 15
    log_inp_buff_size: int = 15
    log_wgt_buff_size: int = 18
    log_acc_buff_size: int = 17
    #: Where the configuration came from, for error messages; not part of the design.
    source: str = field(default="built-in default", compare=False)

    def __post_init__(self) -> None:
        for name in _JSON_KEYS:
            value = getattr(self, name)
            if name in ("target", "hw_ver"):
                if not isinstance(value, str) or not value:
                    self._fail(f"{name.upper()}: expected a non-empty string, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int):
                self._fail(f"{name.upper()}: expected an integer (a log2 size), got {value!r}")
        for name, allowed in (("log_inp_width", (1, 2, 3)), ("log_wgt_width", (1, 2, 3))):
            if getattr(self, name) not in allowed:
                self._fail(
                    f"{name.upper()}: expected 1, 2 or 3 (2-, 4- or 8-bit values), "
                    f"got {getattr(self, name)}"
                )
        if self.log_acc_width != 5:
            self._fail(
                f"LOG_ACC_WIDTH: only 32-bit accumulators exist (5), got {self.log_acc_width}"
            )
        if not 0 <= self.log_batch <= 4:
            self._fail(f"LOG_BATCH: expected 0..4, got {self.log_batch}")
        if not 1 <= self.log_block <= 6:
            self._fail(f"LOG_BLOCK: expected 1..6, got {self.log_block}")
        for mem in ("uop", "inp", "wgt", "acc"):
            depth_log = getattr(self, f"log_{mem}_depth")
            if not 0 <= depth_log <= isa.SRAM_ADDR_BITS:
                self._fail(
                    f"LOG_{mem.upper()}_BUFF_SIZE: {getattr(self, f'log_{mem}_buff_size')} gives "
                    f"2**{depth_log} {mem} elements; the SRAM address field holds 1.."
                    f"2**{isa.SRAM_ADDR_BITS}: change the buffer size"
                )
        if self.inp_elem_bits % 8 or self.wgt_elem_bits % 8:
            self._fail("an input or weight element is not a whole number of bytes: raise LOG_BLOCK")
        too_wide = []
        for kind, layout in isa.layouts(self).items():
            limit = UOP_BITS if kind == "UOP" else INSN_BITS
            if layout.bits > limit:
                too_wide.append(f"the {kind} fields need {layout.bits} bits (at most {limit})")
        if too_wide:
            self._fail(", ".join(too_wide) + ": make the SRAM buffers smaller")

    def _fail(self, message: str) -> None:
        raise VtaConfigError(self.source, message)

    # -- loading and saving ------------------------------------------------------------------

    @classmethod
    def from_dict(cls, document: dict[str, Any], source: str) -> VtaConfig:
        """Build a configuration from a ``vta_config.json`` document; unknown keys are errors."""
        if not isinstance(document, dict):
            raise VtaConfigError(source, f"expected a JSON object, got {type(document).__name__}")
        values: dict[str, Any] = {}
        for key, value in document.items():
            name = key.lower() if isinstance(key, str) else ""
            if name not in _JSON_KEYS:
                close = difflib.get_close_matches(str(key).upper(), [k.upper() for k in _JSON_KEYS])
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise VtaConfigError(source, f"unknown key {key!r}{hint}")
            values[name] = value
        return cls(**values, source=source)

    @classmethod
    def from_json(cls, path: Path) -> VtaConfig:
        try:
            document = json.loads(Path(path).read_text())
        except OSError as err:
            raise VtaConfigError(str(path), f"cannot read: {err.strerror}") from err
        except json.JSONDecodeError as err:
            raise VtaConfigError(str(path), f"not JSON: {err}") from err
        return cls.from_dict(document, str(path))

    def to_dict(self) -> dict[str, Any]:
        return {key.upper(): value for key, value in asdict(self).items() if key in _JSON_KEYS}

    # -- derived values ------------------------------------------------------------------------

    @property
    def bitstream_id(self) -> str:
        return (
            f"{self.batch}x{self.block}_i{self.inp_width}w{self.wgt_width}a{self.acc_width}"
            f"_{self.log_uop_buff_size}_{self.log_inp_buff_size}_{self.log_wgt_buff_size}"
            f"_{self.log_acc_buff_size}"
        )

    @property
    def batch(self) -> int:
        return 1 << self.log_batch

    @property
    def block(self) -> int:
        """BLOCK_IN == BLOCK_OUT."""
        return 1 << self.log_block

    @property
    def inp_width(self) -> int:
        return 1 << self.log_inp_width

    @property
    def wgt_width(self) -> int:
        return 1 << self.log_wgt_width

    @property
    def acc_width(self) -> int:
        return 1 << self.log_acc_width

    @property
    def out_width(self) -> int:
        return self.inp_width

    @property
    def inp_elem_bits(self) -> int:
        return self.batch * self.block * self.inp_width

    @property
    def wgt_elem_bits(self) -> int:
        return self.block * self.block * self.wgt_width

    @property
    def acc_elem_bits(self) -> int:
        return self.batch * self.block * self.acc_width

    @property
    def out_elem_bits(self) -> int:
        return self.batch * self.block * self.out_width

    @property
    def log_uop_depth(self) -> int:
        return self.log_uop_buff_size - 5 + 3

    @property
    def log_inp_depth(self) -> int:
        return self.log_inp_buff_size - self.log_batch - self.log_block - self.log_inp_width + 3

    @property
    def log_wgt_depth(self) -> int:
        return self.log_wgt_buff_size - 2 * self.log_block - self.log_wgt_width + 3

    @property
    def log_acc_depth(self) -> int:
        return self.log_acc_buff_size - self.log_batch - self.log_block - self.log_acc_width + 3

    @property
    def uop_depth(self) -> int:
        return 1 << self.log_uop_depth

    @property
    def inp_depth(self) -> int:
        return 1 << self.log_inp_depth

    @property
    def wgt_depth(self) -> int:
        return 1 << self.log_wgt_depth

    @property
    def acc_depth(self) -> int:
        """Accumulator entries; the output buffer shares this index space."""
        return 1 << self.log_acc_depth

    def elem_bytes(self, mem: isa.MemId) -> int:
        """Bytes of one element of a memory type, as DRAM addresses count them."""
        bits = {
            isa.MemId.UOP: UOP_BITS,
            isa.MemId.INP: self.inp_elem_bits,
            isa.MemId.WGT: self.wgt_elem_bits,
            isa.MemId.ACC: self.acc_elem_bits,
            isa.MemId.OUT: self.out_elem_bits,
            isa.MemId.ACC_8BIT: self.batch * self.block * 8,
        }[mem]
        return bits // 8

    def depth(self, mem: isa.MemId) -> int:
        """SRAM entries of the buffer a memory type loads into or stores from."""
        return {
            isa.MemId.UOP: self.uop_depth,
            isa.MemId.INP: self.inp_depth,
            isa.MemId.WGT: self.wgt_depth,
            isa.MemId.ACC: self.acc_depth,
            isa.MemId.OUT: self.acc_depth,
            isa.MemId.ACC_8BIT: self.acc_depth,
        }[mem]


_JSON_KEYS = tuple(f.name for f in fields(VtaConfig) if f.name != "source")


def load(path: Path | None) -> VtaConfig:
    """The configuration in ``path``, or the published default design when no path is given."""
    return VtaConfig() if path is None else VtaConfig.from_json(path)


_DESIGN_ID = re.compile(
    r"(?P<batch>\d+)x(?P<block>\d+)_i(?P<inp>\d+)w(?P<wgt>\d+)a(?P<acc>\d+)"
    r"_(?P<uop>\d+)_(?P<inp_buff>\d+)_(?P<wgt_buff>\d+)_(?P<acc_buff>\d+)"
)


def from_design_id(design: str) -> VtaConfig:
    """The configuration a design id names (the inverse of ``VtaConfig.bitstream_id``), as a
    device that reports only its id is described."""
    match = _DESIGN_ID.fullmatch(design)
    if match is None:
        raise VtaConfigError(
            f"design id {design!r}",
            "expected BATCHxBLOCK_iINPwWGTaACC_UOP_INP_WGT_ACC, e.g. 1x16_i8w8a32_15_15_18_17",
        )
    logs = {}
    for name in ("batch", "block", "inp", "wgt", "acc"):
        value = int(match[name])
        if value < 1 or value & (value - 1):
            raise VtaConfigError(f"design id {design!r}", f"{name} {value} is not a power of two")
        logs[name] = value.bit_length() - 1
    return VtaConfig(
        log_batch=logs["batch"],
        log_block=logs["block"],
        log_inp_width=logs["inp"],
        log_wgt_width=logs["wgt"],
        log_acc_width=logs["acc"],
        log_uop_buff_size=int(match["uop"]),
        log_inp_buff_size=int(match["inp_buff"]),
        log_wgt_buff_size=int(match["wgt_buff"]),
        log_acc_buff_size=int(match["acc_buff"]),
        source=f"design id {design}",
    )
