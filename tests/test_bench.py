"""The benchmark tools run and say what they measured: ``boost-build bench`` on a model, and the
suite's figures (small sizes) with their JSON, PNG and markdown outputs. The figures themselves
are not asserted (they depend on the machine); what must hold whatever the machine is."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.runtime import KernelCall
from models import bench
from models.bench import OTHER, Layer
from tests import bench_suite
from tests.conftest import run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_boost_build_bench_compares_the_engines_of_a_model(
    zoo_model: Callable[[str], Path], tmp_path: Path
) -> None:
    model = zoo_model("tiny_cnn")
    out = tmp_path / "bench.json"
    done = run_cli(
        "models.cli", "bench", str(model), "--target", "vta", "--inputs",
        str(model.with_suffix(".npz")), "--threads", "1,2", "--runs", "7", "--json", str(out),
        "--tune-trials", "0", "--layers",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    lines = done.stdout.splitlines()
    assert lines[1].split()[:5] == ["engine", "threads", "p50", "ms", "p90"]
    document = json.loads(out.read_text())
    rows = document["latency"]
    assert {(r["engine"], r["threads"]) for r in rows} == {
        (engine, threads) for engine in ("tvm", "vta-sim", "onnxruntime") for threads in (1, 2)
    }
    # 7 runs: a whole block of BLOCK_RUNS and part of another, exactly the runs asked for
    assert all(0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["runs"] == 7 for r in rows)
    assert "layer by layer, 2 threads (ms per run)" in done.stdout
    for threads in ("1", "2"):
        layers = document["layers"][threads]
        convs = [layer for layer in layers if layer["op"] in ("Conv", "FusedConv")]
        assert len(convs) == 2  # tiny_cnn's two convolutions, with ReLU fused by both engines
        for conv in convs:
            assert conv["ort_ms"] > 0 and conv["tvm_ms"] > 0, conv
            assert any("conv2d" in kernel for kernel in conv["kernels"]), conv
        # Every TVM kernel was paired with a node; only the VM's own calls stand alone.
        alone = [layer["kernels"] for layer in layers if not layer["op"]]
        assert alone and all(k.startswith("vm.builtin.") for (k,) in alone), alone


def test_layers_pair_each_onnx_runtime_node_with_the_tvm_kernels_that_write_its_output() -> None:
    calls = [
        KernelCall("transpose", (1, 8, 8, 3), 0.1),  # the input, channels-last
        KernelCall("vm.builtin.alloc_tensor", (), 0.01),
        KernelCall("fused_conv2d_add_relu", (1, 8, 8, 16), 1.0),
        KernelCall("vm.builtin.alloc_tensor", (), 0.02),
        KernelCall("fused_conv2d_pointwise", (1, 4, 4, 24), 2.0),
        KernelCall("mean", (1, 1, 1, 24), 0.3),
        KernelCall("fused_matmul_add", (1, 10), 0.5),
        KernelCall("vm.builtin.null_value", (), 0.03),
    ]
    nodes = [
        # (1, 8, 8, 3) would be a 3-channel tensor in ONNX Runtime's 16-channel blocks: the
        # exact match, later, wins.
        Layer("conv_a", "Conv", (1, 16, 8, 8), 0.9, 0.0, ()),
        Layer("conv_b", "FusedConv", (1, 32, 4, 4), 1.5, 0.0, ()),  # 24 channels in blocks of 16
        Layer("gap", "GlobalAveragePool", (1, 24, 1, 1), 0.2, 0.0, ()),
        Layer("ReorderOutput", "ReorderOutput", (1, 24, 1, 1), 0.05, 0.0, ()),  # none writes it
        Layer("gemm", "Gemm", (1, 10), 0.4, 0.0, ()),
    ]
    layers = bench.pair_layers(nodes, calls)
    assert [(layer.name, layer.kernels) for layer in layers] == [
        ("conv_a", ("transpose", "fused_conv2d_add_relu")),
        ("conv_b", ("fused_conv2d_pointwise",)),
        ("gap", ("mean",)),
        ("ReorderOutput", ()),
        ("gemm", ("fused_matmul_add",)),
        ("", ("vm.builtin.alloc_tensor",)),
        ("", ("vm.builtin.null_value",)),
    ]
    assert [layer.tvm_ms for layer in layers] == pytest.approx([1.1, 2.0, 0.3, 0, 0.5, 0.03, 0.03])
    by_kind = {(k, e): ms for k, both in bench.kinds(layers).items() for e, ms in both.items()}
    assert by_kind == pytest.approx(
        {
            ("conv", bench.TVM): 3.1, ("conv", bench.ORT): 2.4,
            ("pool", bench.TVM): 0.3, ("pool", bench.ORT): 0.2,
            (OTHER, bench.TVM): 0.0, (OTHER, bench.ORT): 0.05,
            ("dense", bench.TVM): 0.5, ("dense", bench.ORT): 0.4,
            ("runtime", bench.TVM): 0.06, ("runtime", bench.ORT): 0.0,
        }
    )  # fmt: skip


def test_bench_command_refuses_a_target_it_cannot_run(
    zoo_model: Callable[[str], Path], tmp_path: Path
) -> None:
    done = run_cli(
        "models.cli", "bench", str(zoo_model("tiny_cnn")), "--target", "aarch64", cwd=tmp_path
    )
    assert done.returncode != 0 and "invalid choice: 'aarch64'" in done.stderr


def test_the_suite_writes_json_plots_and_a_summary(tmp_path: Path) -> None:
    assert bench_suite.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    figures = results["figures"]
    assert set(figures) == {"cpu", "cpu-layers", "vta", "agent", "fleet", "cache"}
    for name in ("cpu", "vta", "agent", "fleet", "cache"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert [(r[0], r[1]) for r in figures["cpu"]["rows"]] == [("tiny_cnn", 1), ("tiny_cnn", 2)]
    assert all(r[2] > 0 and r[3] > 0 and r[4] == r[2] / r[3] for r in figures["cpu"]["rows"])
    kinds = {r[1]: r for r in figures["cpu-layers"]["rows"]}
    assert kinds["conv"][2] > 0 and kinds["conv"][3] > 0  # both engines' convolutions were timed
    assert all(r[1] > 0 and r[2] > 0 for r in figures["vta"]["rows"])
    agent = {r[0]: r for r in figures["agent"]["rows"]}
    assert (
        agent["inference round trip over MQTT"][1] > agent["inference, direct call of the build"][1]
    )
    notes = " ".join(figures["agent"]["notes"])
    assert "cold: accepted > downloading" in notes and "re-activation: accepted > loading" in notes
    for devices, seen, active, *_ in figures["fleet"]["rows"]:
        assert devices == seen == active  # every simulated device reported the model active
    for slots, *ratios in figures["cache"]["rows"]:
        optimal = ratios[-1]
        assert all(0 < r <= optimal for r in ratios), (slots, ratios)  # Belady is the optimum
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# Benchmark summary")
    assert "| devices | seen online | active |" in summary
    assert "python -m tests.bench_suite --quick --out" in summary


def test_bench_command_refuses_counts_below_one(
    zoo_model: Callable[[str], Path], tmp_path: Path
) -> None:
    model = str(zoo_model("tiny_cnn"))
    for args, message in (
        (["--threads", "1,x"], "argument --threads: 'x': expected a whole number of 1 or more"),
        (["--runs", "0"], "argument --runs: '0': expected a whole number of 1 or more"),
    ):
        done = run_cli("models.cli", "bench", model, *args, cwd=tmp_path)
        assert done.returncode == 2 and message in done.stderr, done.stderr
