"""The benchmark suite: every figure of the project, measured side by side in one run.

    make bench      # = .venv/bin/python -m tests.bench_suite --out .boost/bench

writes ``results.json`` (every measurement), one PNG per figure and ``summary.md`` (the tables).
Each figure is a ratio of two things measured in the same run, medians over repeated runs (these
machines are noisy); nothing is asserted. ``--only cpu,cache`` runs some figures; ``--quick``
runs each with small sizes (what the test suite checks).

Figures:

- ``cpu``: TVM build (what ``boost-build compile`` makes by default) against ONNX Runtime, on the
  zoo's ResNet-18- and MobileNetV2-shaped models, 1 and 2 threads (``boost-build bench``).
- ``vta``: the VTA simulator's time per inference against the TVM CPU build of the same model, and
  the simulator's GOP/s against numpy/BLAS on the same layer.
- ``agent``: deploy command to active (cold, and re-activation from the cache), start to birth,
  idle RSS, inference round trip over MQTT against a direct call of the same build.
- ``fleet``: N simulated devices in a few processes on one Mosquitto: deploy to all, time until
  all are active, and the broker's message rate.
- ``cache``: hit ratio of the agent's LFU-with-aging policy against LRU and the optimal (Belady)
  policy on a Zipf-like trace whose popularity drifts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.artifact import generate_keypair
from models import bench, zoo
from tests import bench_agent, bench_cache, bench_fleet, bench_vta_model
from tests.support.figures import Figure, default_tuning

#: Runs of the TVM build and of ONNX Runtime for each CPU ratio: this machine's speed drifts
#: by 10-30% within minutes, and the ratio's median takes many alternating blocks to settle.
RATIO_RUNS = 200


def cpu_figures(quick: bool) -> list[Figure]:
    names = ["tiny_cnn"] if quick else ["resnet18", "mobilenetv2"]
    runs = 5 if quick else RATIO_RUNS
    latency = Figure(
        "cpu",
        "CPU latency: TVM build vs ONNX Runtime (ms, median)",
        ["model", "threads", "TVM ms", "ORT ms", "TVM / ORT", "untuned TVM ms", "tuning records"],
    )
    layers = Figure(
        "cpu-layers",
        "Where the time goes, 2 threads: TVM build vs ONNX Runtime by kind of layer (ms per run)",
        ["model", "layers", "TVM ms", "ORT ms", "TVM / ORT"],
    )
    # What compile does by default; nothing to tune where the shipped records cover this CPU.
    tuning_db, minutes = default_tuning(quick)
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        work = Path(tmp)
        key = work / "bench.key"
        public = generate_keypair(key)
        for name in names:
            model = work / f"{name}.onnx"
            zoo.get(name).save(str(model))
            builds, records = bench.build_engines(
                model, "x86_64", work / name, tuning_db, key, tune_minutes=minutes
            )
            for threads in (1, 2):
                # The ratio gets many runs; the untuned build (some 40x slower) only a few.
                measured, paired = bench.measure(
                    {bench.TVM: builds[bench.TVM]},
                    model,
                    public,
                    threads,
                    runs,
                    work / name,
                    threads == 2,
                )
                times = {lat.engine: lat.p50_ms for lat in measured}
                tvm, ort = times[bench.TVM], times[bench.ORT]
                untuned: float | str = ""
                if bench.UNTUNED in builds:
                    untuned_build = {bench.UNTUNED: builds[bench.UNTUNED]}
                    slow, _ = bench.measure(untuned_build, model, public, threads, 5, work / name)
                    untuned = next(lat.p50_ms for lat in slow if lat.engine == bench.UNTUNED)
                latency.rows.append([name, threads, tvm, ort, tvm / ort, untuned, records])
                by_kind = bench.kinds(paired).items()
                for kind, ms in sorted(by_kind, key=lambda kv: -kv[1][bench.TVM]):
                    tvm_ms, ort_ms = ms[bench.TVM], ms[bench.ORT]
                    ratio = tvm_ms / ort_ms if ort_ms else ""
                    layers.rows.append([name, kind, tvm_ms, ort_ms, ratio])
    latency.notes.append(
        "same input, same thread count (TVM_NUM_THREADS, ORT intra_op_num_threads), the "
        f"engines' runs back to back in alternating blocks of {bench.BLOCK_RUNS}, "
        f"{runs} runs of each (the untuned build: 5, timed apart); the build is "
        "what compile makes by default: it applies the tuning records for the model and this "
        "CPU (the user's database and the shipped ones) and tunes the kernels without any; "
        "untuned: the same build without records"
    )
    layers.notes.append(
        "TVM: each kernel the VM calls, timed by the VM's instrument hook, grouped by its first "
        "operator; ONNX Runtime: its profiler's node times, grouped by op type"
    )

    def plot(ax: Any) -> None:
        labels = [f"{r[0]}\n{r[1]} thr" for r in latency.rows]
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], [r[2] for r in latency.rows], 0.4, label="TVM build")
        ax.bar([x + 0.2 for x in xs], [r[3] for r in latency.rows], 0.4, label="ONNX Runtime")
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel("ms per inference")
        ax.set_yscale("log")
        ax.legend()

    latency.plot = plot
    return [latency, layers]


FIGURES: dict[str, Callable[[bool], list[Figure]]] = {
    "cpu": cpu_figures,
    "vta": bench_vta_model.figures,
    "agent": bench_agent.figures,
    "fleet": bench_fleet.figures,
    "cache": bench_cache.figures,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".boost/bench"))
    parser.add_argument("--only", help=f"comma-separated figures (default: all of {list(FIGURES)})")
    parser.add_argument("--quick", action="store_true", help="small sizes (for the tests)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        parser.error(f"unknown figures {unknown}; known: {', '.join(FIGURES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    command = "python -m tests.bench_suite " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict[str, Any] = {"command": command.strip(), "figures": {}}
    summary = [f"# Benchmark summary\n\n`{command.strip()}`\n"]
    for name in names:
        start = time.monotonic()
        print(f"figure {name} ...", flush=True)
        figures = FIGURES[name](args.quick)
        for figure in figures:
            figure.notes.append(f"measured in {time.monotonic() - start:.0f} s")
            results["figures"][figure.name] = figure.to_json()
            summary.append(figure.markdown())
            print(figure.markdown(), flush=True)
            if figure.plot is not None:
                fig, ax = plt.subplots(figsize=(8, 4.5))
                figure.plot(ax)
                ax.set_title(figure.title)
                fig.tight_layout()
                fig.savefig(args.out / f"{figure.name}.png", dpi=100)
                plt.close(fig)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "summary.md").write_text("\n".join(summary))
    print(f"wrote {args.out}/results.json, summary.md and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
