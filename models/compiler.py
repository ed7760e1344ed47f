"""``boost-build compile``: ONNX in, signed ``.boost`` artifact out.

Order matters for the user: everything that can be checked cheaply (model file, target, compiler,
signing key) is checked before TVM spends minutes; the artifact appears atomically at the end, so
a failure leaves nothing half written.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from agent.artifact import (
    FileEntry,
    GoldenInfo,
    Manifest,
    TargetInfo,
    TensorSpec,
    load_private_key,
    sha256_file,
    write_artifact,
)
from agent.capabilities import ISA_FEATURES
from agent.errors import BoostError
from models import targets, tvm_backend, vta_build
from models.progress import Progress
from models.store import ArtifactStore
from models.tuning import TuningDatabase, TuningKey
from vta.bitstreams import BitstreamRef
from vta.drivers.pynq import BOARDS as FPGA_BOARDS

log = logging.getLogger(__name__)

LIBRARY = "model.so"
GOLDEN = "golden.npz"
GOLDEN_RTOL = 1e-3
GOLDEN_ATOL = 1e-4


@dataclass(frozen=True)
class CompileRequest:
    model: Path
    target: str
    board: str | None = None
    trials: int = 0
    output: Path | None = None
    name: str | None = None
    version: str = "1"
    inputs: Path | None = None
    calibration: Path | None = None
    #: --target vta: the FPGA board whose bitstream the build carries (default: --board, when
    #: it is an FPGA board).
    fpga: str | None = None
    #: x86_64: tune the kernels that have no tuning record yet for at most this long (the
    #: bounded default of ``boost-build compile``, ``[build] tune_minutes``).
    tune_minutes: float = 0.0
    #: Apply the tuning records of the model and target (the user's database and the shipped
    #: ones); False builds without any (what an untuned build costs).
    tuned: bool = True


@dataclass(frozen=True)
class CompileResult:
    artifact: Path
    manifest: Manifest
    seconds: float
    tuning_records: int


def load_onnx(path: Path) -> tuple[onnx.ModelProto, str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise BoostError(f"{path}: no such file") from err
    except OSError as err:
        raise BoostError(f"{path}: cannot read: {err.strerror}") from err
    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
    except Exception as err:  # onnx raises DecodeError, ValidationError and others
        raise BoostError(f"{path}: not a valid ONNX model ({type(err).__name__}: {err})") from err
    return model, hashlib.sha256(data).hexdigest()


def input_specs(model: onnx.ModelProto, origin: str) -> list[TensorSpec]:
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = []
        for dim in tensor.shape.dim:
            if not dim.HasField("dim_value"):
                raise BoostError(
                    f"{origin}: input {value.name!r} has a dynamic dimension "
                    f"{dim.dim_param or '?'}; export the model with fixed input shapes"
                )
            dims.append(dim.dim_value)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
        specs.append(TensorSpec(value.name, tuple(dims), dtype))
    return specs


def read_npz(source: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(source, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as err:
        raise BoostError(f"{source}: not a readable .npz file ({err})") from err


def golden_inputs(specs: list[TensorSpec], source: Path | None, seed: str) -> dict[str, np.ndarray]:
    """One input per spec: from ``source`` (.npz, first sample of a batch) or seeded random."""
    if source is None:
        rng = np.random.default_rng(int(seed[:16], 16))
        return {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in specs}
    arrays = read_npz(source)
    out = {}
    for spec in specs:
        if spec.name not in arrays:
            raise BoostError(f"{source}: has no array named {spec.name!r} (has {sorted(arrays)})")
        value = arrays[spec.name]
        if value.shape[1:] == spec.shape[1:] and len(value) >= spec.shape[0]:
            value = value[: spec.shape[0]]
        if value.shape != spec.shape:
            raise BoostError(
                f"{source}: {spec.name} has shape {value.shape}, the model needs {spec.shape}"
            )
        out[spec.name] = value.astype(spec.dtype)
    return out


def reference_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The float model's outputs from ONNX Runtime: what the device must reproduce."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, feeds)]


def compile_model(
    request: CompileRequest,
    tuning_db: Path,
    signing_key: Path,
    builder_id: str,
    progress: Progress,
    store: ArtifactStore | None = None,
) -> CompileResult:
    """Compile, package and sign ``request``; a VTA build for an FPGA board carries the
    ``store``'s bitstream of its design for that board, when the store has one."""
    start = time.monotonic()
    model, digest = load_onnx(request.model)
    spec = targets.resolve(request.target, request.board)
    bitstream = _bitstream(spec, request.fpga, store)
    compiler = spec.check_compiler()
    if request.trials < 0:
        raise BoostError(f"--tune-trials must be 0 or more, got {request.trials}")
    if request.tune_minutes < 0:
        raise BoostError(f"the tuning time must be 0 minutes or more, got {request.tune_minutes}")
    if request.trials and spec.name != "x86_64":
        raise BoostError(
            f"tuning measures candidates on this machine, so it runs for x86_64 only; build "
            f"{spec.name} with --tune-trials 0 (stored records for the same key are applied)"
        )
    key = load_private_key(signing_key)
    specs = input_specs(model, str(request.model))
    name = request.name or request.model.stem
    feeds = golden_inputs(specs, request.inputs, digest)
    calibration = None
    if spec.accelerator:
        calibration = vta_build.read_calibration(specs, request.calibration or request.inputs)
    target_dict = spec.tvm_dict()
    tuning = TuningDatabase(tuning_db)
    # A VTA build tunes the CPU part of another module than the float model's: its own key.
    keyed = {**target_dict, "accelerator": spec.accelerator} if spec.accelerator else target_dict
    tuning_key = TuningKey(digest, keyed, tvm_backend.version())
    existing = tuning.record_count(tuning_key) if request.tuned else 0
    # Tuning measures candidates on this machine: the bounded default tunes host builds only.
    minutes = request.tune_minutes if request.tuned and spec.name == "x86_64" else 0.0
    tuning_dir = tuning.prepare(tuning_key) if request.trials or minutes or existing else None

    with progress.stage(f"import {request.model.name}"):
        mod = tvm_backend.import_onnx(model, str(request.model))
    with tempfile.TemporaryDirectory(prefix="boost-build-") as tmp:
        work = Path(tmp)
        files: dict[str, Path] = {}
        vta_part = None
        if calibration is not None:
            with progress.stage("calibrate, quantize and lower for VTA"):
                vta_part = vta_build.partition(mod, calibration)
            mod = vta_part.module
            files.update(vta_build.save(vta_part, work))
        label = f"optimize for {spec.name} ({target_dict.get('mcpu', 'generic')})"
        if existing:
            label += f", applying {existing} tuning records"
        if request.trials:
            with progress.counter("tune", request.trials) as on_trials:
                mod = tvm_backend.optimize(
                    mod, target_dict, tuning_dir, request.trials, on_trials=on_trials
                )
        else:
            if minutes:
                label += f", tuning kernels without records for at most {minutes:g} min"
            with progress.stage(label):
                mod = tvm_backend.optimize(mod, target_dict, tuning_dir, minutes=minutes)
        untuned = len(tvm_backend.untuned_kernels(mod))
        with progress.stage("build"):
            executable = tvm_backend.build(mod, target_dict)
        with progress.stage(f"export with {spec.compiler}"):
            tvm_backend.export(executable, work / LIBRARY, compiler)
        quantization = None
        if vta_part is not None and calibration is not None:
            # The device must reproduce what this build computes, on the simulator, not the
            # float model: golden data and the accuracy figures come from the same run.
            with progress.stage("golden data and accuracy (VTA simulator vs ONNX Runtime)"):
                host = executable if spec.board == targets.VTA_SIM_BOARD else None
                measured = vta_build.measure(model, vta_part, mod, host, feeds, calibration)
            outputs, quantization = measured.golden_outputs, measured.quantization
        else:
            with progress.stage("golden data (ONNX Runtime)"):
                outputs = reference_outputs(model, feeds)
        golden: dict[str, Any] = {f"input:{k}": v for k, v in feeds.items()}
        golden.update({f"output:{i}": v for i, v in enumerate(outputs)})
        np.savez(work / GOLDEN, **golden)
        output_names = [o.name for o in model.graph.output]
        records = tuning.record_count(tuning_key) if tuning_dir else 0
        scale = max(1.0, *(float(np.abs(o).max()) for o in outputs))
        files.update({LIBRARY: work / LIBRARY, GOLDEN: work / GOLDEN})
        manifest = Manifest(
            model_name=name,
            model_version=request.version,
            source_sha256=digest,
            target=TargetInfo(
                name=spec.name,
                triple=spec.triple,
                tvm_target=target_dict,
                cpu_features=tvm_backend.cpu_features(target_dict, ISA_FEATURES),
                accelerator=spec.accelerator or None,
            ),
            tvm_version=tvm_backend.version(),
            inputs=tuple(specs),
            outputs=tuple(
                TensorSpec(n, tuple(o.shape), o.dtype.name)
                for n, o in zip(output_names, outputs, strict=True)
            ),
            library=LIBRARY,
            golden=GoldenInfo(file=GOLDEN, rtol=GOLDEN_RTOL, atol=GOLDEN_ATOL * scale),
            files=tuple(
                FileEntry(n, p.stat().st_size, sha256_file(p)) for n, p in sorted(files.items())
            ),
            builder={
                "id": builder_id or platform.node(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "board": spec.board,
            },
            tuning={
                "key": tuning_key.digest,
                "records": records,
                "trials_this_build": records - existing,
                "untuned_kernels": untuned,
            },
            quantization=quantization,
            bitstream=bitstream,
        )
        out = request.output or Path(manifest.file_name)
        out.parent.mkdir(parents=True, exist_ok=True)
        with progress.stage(f"package {out}"):
            write_artifact(out, manifest, files, key)
    return CompileResult(out, manifest, time.monotonic() - start, manifest.tuning["records"])


def _bitstream(
    spec: targets.TargetSpec, fpga: str | None, store: ArtifactStore | None
) -> BitstreamRef | None:
    if not spec.accelerator:
        if fpga:
            raise BoostError(f"--fpga applies to --target {targets.VTA_TARGET} builds only")
        return None
    board = fpga or (spec.board if spec.board in FPGA_BOARDS else None)
    if board is None:
        return None
    if board not in FPGA_BOARDS:
        raise BoostError(f"--fpga {board}: not an FPGA board; known: {', '.join(FPGA_BOARDS)}")
    design = spec.accelerator.removeprefix("vta:")
    ref = store.bitstreams().get((board, design)) if store is not None else None
    if ref is None and fpga:
        raise BoostError(
            f"the artifact store has no {board} bitstream of design {design}: see 'boost-build "
            f"bitstream list' for where to obtain it, then 'boost-build bitstream add FILE "
            f"--board {board}'"
        )
    return ref
