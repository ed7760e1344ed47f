"""A simulated Zynq board for agent processes: a fake ``/sys`` and ``/proc`` tree and a fake
``pynq`` package (``fake_board/pynq``) whose FPGA runs the VTA simulator."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

PYTHONPATH = str(Path(__file__).parent)


def make_board(root: Path, model: str = "TUL PYNQ-Z1") -> Path:
    """The board's kernel interfaces under ``root``: an FPGA manager that holds nothing the agent
    knows, the device tree model, and a boot id."""
    manager = root / "sys/class/fpga_manager/fpga0"
    manager.mkdir(parents=True)
    (manager / "state").write_text("operating\n")
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_text(model + "\0")
    reboot(root)
    return root


def reboot(root: Path) -> None:
    """A new boot: a new boot id, and the fabric holds whatever the boot loaded (nothing here)."""
    boot_id = root / "proc/sys/kernel/random/boot_id"
    boot_id.parent.mkdir(parents=True, exist_ok=True)
    boot_id.write_text(f"{uuid.uuid4()}\n")
    (root / "fabric.json").unlink(missing_ok=True)


def bitstream(path: Path, design: str, behaviour: str = "ok") -> Path:
    """A fake bitstream file for ``design``: see the ``pynq`` module for the behaviours."""
    path.write_text(json.dumps({"design": design, "behaviour": behaviour}))
    return path


def programmed(root: Path) -> list[str]:
    """The files downloaded into the FPGA, in order."""
    log = root / "programmed.log"
    return log.read_text().split() if log.exists() else []
