"""Engine selection: which of a model's builds on this device serves its inferences.

A model can have several builds on one device at the same version, one per engine: a CPU build
(engine ``tvm``) and a VTA build whose layers run on the accelerator the agent drives
(``vta-sim``, ``vta-serial``, ``vta-pynq``). When one of them becomes active, and when the agent
starts, every build of the model is loaded, golden-tested and timed on its golden inputs; requests
go to the fastest build that passed (with ``[agent] prefer = "accelerator"``, to the fastest
accelerator build first, keeping the CPU for the device's applications). A build whose run fails
is taken out of the ranking and the request runs again on the next one; the last working build
stays in service (its failures are the requests' errors). The interposer makes the same choice
between a build and ONNX Runtime inside an application (``agent/interpose.py``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CPU_ENGINE = "tvm"
ORT_ENGINE = "onnxruntime"
PREFER = ("fastest", "accelerator")
#: Timing at activation: this many runs after a warm-up, fewer when the budget is spent first.
TIMED_RUNS = 20
TIMING_BUDGET_S = 2.0


def median_ms(
    run: Callable[[], object], runs: int = TIMED_RUNS, budget_s: float | None = None
) -> float:
    """Median wall time of ``run`` in milliseconds, after one warm-up call; with ``budget_s``,
    timing stops early (after at least one timed run) once that many seconds have passed."""
    run()
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s if budget_s is not None else None
    for _ in range(runs):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
        if deadline is not None and start + samples[-1] > deadline:
            break
    return statistics.median(samples) * 1e3


@dataclass
class Measured:
    """One build of a model, timed on its golden inputs; ``error`` says why it cannot serve."""

    digest: str
    engine: str
    latency_ms: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "engine": self.engine,
            "digest": self.digest,
            "latency_ms": round(self.latency_ms, 3) if self.latency_ms is not None else None,
        }
        if self.error is not None:
            out["error"] = self.error
        return out


class Ranking:
    """A model's builds in the order they serve: the working ones by preference and latency."""

    def __init__(self, measured: list[Measured], prefer: str) -> None:
        self.prefer = prefer
        self.builds = sorted(measured, key=self._order)

    def _order(self, m: Measured) -> tuple[bool, bool, float]:
        accelerated_first = self.prefer == "accelerator" and m.engine != CPU_ENGINE
        return (m.error is not None, not accelerated_first, m.latency_ms or 0.0)

    def serving(self) -> Measured | None:
        return next((m for m in self.builds if m.error is None), None)

    def fail(self, digest: str, reason: str) -> Measured | None:
        """Take a build out of service and return the build that serves instead; the last
        working build stays in service (None: there is no other)."""
        others = [m for m in self.builds if m.error is None and m.digest != digest]
        if not others:
            return None
        for m in self.builds:
            if m.digest == digest:
                m.error = reason
        self.builds.sort(key=self._order)
        return self.serving()

    def describe(self) -> str:
        return "; ".join(
            f"{m.engine} {m.digest[:12]} "
            + (
                f"out of service ({m.error})"
                if m.error is not None
                else f"{m.latency_ms:.3f} ms"
                if m.latency_ms is not None
                else "not timed (the only build)"
            )
            for m in self.builds
        )

    def to_json(self) -> dict[str, Any]:
        serving = self.serving()
        return {
            "serving": serving.engine if serving is not None else None,
            "prefer": self.prefer,
            "engines": [m.to_json() for m in self.builds],
        }
