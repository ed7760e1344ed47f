"""VTA bitstreams: the catalog of known ones (``firmware/bitstreams.toml``) and the reference a
build for an FPGA board carries in its manifest.

A bitstream is signed the way a module's files are: the manifest that references it names its
sha256, and the build host's signature covers the manifest. The device downloads it by that digest
and checks it again before every programming.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vta.config import from_design_id
from vta.drivers.pynq import BOARDS, PORT_WIDTHS
from vta.errors import VtaError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CATALOG = Path(__file__).resolve().parents[1] / "firmware" / "bitstreams.toml"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BitstreamError(VtaError):
    """A catalog entry, bitstream reference or bitstream file that is not what it must be."""


def _check_target(board: str, design: str, axi_widths: dict[str, int], origin: str) -> None:
    if board not in BOARDS:
        raise BitstreamError(f"{origin}: unknown board {board!r}; known: {', '.join(BOARDS)}")
    try:
        from_design_id(design)
    except VtaError as err:
        raise BitstreamError(f"{origin}: {err}") from err
    if axi_widths and not BOARDS[board].zynqmp:
        raise BitstreamError(f"{origin}: axi_widths apply to ZynqMP boards only, not {board}")
    for port, width in axi_widths.items():
        if port not in PORT_WIDTHS:
            raise BitstreamError(
                f"{origin}: unknown AXI port {port!r}; known: {', '.join(PORT_WIDTHS)}"
            )
        if width not in PORT_WIDTHS[port].codes:
            raise BitstreamError(f"{origin}: {port} width {width!r}; expected 32, 64 or 128")


@dataclass(frozen=True)
class CatalogEntry:
    board: str
    design: str
    file: str
    #: "" when the published digest was not verified yet (pinned when the file is imported).
    sha256: str
    source: str
    axi_widths: dict[str, int] = field(default_factory=dict)


def load_catalog(path: Path = CATALOG) -> list[CatalogEntry]:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise BitstreamError(f"cannot read the bitstream catalog {path}: {err}") from err
    entries = []
    for index, item in enumerate(raw.get("bitstream", [])):
        origin = f"{path}: bitstream {index + 1}"
        try:
            entry = CatalogEntry(
                board=str(item["board"]),
                design=str(item["design"]),
                file=str(item["file"]),
                sha256=str(item["sha256"]),
                source=str(item["source"]),
                axi_widths={str(k): v for k, v in item.get("axi_widths", {}).items()},
            )
        except KeyError as err:
            raise BitstreamError(f"{origin}: the key {err} is missing") from err
        if entry.sha256 and not _SHA256.match(entry.sha256):
            raise BitstreamError(f'{origin}: sha256 must be 64 lowercase hex digits or ""')
        _check_target(entry.board, entry.design, entry.axi_widths, origin)
        entries.append(entry)
    return entries


def catalog_entry(entries: list[CatalogEntry], board: str, design: str) -> CatalogEntry:
    for entry in entries:
        if (entry.board, entry.design) == (board, design):
            return entry
    known = ", ".join(f"{e.board}/{e.design}" for e in entries) or "none"
    raise BitstreamError(
        f"the catalog has no bitstream of design {design} for {board} (known: {known}); add an "
        "entry to firmware/bitstreams.toml"
    )


@dataclass(frozen=True)
class BitstreamRef:
    """What a manifest says about the bitstream its build needs (DESIGN.md, "Artifact")."""

    board: str
    design: str
    file: str
    sha256: str
    size: int
    axi_widths: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "board": self.board,
            "design": self.design,
            "file": self.file,
            "sha256": self.sha256,
            "size": self.size,
            "axi_widths": dict(self.axi_widths),
        }

    @classmethod
    def from_json(cls, raw: Any, origin: str) -> BitstreamRef:
        where = f"{origin}: bitstream"
        try:
            ref = cls(
                board=raw["board"],
                design=raw["design"],
                file=raw["file"],
                sha256=raw["sha256"],
                size=raw["size"],
                axi_widths=dict(raw["axi_widths"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise BitstreamError(f"{where}: malformed ({err!r})") from err
        if not all(isinstance(v, str) for v in (ref.board, ref.design, ref.file, ref.sha256)):
            raise BitstreamError(f"{where}: board, design, file and sha256 must be strings")
        if not _SHA256.match(ref.sha256):
            raise BitstreamError(f"{where}: sha256 must be 64 lowercase hex digits")
        if isinstance(ref.size, bool) or not isinstance(ref.size, int) or ref.size <= 0:
            raise BitstreamError(f"{where}: size must be a positive integer")
        _check_target(ref.board, ref.design, ref.axi_widths, where)
        return ref
