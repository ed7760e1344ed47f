"""Build figures: compile time and artifact size per zoo model and target, and the x86 build's
latency against ONNX Runtime on the same input and thread count (medians, measured side by side).

    python -m models.bench [--models tiny_cnn,resnet18] [--targets x86_64,aarch64] [--threads 2]
                           [--tune-trials N] [--json OUT.json]

Set TVM_NUM_THREADS to the same value as --threads so both engines use equal threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.artifact import generate_keypair, load_public_key, open_artifact
from agent.runtime import TvmRuntime
from models import zoo
from models.compiler import CompileRequest, compile_model
from models.progress import Progress


def median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="tiny_cnn,digits_cnn,resnet18,mobilenetv2")
    parser.add_argument("--targets", default="x86_64,aarch64,armv7")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tune-trials", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key = work / "k.key"
        public = load_public_key(generate_keypair(key))
        runtime = TvmRuntime()
        for name in args.models.split(","):
            model = zoo.get(name)
            onnx_path = work / f"{name}.onnx"
            model.save(str(onnx_path))
            for target in args.targets.split(","):
                trials = args.tune_trials if target == "x86_64" else 0
                request = CompileRequest(
                    model=onnx_path,
                    target=target,
                    trials=trials,
                    output=work / f"{name}-{target}.boost",
                )
                result = compile_model(request, work / "tuning", key, "bench", Progress(False))
                row: dict[str, Any] = {
                    "model": name,
                    "target": target,
                    "tune_trials": trials,
                    "compile_s": round(result.seconds, 2),
                    "artifact_mb": round(result.artifact.stat().st_size / 1e6, 3),
                }
                if target == "x86_64":
                    verified = open_artifact(result.artifact, [public], work / f"{name}-x")
                    m = verified.manifest
                    loaded = runtime.load(verified.path(m.library), m.inputs, m.outputs)
                    feeds = {"input": model.sample_inputs["input"][:1]}
                    options = ort.SessionOptions()
                    options.intra_op_num_threads = args.threads
                    options.inter_op_num_threads = 1
                    session = ort.InferenceSession(model.model.SerializeToString(), options)
                    tvm_ms = median_ms(lambda: loaded.run(feeds), args.repeats)  # noqa: B023
                    ort_ms = median_ms(lambda: session.run(None, feeds), args.repeats)  # noqa: B023
                    got, want = loaded.run(feeds)[0], session.run(None, feeds)[0]
                    row.update(
                        tvm_ms=round(tvm_ms, 3),
                        ort_ms=round(ort_ms, 3),
                        tvm_over_ort=round(tvm_ms / ort_ms, 2),
                        max_abs_diff=float(np.abs(got - want).max()),
                    )
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
