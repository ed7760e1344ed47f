"""TVM behind one door: every call into TVM's compiler goes through this module.

When TVM's API moves, this is the file that changes. The rest of ``models/`` deals in ONNX protos,
target dicts, paths and numpy arrays.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from agent.errors import BoostError

log = logging.getLogger(__name__)

RECORDS_FILE = "database_tuning_record.json"
WORKLOADS_FILE = "database_workload.json"


class CompileError(BoostError):
    """TVM could not import or compile the model."""


def _tvm() -> Any:
    import tvm

    return tvm


def version() -> str:
    return str(_tvm().__version__)


def host_cpu() -> str:
    return str(_tvm().get_global_func("target.llvm_get_system_cpu")())


def host_features() -> frozenset[str]:
    """The features the host CPU really has (CPUID), in LLVM's names."""
    features = _tvm().get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")()
    return frozenset(name for name, enabled in features.items() if enabled)


def cpu_model_features(mcpu: str, relevant: frozenset[str]) -> frozenset[str]:
    """The features LLVM assumes for the CPU model ``mcpu``, restricted to ``relevant``."""
    return frozenset(cpu_features({"kind": "llvm", "mcpu": mcpu}, relevant))


def cpu_features(target: dict[str, Any], relevant: frozenset[str]) -> tuple[str, ...]:
    """The ISA features LLVM enables for ``target``, restricted to ``relevant``."""
    tvm = _tvm()
    # The map holds the features LLVM enables for this CPU (values are empty strings).
    features = tvm.get_global_func("target.llvm_get_cpu_features")(tvm.target.Target(target))
    return tuple(sorted(name for name in features if name in relevant))


def import_onnx(model: onnx.ModelProto, origin: str) -> Any:
    """Import an ONNX model into a Relax IRModule with its weights bound as constants."""
    tvm = _tvm()
    from tvm.relax.frontend.onnx import from_onnx

    try:
        return from_onnx(model, keep_params_in_input=False)
    except tvm.error.OpNotImplemented as err:
        raise CompileError(
            f"{origin}: {err}. Replace these operators before export (or open an issue naming "
            "them); nothing was written"
        ) from err


def optimize(
    mod: Any,
    target: dict[str, Any],
    tuning_dir: Path | None,
    trials: int,
    on_trials: Callable[[int], None] | None = None,
) -> Any:
    """The CPU pipeline: inference simplification, operator fusion, and MetaSchedule.

    With ``trials > 0`` MetaSchedule tunes into ``tuning_dir``; records already in ``tuning_dir``
    are applied. ``on_trials`` is called with the number of measured candidates while tuning runs.
    """
    tvm = _tvm()
    from tvm import relax

    tvm_target = tvm.target.Target(target)
    with tvm_target:
        mod = relax.transform.DecomposeOpsForInference()(mod)
        mod = relax.transform.CanonicalizeBindings()(mod)
        if tuning_dir is None:
            return relax.get_pipeline("zero")(mod)
        tuning_dir.mkdir(parents=True, exist_ok=True)
        # Weight prepacking: the tuned kernels read the weights in the layout they chose, and
        # the layout transform of the (constant) weights is folded away at build time.
        pipeline = relax.get_pipeline(
            "static_shape_tuning",
            total_trials=trials,
            target=tvm_target,
            work_dir=str(tuning_dir),
            cpu_weight_prepack=True,
            max_trials_per_task=max(1, trials // 8) if trials else None,
        )
        stop = threading.Event()
        watcher = None
        if trials and on_trials is not None:
            watcher = threading.Thread(
                target=_watch_records,
                args=(tuning_dir / RECORDS_FILE, on_trials, stop),
                daemon=True,
            )
            watcher.start()
        try:
            return pipeline(mod)
        finally:
            stop.set()
            if watcher is not None:
                watcher.join()


def _watch_records(path: Path, on_trials: Callable[[int], None], stop: threading.Event) -> None:
    start = _count_lines(path)
    while not stop.wait(1.0):
        on_trials(_count_lines(path) - start)
    on_trials(_count_lines(path) - start)


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def build(mod: Any, target: dict[str, Any]) -> Any:
    """Lower the optimised module to a Relax VM executable."""
    tvm = _tvm()
    try:
        return tvm.compile(mod, tvm.target.Target(target))
    except tvm.error.TVMError as err:
        raise CompileError(f"TVM failed to compile for {target}: {err}") from err


def export(executable: Any, path: Path, compiler: str) -> None:
    """Export the executable as a shared library linked by ``compiler``."""
    from tvm.support import cc

    executable.export_library(str(path), fcompile=cc.cross_compiler(compiler))
