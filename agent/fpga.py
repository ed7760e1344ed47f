"""The board's FPGA: which bitstream it holds, the bitstreams the device keeps, and programming
with a smoke test and a way back.

``<state_dir>/fpga.json`` records the loaded bitstream (and the one before it) with the boot it
was loaded in: after a reboot the FPGA holds whatever the boot loaded, so a record from another
boot says nothing. ``<state_dir>/bitstreams/<sha256>`` are the bitstreams downloaded for
deployments, checked against their signed reference before every programming.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from agent.artifact import sha256_file
from agent.errors import BoostError
from agent.fsutil import atomic_write_json
from vta.bitstreams import BitstreamError, BitstreamRef
from vta.config import from_design_id
from vta.drivers.pynq import BOARDS, PynqDriver, import_pynq, probe_fpga, program
from vta.engine import smoke_test
from vta.errors import VtaError

log = logging.getLogger(__name__)

STATE_VERSION = 1
OPERATING = "operating"


class FpgaError(BoostError):
    """Programming or checking the FPGA failed."""


class Fpga:
    def __init__(
        self,
        state_dir: Path,
        board: str,
        root: Path,
        pynq: Callable[[], ModuleType] = import_pynq,
    ) -> None:
        """The FPGA of ``board`` (a key of ``vta.drivers.pynq.BOARDS``) whose kernel interfaces
        are under ``root``; ``pynq`` imports the package when the FPGA is first driven."""
        self.board = BOARDS[board]
        self.root = root
        self.state_path = state_dir / "fpga.json"
        self.bitstreams = state_dir / "bitstreams"
        self._import_pynq = pynq

    def _boot_id(self) -> str:
        try:
            return (self.root / "proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return ""

    def _state(self) -> dict[str, BitstreamRef]:
        try:
            raw = json.loads(self.state_path.read_text())
            if raw["version"] != STATE_VERSION or raw["boot_id"] != self._boot_id():
                return {}
            return {
                key: BitstreamRef.from_json(raw[key], str(self.state_path))
                for key in ("loaded", "previous")
                if raw[key] is not None
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, BitstreamError) as err:
            log.warning("%s is damaged (%s): the FPGA's design is unknown", self.state_path, err)
            return {}

    def _save(self, loaded: BitstreamRef | None, previous: BitstreamRef | None) -> None:
        atomic_write_json(
            self.state_path,
            {
                "version": STATE_VERSION,
                "boot_id": self._boot_id(),
                "loaded": loaded.to_json() if loaded else None,
                "previous": previous.to_json() if previous else None,
            },
        )

    @property
    def loaded(self) -> BitstreamRef | None:
        """The bitstream the agent programmed in this boot, if the programming completed."""
        return self._state().get("loaded")

    def describe(self, accelerator: dict[str, Any]) -> None:
        """Set the design and bitstream of this FPGA's entry in the capability document."""
        loaded = self.loaded
        accelerator["design"] = loaded.design if loaded else None
        accelerator["bitstream"] = loaded.sha256 if loaded else None

    def path(self, ref: BitstreamRef) -> Path:
        return self.bitstreams / ref.sha256

    def has(self, ref: BitstreamRef) -> bool:
        path = self.path(ref)
        return path.is_file() and path.stat().st_size == ref.size

    def program(self, ref: BitstreamRef) -> None:
        """Load ``ref`` (in the device's bitstreams), check the FPGA manager took it and that the
        design computes; the bitstream loaded before becomes the one ``revert`` goes back to."""
        if ref.board != self.board.name:
            raise FpgaError(f"the bitstream is for {ref.board}; this board is {self.board.name}")
        path = self.path(ref)
        if not self.has(ref) or sha256_file(path) != ref.sha256:
            path.unlink(missing_ok=True)
            raise FpgaError(
                f"the bitstream {ref.sha256[:12]} on this device is missing or damaged (removed); "
                "deploy again to download it"
            )
        before = self.loaded
        # Until the new design proves itself the FPGA's content is unknown, even after a crash.
        self._save(None, before)
        try:
            pynq = self._import_pynq()
            program(path, self.board, ref.axi_widths, pynq)
            states = [m["state"] for m in probe_fpga(self.root)]
            if states[:1] != [OPERATING]:
                raise FpgaError(
                    f"after programming, the FPGA manager reports {states or 'nothing'}, not "
                    f"{OPERATING!r}"
                )
            with PynqDriver(from_design_id(ref.design), self.board, pynq) as driver:
                smoke_test(driver)
        except VtaError as err:
            raise FpgaError(f"programming {ref.design} ({ref.sha256[:12]}) failed: {err}") from err
        self._save(ref, before)
        log.info("FPGA: %s loaded (%s)", ref.design, ref.sha256[:12])

    def revert(self) -> BitstreamRef | None:
        """Go back to the bitstream loaded before the last ``program``; returns what the FPGA
        holds afterwards (None: unknown, when there is none to go back to or it fails too)."""
        previous: BitstreamRef | None = self._state().get("previous")
        if previous is None:
            log.warning("FPGA: no earlier bitstream to go back to; its design is unknown")
            self._save(None, None)
            return None
        try:
            self.program(previous)
        except FpgaError as err:
            log.error("FPGA: going back to %s failed too: %s", previous.design, err)
            self._save(None, None)
            return None
        self._save(previous, None)
        return previous
