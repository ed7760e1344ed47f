"""Load and run exported TVM modules with the TVM *runtime* only.

The device never imports the ``tvm`` package (whose compiler library is 250 MB): ``tvm_ffi`` plus
``libtvm_runtime.so`` load an exported Relax VM library and run it. Nothing is loaded on import;
``TvmRuntime()`` loads the runtime library once per process.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from agent.artifact import TensorSpec
from agent.errors import BoostError, RuntimeLoadError

#: The runtime's thread count; the user's value is kept, else ``physical_cores()``.
THREADS_ENV = "TVM_NUM_THREADS"
# TVM's generated kernels assume this alignment of every tensor they are given.
ALIGNMENT = 64
# kDLCPU and the VM's pooled allocator (tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR).
_DL_CPU = 1
_POOLED_ALLOCATOR = 2
#: The symbols of the VM's own calls (allocations, shape checks), which are not kernels.
BUILTIN_PREFIX = "vm.builtin."


class InferenceInputError(BoostError):
    """Inference inputs do not match the model's declared inputs."""


def runtime_library_path() -> Path:
    """Locate ``libtvm_runtime.so`` inside the installed apache-tvm wheel, without importing it."""
    spec = importlib.util.find_spec("tvm")
    if spec is None or spec.origin is None:
        raise RuntimeLoadError(
            "the TVM runtime library was not found: install the device extra "
            "(pip install 'mlinferbooster[device]')"
        )
    path = Path(spec.origin).parent / "lib" / "libtvm_runtime.so"
    if not path.is_file():
        raise RuntimeLoadError(f"{path}: missing; reinstall apache-tvm")
    return path


def physical_cores(cpuinfo: Path = Path("/proc/cpuinfo"), usable: set[int] | None = None) -> int:
    """Cores this process may run on, counting the hyper-threads of a core once."""
    usable = os.sched_getaffinity(0) if usable is None else usable
    cores: set[tuple[str, str]] = set()
    try:
        blocks = cpuinfo.read_text().split("\n\n")
    except OSError:
        return len(usable)
    for block in blocks:
        fields = dict(
            (key.strip(), value.strip())
            for key, _, value in (line.partition(":") for line in block.splitlines())
        )
        if fields.get("processor", "").isdigit() and int(fields["processor"]) in usable:
            if "core id" not in fields:
                return len(usable)  # no topology (ARM): every CPU is a core
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or len(usable)


class TvmRuntime:
    """The process-wide TVM runtime: ``tvm_ffi`` with ``libtvm_runtime`` loaded globally."""

    _lock = threading.Lock()

    def __init__(self) -> None:
        with self._lock:
            # Before the runtime's thread pool exists: on x86 it halves the CPU count for
            # hyper-threading when TVM_NUM_THREADS is unset, which leaves half of the cores of a
            # machine without it idle (one thread on this project's 2-core build machines).
            os.environ.setdefault(THREADS_ENV, str(physical_cores()))
            import tvm_ffi

            self.ffi: ModuleType = tvm_ffi
            self.library = runtime_library_path()
            # RTLD_GLOBAL so that modules loaded later resolve the runtime's symbols.
            ctypes.CDLL(str(self.library), mode=ctypes.RTLD_GLOBAL)

    def load(
        self, library: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
    ) -> LoadedModel:
        try:
            module = self.ffi.load_module(str(library))
            vm = module["vm_load_executable"]()
            vm["vm_initialization"](_DL_CPU, 0, _POOLED_ALLOCATOR)
            main = vm["main"]
        except Exception as err:  # tvm_ffi raises its own error types for any loader failure
            raise RuntimeLoadError(f"{library}: cannot load the compiled module: {err}") from err
        return LoadedModel(self.ffi, vm, main, tuple(inputs), tuple(outputs))


def aligned_empty(spec: TensorSpec) -> np.ndarray:
    """An uninitialised C-contiguous array for ``spec`` whose data starts on an
    ``ALIGNMENT``-byte boundary (the runtime refuses tensors that do not)."""
    dtype = np.dtype(spec.dtype)
    nbytes = math.prod(spec.shape) * dtype.itemsize
    buffer = np.empty(nbytes + ALIGNMENT, np.uint8)
    offset = (-buffer.ctypes.data) % ALIGNMENT
    return buffer[offset : offset + nbytes].view(dtype).reshape(spec.shape)


class LoadedModel:
    """A loaded module; ``run`` is safe to call from several threads (calls are serialised)."""

    def __init__(
        self,
        ffi: ModuleType,
        vm: Any,
        main: Any,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
    ) -> None:
        self._ffi = ffi
        self._vm = vm  # keeps the VM alive as long as its function
        self._main = main
        self.inputs = inputs
        self.outputs = outputs
        self._lock = threading.Lock()
        # Each run's inputs are copied into these (guarded by the lock): aligned, and allocated
        # once; a fresh input-sized buffer per run costs more than its copy (page faults).
        self._staged = [aligned_empty(spec) for spec in inputs]
        self._staged_tensors = [ffi.from_dlpack(array) for array in self._staged]

    def check_inputs(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        names = [spec.name for spec in self.inputs]
        unknown = sorted(set(feeds) - set(names))
        missing = [n for n in names if n not in feeds]
        if unknown or missing:
            raise InferenceInputError(
                f"inputs {names} expected; missing {missing}, unknown {unknown}"
            )
        ordered = []
        for spec in self.inputs:
            value = feeds[spec.name]
            if tuple(value.shape) != spec.shape or str(value.dtype) != spec.dtype:
                raise InferenceInputError(
                    f"input {spec.name!r}: expected {spec.dtype}{list(spec.shape)}, "
                    f"got {value.dtype}{list(value.shape)}"
                )
            ordered.append(value)
        return ordered

    def _stage(self, arrays: list[np.ndarray]) -> list[Any]:
        """``arrays`` copied into the staged input tensors (call with the lock held)."""
        for staged, array in zip(self._staged, arrays, strict=True):
            np.copyto(staged, array)
        return self._staged_tensors

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        arrays = self.check_inputs(feeds)
        with self._lock:
            result = self._main(*self._stage(arrays))
            values = list(result) if isinstance(result, self._ffi.Array) else [result]
            return [np.from_dlpack(v).copy() for v in values]

    def kernel_calls(self, feeds: Mapping[str, np.ndarray], runs: int) -> list[KernelCall]:
        """Every call the module makes in a run, in order, with the milliseconds it took (the
        mean over ``runs`` runs): the VM's instrument hook times each call it makes."""
        arrays = self.check_inputs(feeds)
        calls: list[tuple[str, tuple[int, ...]]] = []  # what each call is, from the first run
        started: list[float] = []
        spent: list[float] = []
        recording = True

        def instrument(func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
            if before:
                started.append(time.perf_counter())
                return 0
            spent.append(time.perf_counter() - started.pop())
            if recording:
                # A kernel writes its last argument (destination passing); builtins write none.
                kernel = bool(args) and not symbol.startswith(BUILTIN_PREFIX)
                calls.append((symbol, tuple(int(d) for d in args[-1].shape) if kernel else ()))
            return 0  # VMInstrumentReturnKind.NO_OP: run the call

        with self._lock:
            self._vm["set_instrument"](instrument)
            try:
                for _ in range(runs):
                    self._main(*self._stage(arrays))
                    recording = False
            finally:
                self._vm["set_instrument"](None)
        per_run = np.asarray(spent).reshape(runs, -1).mean(axis=0) * 1e3
        return [
            KernelCall(symbol, shape, float(ms))
            for (symbol, shape), ms in zip(calls, per_run, strict=True)
        ]


@dataclass(frozen=True)
class KernelCall:
    """One call of a run: the kernel's (or VM builtin's) symbol, the shape of the tensor it
    writes (``()`` for builtins) and milliseconds per run."""

    symbol: str
    shape: tuple[int, ...]
    ms: float


@dataclass(frozen=True)
class GoldenReport:
    passed: bool
    max_abs_error: float
    allowed: str

    def describe(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return f"golden test {verdict}: max |error| {self.max_abs_error:.3g} ({self.allowed})"


def golden_inputs(golden: Path) -> dict[str, np.ndarray]:
    """The inputs recorded in an artifact's golden file, by name."""
    with np.load(golden, allow_pickle=False) as data:
        return _inputs(data)


def _inputs(data: Any) -> dict[str, np.ndarray]:
    return {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("input:")}


def golden_check(model: LoadedModel, golden: Path, rtol: float, atol: float) -> GoldenReport:
    """Run the artifact's recorded inputs and compare with its recorded outputs."""
    with np.load(golden, allow_pickle=False) as data:
        feeds = _inputs(data)
        expected = [data[f"output:{i}"] for i in range(len(model.outputs))]
    actual = model.run(feeds)
    worst, passed = 0.0, True
    for got, want in zip(actual, expected, strict=True):
        if got.shape != want.shape:
            return GoldenReport(False, float("inf"), f"shape {got.shape} != {want.shape}")
        error = np.abs(got.astype(np.float64) - want.astype(np.float64))
        worst = max(worst, float(error.max(initial=0.0)))
        passed &= bool(np.all(error <= atol + rtol * np.abs(want)))
    return GoldenReport(passed, worst, f"allowed atol {atol:.3g} + rtol {rtol:.3g}")
