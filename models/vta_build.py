"""The build host's side of ``--target vta`` around the partition: calibration data in, the VTA
files of the artifact out, and the measurements that go into the manifest.

Golden outputs come from running the compiled module on this host with the VTA simulator (HLS
mode, as the boards run), so a device must reproduce the quantized result, not the float one.
Accuracy is that same run against ONNX Runtime's float model on the calibration samples, and on
the labelled test set when the calibration file carries one (``test_inputs``/``test_labels``, as
``boost-build zoo export`` writes for models with real weights).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from agent.artifact import TensorSpec
from agent.errors import BoostError
from models import targets, tvm_backend
from models.vta_partition import Partition
from models.vta_partition import partition as partition_module
from vta.bundle import BLOB, INDEX
from vta.config import VtaConfig
from vta.drivers.sim import SimDriver
from vta.engine import VtaEngine, register
from vta.lower import ConvSpec

TEST_INPUTS, TEST_LABELS = "test_inputs", "test_labels"
#: The most samples calibration and accuracy use from a file.
MAX_SAMPLES = 64


@dataclass(frozen=True)
class Calibration:
    samples: list[dict[str, np.ndarray]]
    source: Path
    test_set: tuple[np.ndarray, np.ndarray] | None


def read_calibration(specs: Sequence[TensorSpec], source: Path | None) -> Calibration:
    """Representative inputs, one dict per sample (batch 1 each), from an .npz of batches."""
    from models.compiler import read_npz

    if source is None:
        raise BoostError(
            "--target vta quantizes the model after calibrating it on representative inputs: "
            "give an .npz with --calibration (or --inputs), arrays named like the inputs"
        )
    arrays = read_npz(source)
    batches = []
    for spec in specs:
        if spec.name not in arrays:
            raise BoostError(f"{source}: has no array named {spec.name!r} (has {sorted(arrays)})")
        value = arrays[spec.name]
        if spec.shape[:1] != (1,) or value.shape[1:] != spec.shape[1:]:
            raise BoostError(
                f"{source}: {spec.name} has shape {value.shape}; calibration wants a batch of "
                f"samples of shape {spec.shape[1:]} (and a model of batch 1)"
            )
        batches.append(value[:MAX_SAMPLES].astype(spec.dtype))
    count = min(len(b) for b in batches)
    samples = [
        {s.name: b[i : i + 1] for s, b in zip(specs, batches, strict=True)} for i in range(count)
    ]
    test_set = None
    if TEST_INPUTS in arrays and TEST_LABELS in arrays and len(specs) == 1:
        x, y = arrays[TEST_INPUTS], arrays[TEST_LABELS]
        test_set = (x.reshape(len(x), 1, *specs[0].shape[1:]).astype(specs[0].dtype), y)
    return Calibration(samples, source, test_set)


def partition(mod: Any, calibration: Calibration) -> Partition:
    return partition_module(
        mod,
        calibration.samples,
        targets.resolve("x86_64").tvm_dict(),
        VtaConfig(),
        uuid.uuid4().hex,
    )


def save(part: Partition, work: Path) -> dict[str, Path]:
    index, blob = part.bundle.save(work)
    return {INDEX: index, BLOB: blob}


@dataclass(frozen=True)
class Measured:
    golden_outputs: list[np.ndarray]
    quantization: dict[str, Any]


def measure(
    model: onnx.ModelProto,
    part: Partition,
    mod: Any,
    host_executable: Any | None,
    feeds: dict[str, np.ndarray],
    calibration: Calibration,
) -> Measured:
    """Golden outputs and accuracy figures from the quantized model on the VTA simulator.

    ``mod`` is the optimized module; it is built for this host unless ``host_executable`` (a
    build of it for this host) is given.
    """
    import onnxruntime as ort
    import tvm
    from tvm import relax

    if host_executable is None:
        host_executable = tvm_backend.build(mod, targets.resolve("x86_64").tvm_dict())
    engine = VtaEngine(SimDriver(part.bundle.config, hls=True))
    register(engine)
    engine.add(part.bundle)
    try:
        vm = relax.VirtualMachine(host_executable, tvm.cpu())
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        names = list(feeds)

        def run(sample: dict[str, np.ndarray]) -> list[np.ndarray]:
            result = vm["main"](*(tvm.runtime.tensor(sample[n]) for n in names))
            values = list(result) if isinstance(result, (list, tuple, tvm.ir.Array)) else [result]
            return [np.asarray(v.numpy()) for v in values]

        golden = run(feeds)
        quantized = [run(s)[0] for s in calibration.samples]
        floats = [np.asarray(session.run(None, s)[0]) for s in calibration.samples]
        accuracy: dict[str, Any] = {"calibration_set": _agreement(floats, quantized)}
        if calibration.test_set is not None:
            x, labels = calibration.test_set
            q_pred = np.array([int(np.argmax(run({names[0]: xi})[0])) for xi in x])
            f_pred = np.array([int(np.argmax(session.run(None, {names[0]: xi})[0])) for xi in x])
            accuracy["test_set"] = {
                "samples": len(x),
                "float_accuracy": float(np.mean(f_pred == labels)),
                "quantized_accuracy": float(np.mean(q_pred == labels)),
                "top1_agreement": float(np.mean(f_pred == q_pred)),
            }
    finally:
        engine.close()
    layers = part.report["layers"]
    vta_macs = sum(_macs(layer["spec"]) for layer in layers)
    quantization = {
        "scheme": "symmetric int8, power-of-two scales (requantization by shift)",
        "bits": 8,
        "activations": "per-tensor",
        "weights": "per-tensor",
        "calibration": {"source": calibration.source.name, "samples": len(calibration.samples)},
        "accuracy": accuracy,
        "vta": {
            "design": part.bundle.design,
            "layers": len(layers),
            "macs": vta_macs,
            "instructions": sum(layer["instructions"] for layer in layers),
            "uops": sum(layer["uops"] for layer in layers),
        },
    }
    return Measured(golden, quantization)


def _macs(spec: dict[str, Any]) -> int:
    return ConvSpec.from_dict(spec).macs


def _agreement(floats: list[np.ndarray], quantized: list[np.ndarray]) -> dict[str, Any]:
    errors = [np.abs(q.astype(np.float64) - f) for f, q in zip(floats, quantized, strict=True)]
    top1 = [int(np.argmax(f)) == int(np.argmax(q)) for f, q in zip(floats, quantized, strict=True)]
    return {
        "samples": len(floats),
        "top1_agreement": float(np.mean(top1)),
        "max_abs_error": float(max(e.max() for e in errors)),
        "mean_abs_error": float(np.mean([e.mean() for e in errors])),
        "output_max_abs": float(max(np.abs(f).max() for f in floats)),
    }
