"""The firmware's host build for tests: built per VTA design, run behind a pseudo-terminal."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import TracebackType

from vta import cheader
from vta.config import VtaConfig

REPO = Path(__file__).resolve().parents[2]
FIRMWARE = REPO / "firmware"


def build_host(cfg: VtaConfig, out: Path) -> Path:
    """``make -C firmware host`` for ``cfg`` (its own generated header) into ``out``."""
    headers = out / "include"
    headers.mkdir(parents=True, exist_ok=True)
    (headers / cheader.HEADER_NAME).write_text(cheader.render(cfg))
    subprocess.run(
        ["make", "-s", "-C", str(FIRMWARE), "host", f"HEADERS={headers}", f"BUILD={out}"],
        check=True,
        capture_output=True,
    )
    return out / "host" / "vta-coprocessor"


class FirmwareProcess:
    """A running host build; ``port`` is its pseudo-terminal."""

    def __init__(self, binary: Path, *, dram_bytes: int = 64 << 20, baud: int = 0) -> None:
        self.process = subprocess.Popen(
            [str(binary), "--dram-bytes", str(dram_bytes), "--baud", str(baud)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.port = self.process.stdout.readline().strip()
        if not self.port:
            self.stop()
            raise RuntimeError(f"{binary} did not start (exit code {self.process.returncode})")

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> FirmwareProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
