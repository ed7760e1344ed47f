"""ResNet-18 on VTA: ``python -m tests.bench_vta_model [--model NAME] [--repeats N]``.

Compiles the zoo model twice in this process, for this host's CPU (``x86_64``, as ``boost-build
compile`` makes it by default) and ``--target vta --board sim``; loads both the way the agent does
(runtime library only, VTA layers on the HLS-mode simulator) and prints the median time per
inference of each and their ratio (goal: VTA simulator <= 2x the CPU build), then per VTA layer:
instructions, micro-ops, bytes moved by DMA (from the simulator's counters) and the share of the
model's MACs that VTA executes. Figures, not tests: nothing is asserted.
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from agent.artifact import Manifest, generate_keypair, read_manifest
from agent.runtime import LoadedModel, TvmRuntime
from models import zoo
from models.compiler import CompileRequest, compile_model
from models.progress import Progress
from tests import bench_vta
from tests.bench_vta import median_s
from tests.support.figures import Figure, default_tuning
from vta.bundle import Bundle
from vta.drivers.sim import SimDriver
from vta.engine import LayerRunner, VtaEngine, register
from vta.lower import blocks


def unpack(artifact: Path, into: Path) -> Manifest:
    with tarfile.open(artifact) as tar:
        tar.extractall(into, filter="data")
    return Manifest.from_json(read_manifest(artifact)[0])


def model_macs(model: onnx.ModelProto) -> int:
    """MACs of every Conv and Gemm/MatMul of the float model (ONNX shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
    }
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            out = shapes[node.output[0]]
            _, i, kh, kw = weights[node.input[1]]
            total += int(np.prod(out)) * i * kh * kw
        elif node.op_type in ("Gemm", "MatMul"):
            n, k = weights[node.input[1]]
            total += n * k
    return total


def table_row(label: str, row: list[int]) -> str:
    """label, instructions, micro-ops, then the five byte counters in KB."""
    widths = (9, 9, 8, 8, 8)
    kb = "".join(f"{v / 1024:>{w}.0f}" for v, w in zip(row[2:], widths, strict=True))
    return f"{label:<36}{row[0]:>7}{row[1]:>7}{kb}"


@dataclass
class Builds:
    """A zoo model built for this CPU and for VTA (layers on the HLS-mode simulator), loaded."""

    source: zoo.ZooModel
    bundle: Bundle
    engine: VtaEngine
    vta_manifest: Manifest
    models: dict[str, LoadedModel]

    def median_s(self, repeats: int) -> dict[str, float]:
        """Median seconds per inference of each build, on the model's first sample."""
        name = self.vta_manifest.inputs[0].name
        feeds = {name: self.source.sample_inputs[name][:1]}
        return {t: median_s(lambda m=m: m.run(feeds), repeats) for t, m in self.models.items()}


def build_both(model: str, work: Path, quick: bool = False) -> Builds:
    source = zoo.get(model)
    key = work / "build.key"
    generate_keypair(key)
    onnx_path, npz = work / "model.onnx", work / "model.npz"
    source.save(str(onnx_path))
    source.save_inputs(str(npz))
    loaded: dict[str, tuple[Manifest, Path]] = {}
    runtime = TvmRuntime()
    tuning_db, minutes = default_tuning(quick)
    for target in ("x86_64", "vta"):
        request = CompileRequest(
            model=onnx_path,
            target=target,
            output=work / f"{target}.boost",
            inputs=npz,
            calibration=npz if target == "vta" else None,
            tune_minutes=minutes,
        )
        result = compile_model(request, tuning_db, key, "bench", Progress(False))
        loaded[target] = (unpack(result.artifact, work / target), work / target)
    # As on a device: the engine handles boost.vta.layer before any module is loaded (a
    # module binds the function it finds when it loads).
    bundle = Bundle.load(work / "vta")
    engine = VtaEngine(SimDriver(bundle.config, hls=True))
    register(engine)
    engine.add(bundle)
    models = {
        target: runtime.load(root / manifest.library, manifest.inputs, manifest.outputs)
        for target, (manifest, root) in loaded.items()
    }
    return Builds(source, bundle, engine, loaded["vta"][0], models)


def figures(quick: bool) -> list[Figure]:
    model = "tiny_cnn" if quick else "resnet18"
    with tempfile.TemporaryDirectory(prefix="bench-vta-") as tmp:
        builds = build_both(model, Path(tmp), quick)
        times = builds.median_s(3 if quick else 10)
        builds.engine.close()
    layer = bench_vta.measure()
    cpu_s, vta_s = times["x86_64"], times["vta"]
    fig = Figure(
        "vta",
        "VTA simulator vs the TVM CPU build, and simulator GOP/s vs BLAS",
        ["what", "VTA simulator", "baseline", "baseline is", "simulator / baseline"],
    )
    fig.rows = [
        [f"{model}: ms per inference", vta_s * 1e3, cpu_s * 1e3, "TVM CPU build (default compile)",
         vta_s / cpu_s],
        ["3x3 conv 56x56 64->64 int8: GOP/s", layer["gop"] / layer["sim_s"],
         layer["gop"] / layer["blas_s"], "numpy/BLAS im2col (the limit)",
         layer["sim_s"] / layer["blas_s"]],
    ]  # fmt: skip
    fig.notes.append(
        "the VTA build runs its int8 conv/dense layers on the simulator (HLS mode) and the rest on "
        "this CPU; the layer row is one ResNet-18 layer lowered the way the original VTA flow did"
    )

    def plot(ax: Any) -> None:
        ax.bar(["VTA simulator", "TVM CPU build"], [vta_s * 1e3, cpu_s * 1e3])
        ax.set_ylabel(f"{model}: ms per inference")

    fig.plot = plot
    return [fig]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18", choices=list(zoo.ZOO))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-vta-") as tmp:
        builds = build_both(args.model, Path(tmp))
        bundle, engine, source = builds.bundle, builds.engine, builds.source
        times = builds.median_s(args.repeats)
        cpu_s, vta_s = times["x86_64"], times["vta"]
        print(f"\n{'build':<34}{'ms/inference':>14}")
        print(f"{'TVM CPU build (x86_64, default)':<34}{cpu_s * 1e3:>14.1f}")
        print(f"{'VTA build, simulator + host CPU':<34}{vta_s * 1e3:>14.1f}")
        print(f"VTA simulator / CPU build: {vta_s / cpu_s:.2f}x (goal <= 2x)")

        print(f"\n{'layer':<36}{'insns':>7}{'uops':>7}{'inp KB':>9}{'wgt KB':>9}{'acc KB':>8}"
              f"{'out KB':>8}{'uop KB':>8}{'MMAC':>8}")  # fmt: skip
        totals = np.zeros(7)
        vta_macs = 0
        for index, layer in enumerate(bundle.layers):
            spec, cfg = layer.spec, bundle.config
            driver = SimDriver(cfg, hls=True)
            runner = LayerRunner(driver, layer)
            x = np.zeros(
                (blocks(spec.in_channels, cfg), spec.height, spec.width, cfg.block), np.int8
            )
            out = np.zeros(layer.output.nbytes, np.int8)
            inputs = [x] + ([out.copy()] if layer.residual is not None else [])
            runner.run(inputs, out)
            c = driver.simulator.counters
            row = [len(layer.insns), layer.uop_count, c.inp_load_nbytes, c.wgt_load_nbytes,
                   c.acc_load_nbytes, c.out_store_nbytes, c.uop_load_nbytes]  # fmt: skip
            totals += row
            vta_macs += spec.macs
            label = (
                f"{index:>2} {spec.in_channels}->{spec.out_channels} {spec.kernel[0]}x"
                f"{spec.kernel[1]}/{spec.stride[0]} {spec.height}x{spec.width}"
                + (" +res" if spec.residual_shift is not None else "")
            )
            print(table_row(label, row) + f"{spec.macs / 1e6:>8.1f}")
        print(table_row("total", [int(v) for v in totals]))
        everything = model_macs(source.model)
        print(f"\nMACs on VTA: {vta_macs / 1e6:.1f} M of {everything / 1e6:.1f} M "
              f"({100 * vta_macs / everything:.1f}%)")  # fmt: skip
        quant = builds.vta_manifest.quantization
        assert quant is not None
        print("accuracy vs float:", quant["accuracy"])
        engine.close()


if __name__ == "__main__":
    main()
