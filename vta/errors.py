"""Errors of the VTA stack: configuration, encoding, simulation, HLS compatibility, drivers."""

from __future__ import annotations

from agent.errors import BoostError


class VtaError(BoostError):
    """Base class of every error the VTA stack raises on purpose."""


class VtaConfigError(VtaError):
    """A VTA configuration is malformed or describes a design that cannot exist."""

    def __init__(self, source: str, message: str) -> None:
        self.source = source
        super().__init__(f"{source}: {message}")


class EncodingError(VtaError):
    """An instruction or micro-op field does not fit its bit field, or a word does not decode."""


class SimulationError(VtaError):
    """A program asked the simulator for something the ISA does not allow (bad index, bad type)."""


class DeadlockError(SimulationError):
    """No queue can make progress: every head waits for a dependency token that never comes."""

    def __init__(self, message: str, snapshot: dict[str, object]) -> None:
        self.snapshot = snapshot
        super().__init__(message)


class HlsError(SimulationError):
    """The program uses something the FPGA (HLS) design cannot run; see VTA-ISA.md section 4."""


class DriverError(VtaError):
    """A driver cannot allocate, transfer or run, or refuses to return results."""
