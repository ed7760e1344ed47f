"""``boost-build bench MODEL``: one model on every engine this machine has, side by side.

Engines: ``tvm``, the build ``boost-build compile`` makes for this CPU (tuning records for it
applied; with ``--tune-trials N`` tuned first); ``tvm-untuned``, the same build without records
(shown when the first had some); ``onnxruntime``; and with ``--target vta`` the VTA build with its
layers on the simulator (``vta-sim``). Every engine runs the same input with the same threads
(``TVM_NUM_THREADS`` and ONNX Runtime's ``intra_op_num_threads``), in a fresh process per thread
count. The engines take turns: runs back to back in blocks (``BLOCK_RUNS``), each block after a
pause that lets the previous engine's spinning threads stop and a run that is not timed; latencies
are percentiles over the runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.engines import CPU_ENGINE, ORT_ENGINE
from agent.errors import BoostError
from agent.runtime import KernelCall, TvmRuntime
from models.compiler import CompileRequest, compile_model
from models.progress import Progress

TVM, ORT = CPU_ENGINE, ORT_ENGINE
UNTUNED, VTA_SIM = "tvm-untuned", "vta-sim"
#: Runs of one engine back to back, a block; the engines' blocks alternate. Before each block the
#: engine runs once unmeasured, after a pause longer than the previous engine's thread pool keeps
#: spinning (TVM's: about 70 ms after a run, measured here); a spinning pool would take a core
#: from the engine being timed.
BLOCK_RUNS = 5
SETTLE_S = 0.1


@dataclass(frozen=True)
class Latency:
    engine: str
    threads: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    runs: int


def build_engines(
    model: Path,
    target: str,
    work: Path,
    tuning_db: Path,
    signing_key: Path,
    trials: int = 0,
    tune_minutes: float = 0.0,
    inputs: Path | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, Path], int]:
    """The artifacts to compare, by engine, and the tuning records the ``tvm`` build applied."""
    progress = progress or Progress(False)
    builds: dict[str, Path] = {}
    if target not in ("x86_64", "vta"):
        raise BoostError(f"bench runs on this machine: --target x86_64 or vta, not {target!r}")

    def compile_for(engine: str, request: CompileRequest) -> int:
        result = compile_model(request, tuning_db, signing_key, "bench", progress)
        builds[engine] = result.artifact
        return result.tuning_records

    cpu = CompileRequest(
        model=model,
        target="x86_64",
        trials=trials,
        tune_minutes=tune_minutes,
        output=work / "tvm.boost",
    )
    records = compile_for(TVM, cpu)
    if records:
        plain = CompileRequest(
            model=model, target="x86_64", output=work / "untuned.boost", tuned=False
        )
        compile_for(UNTUNED, plain)
    if target == "vta":
        vta = CompileRequest(
            model=model, target="vta", board="sim", inputs=inputs, output=work / "vta.boost"
        )
        compile_for(VTA_SIM, vta)
    return builds, records


def measure(
    builds: dict[str, Path],
    model: Path,
    public_key: Path,
    threads: int,
    runs: int,
    work: Path,
    layers: bool = False,
) -> tuple[list[Latency], list[Layer]]:
    """Time every build and ONNX Runtime in a child process with ``threads`` threads; with
    ``layers``, also where the ``tvm`` build and ONNX Runtime spend their time, layer by layer
    (``pair_layers``)."""
    spec = {
        "builds": {engine: str(path) for engine, path in builds.items()},
        "model": str(model),
        "public_key": str(public_key),
        "threads": threads,
        "runs": runs,
        "work": str(work / f"unpacked-{threads}"),
        "layers": layers,
    }
    env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(
        [sys.executable, "-m", "models.bench", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BoostError(f"the timing process failed: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    paired = [
        Layer(**{**row, "shape": tuple(row["shape"]), "kernels": tuple(row["kernels"])})
        for row in result["layers"]
    ]
    return [Latency(**row) for row in result["latency"]], paired


#: Kinds of layer, by the first operator of a TVM kernel's name and by ONNX Runtime's op type.
LAYER_KINDS = {
    "conv": (("conv2d",), ("Conv", "FusedConv")),
    "dense": (("matmul", "dense", "gemv"), ("Gemm", "MatMul", "FusedGemm", "FusedMatMul")),
    "pool": (
        ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "mean"),
        ("MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean"),
    ),
    "runtime": (("vm.builtin",), ()),
}
OTHER = "other (elementwise, reshapes)"


def layer_kind(tvm_symbol: str = "", ort_op: str = "") -> str:
    first = tvm_symbol.removeprefix("fused_").rstrip("0123456789_")
    for kind, (tvm_ops, ort_ops) in LAYER_KINDS.items():
        if ort_op in ort_ops or (tvm_symbol and any(first.startswith(op) for op in tvm_ops)):
            return kind
    return OTHER


@dataclass(frozen=True)
class Layer:
    """A node of ONNX Runtime's (``op`` its type) with the TVM kernels that compute its output,
    or a TVM call no node was paired with (``name`` and ``op`` empty): ms per run."""

    name: str
    op: str
    shape: tuple[int, ...]
    ort_ms: float
    tvm_ms: float
    kernels: tuple[str, ...]

    @property
    def kind(self) -> str:
        return layer_kind(ort_op=self.op) if self.op else layer_kind(tvm_symbol=self.kernels[0])


def pair_layers(nodes: list[Layer], calls: list[KernelCall]) -> list[Layer]:
    """ONNX Runtime's ``nodes``, in the order it ran them, each given the TVM kernels that ran
    after the previous node's, up to the first that writes the node's output (``_writer``); a node
    whose output no later kernel writes gets none. The VM's builtins, and the kernels after the
    last pair, are layers of their own (one per symbol)."""
    layers, unpaired, start = [], [], 0
    for node in nodes:
        end = _writer(calls, start, node.shape)
        if end < 0:
            layers.append(node)
            continue
        run = calls[start : end + 1]
        kernels = [call for call in run if call.shape]
        unpaired += [call for call in run if not call.shape]
        ms, symbols = sum(call.ms for call in kernels), tuple(call.symbol for call in kernels)
        layers.append(dataclasses.replace(node, tvm_ms=ms, kernels=symbols))
        start = end + 1
    unpaired += calls[start:]
    for symbol in dict.fromkeys(call.symbol for call in unpaired):
        ms = sum(call.ms for call in unpaired if call.symbol == symbol)
        layers.append(Layer("", "", (), 0.0, ms, (symbol,)))
    return layers


def _writer(calls: list[KernelCall], start: int, ort_shape: tuple[int, ...]) -> int:
    """The index of the first call from ``start`` on that writes a tensor of ``ort_shape`` or its
    channels-last form (the CPU build's convolutions run NHWC); -1 if none does. ONNX Runtime's
    blocked-layout (NCHWc) nodes report their channels rounded up to its block of 8 or 16: such
    a match counts where no kernel writes the exact shape."""
    exact, padded = {ort_shape}, set()
    if len(ort_shape) == 4:
        n, c, h, w = ort_shape
        exact.add((n, h, w, c))
        for channels in range(max(1, c - 15), c):
            if c in (-(-channels // 8) * 8, -(-channels // 16) * 16):
                padded |= {(n, channels, h, w), (n, h, w, channels)}
    for wanted in (exact, padded):
        found = next((i for i in range(start, len(calls)) if calls[i].shape in wanted), -1)
        if found >= 0:
            return found
    return -1


def kinds(layers: list[Layer]) -> dict[str, dict[str, float]]:
    """ms per run by kind of layer, of the TVM build and of ONNX Runtime."""
    out: dict[str, dict[str, float]] = {}
    for layer in layers:
        kind = out.setdefault(layer.kind, {TVM: 0.0, ORT: 0.0})
        kind[TVM] += layer.tvm_ms
        kind[ORT] += layer.ort_ms
    return out


def _layers(
    loaded: Any, model: str, feeds: dict[str, np.ndarray], threads: int, runs: int, work: Path
) -> list[Layer]:
    """ONNX Runtime's nodes (its profiler, on a session of its own) paired with the TVM build's
    kernels (the VM's instrument hook), ms per run."""
    calls = loaded.kernel_calls(feeds, runs)
    session = _ort_session(model, threads, profile=work / "ort-profile")
    for _ in range(runs + 1):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    timed = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(timed) // (runs + 1)  # the first run's nodes: the warm-up
    nodes = []
    for i, event in enumerate(timed[:per_run]):
        runs_of_node = timed[per_run + i :: per_run]
        (shape,) = (event["args"].get("output_type_shape") or [{"": []}])[0].values()
        nodes.append(
            Layer(
                event["name"].removesuffix("_kernel_time"),
                event["args"]["op_name"],
                tuple(shape),
                sum(e["dur"] for e in runs_of_node) / 1e3 / runs,
                0.0,
                (),
            )
        )
    return pair_layers(nodes, calls)


def _time_engines(spec: dict[str, Any]) -> dict[str, Any]:
    """The child's side of ``measure``: load everything, then time the engines in rounds."""

    from agent.artifact import load_public_key, open_artifact
    from vta.bundle import INDEX

    trusted = [load_public_key(Path(spec["public_key"]))]
    runtime = TvmRuntime()
    runners: dict[str, Any] = {}
    loaded_models: dict[str, Any] = {}
    feeds: dict[str, np.ndarray] = {}
    for engine, path in spec["builds"].items():
        verified = open_artifact(Path(path), trusted, Path(spec["work"]) / engine)
        manifest = verified.manifest
        if manifest.target.accelerator:
            _simulated_vta(verified.path(INDEX).parent)
        loaded = runtime.load(verified.path(manifest.library), manifest.inputs, manifest.outputs)
        loaded_models[engine] = loaded
        runners[engine] = loaded.run
        if not feeds:
            rng = np.random.default_rng(0)
            feeds = {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in manifest.inputs}
    session = _ort_session(spec["model"], spec["threads"])
    runners[ORT] = lambda f: session.run(None, f)
    samples: dict[str, list[float]] = {engine: [] for engine in runners}
    for round_, done in enumerate(range(0, spec["runs"], BLOCK_RUNS)):
        order = list(runners)
        order = order[round_ % len(order) :] + order[: round_ % len(order)]
        for engine in order:
            time.sleep(SETTLE_S)
            runners[engine](feeds)
            for _ in range(min(BLOCK_RUNS, spec["runs"] - done)):
                start = time.perf_counter()
                runners[engine](feeds)
                samples[engine].append((time.perf_counter() - start) * 1e3)
    latency = []
    for engine, s in samples.items():
        p50, p90, p99 = (round(float(np.percentile(s, q)), 4) for q in (50, 90, 99))
        latency.append(asdict(Latency(engine, spec["threads"], p50, p90, p99, len(s))))
    layers: list[Layer] = []
    if spec["layers"]:
        tvm = loaded_models[TVM]
        layers = _layers(tvm, spec["model"], feeds, spec["threads"], 10, Path(spec["work"]))
    return {"latency": latency, "layers": [asdict(layer) for layer in layers]}


def _ort_session(model: str, threads: int, profile: Path | None = None) -> Any:
    """ONNX Runtime on the CPU with ``threads`` threads; with ``profile``, its profiler on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _simulated_vta(root: Path) -> None:
    """Register the simulator as ``boost.vta.layer`` with the build's layers on it."""
    from vta.bundle import Bundle
    from vta.drivers.sim import SimDriver
    from vta.engine import VtaEngine, register

    bundle = Bundle.load(root)
    engine = VtaEngine(SimDriver(bundle.config, hls=True))
    register(engine)
    engine.add(bundle)


def table(latencies: list[Latency]) -> str:
    """The comparison as text: one line per engine and thread count, with the ratio to ORT."""
    ort_p50 = {lat.threads: lat.p50_ms for lat in latencies if lat.engine == ORT}
    lines = [f"{'engine':<14}{'threads':>8}{'p50 ms':>11}{'p90 ms':>11}{'p99 ms':>11}{'/ ORT':>8}"]
    for lat in latencies:
        ratio = lat.p50_ms / ort_p50[lat.threads]
        lines.append(
            f"{lat.engine:<14}{lat.threads:>8}{lat.p50_ms:>11.3f}{lat.p90_ms:>11.3f}"
            f"{lat.p99_ms:>11.3f}{ratio:>7.2f}x"
        )
    return "\n".join(lines)


def kind_table(layers: list[Layer]) -> str:
    """ms per run by kind of layer, the kinds where the TVM build spends most first."""
    lines = [f"{'layers':<30}{'tvm ms':>10}{'ORT ms':>10}{'tvm / ORT':>11}"]
    for kind, ms in sorted(kinds(layers).items(), key=lambda kv: -kv[1][TVM]):
        ratio = f"{ms[TVM] / ms[ORT]:>10.2f}x" if ms[ORT] else f"{'-':>11}"
        lines.append(f"{kind:<30}{ms[TVM]:>10.3f}{ms[ORT]:>10.3f}{ratio}")
    return "\n".join(lines)


def layer_table(layers: list[Layer]) -> str:
    """Layer by layer in ONNX Runtime's order, then the TVM calls paired with no node: ms per
    run of each engine, and the TVM kernels."""
    lines = [
        f"{'ORT node':<32}{'op':<18}{'output':<16}{'ORT ms':>8}{'tvm ms':>8}{'tvm-ORT':>9}"
        "  tvm kernels"
    ]
    for layer in layers:
        shape = "x".join(str(d) for d in layer.shape) or "-"
        lines.append(
            f"{layer.name[:31] or '-':<32}{layer.op[:17] or '-':<18}{shape:<16}"
            f"{layer.ort_ms:>8.3f}{layer.tvm_ms:>8.3f}{layer.tvm_ms - layer.ort_ms:>+9.3f}"
            f"  {', '.join(layer.kernels) or '-'}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(_time_engines(json.loads(sys.argv[1]))))
