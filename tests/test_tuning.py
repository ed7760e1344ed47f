"""MetaSchedule records are keyed, stored, and reapplied by a later compile with no trials."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.artifact import load_public_key, open_artifact
from agent.runtime import TvmRuntime, golden_check
from models import targets, tvm_backend
from models.compiler import CompileRequest, compile_model, load_onnx
from models.progress import Progress
from models.tuning import SHIPPED, TuningDatabase, TuningKey
from tests.conftest import run_cli


def test_tuning_key_separates_targets_and_versions() -> None:
    x86 = targets.resolve("x86_64").tvm_dict()
    base = TuningKey("ab" * 32, x86, "0.27.0")
    assert base.digest == TuningKey("ab" * 32, dict(x86), "0.27.0").digest
    assert base.digest != TuningKey("ab" * 32, {**x86, "num-cores": 1}, "0.27.0").digest
    assert base.digest != TuningKey("ab" * 32, x86, "0.28.0").digest
    assert base.digest != TuningKey("cd" * 32, x86, "0.27.0").digest
    assert base.digest != TuningKey("ab" * 32, x86, "0.27.0", tvm_backend.SPACES + 1).digest


@pytest.mark.slow
def test_second_compile_reuses_tuning_records(
    zoo_model: Callable[[str], Path], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    model = zoo_model("tiny_cnn")
    db = tmp_path / "tuning"

    def compile_with(trials: int, tuning_db: Path, out: str) -> tuple[dict[str, object], Path]:
        request = CompileRequest(model=model, target="x86_64", trials=trials, output=tmp_path / out)
        result = compile_model(request, tuning_db, keys[0], "test", Progress(False))
        verified = open_artifact(
            result.artifact, [load_public_key(keys[1])], tmp_path / out.replace(".", "_")
        )
        return result.manifest.tuning, verified.path("model.so")

    tuned, _ = compile_with(4, db, "tuned.boost")
    records = tuned["records"]
    assert isinstance(records, int) and records > 0
    key_dirs = list(db.iterdir())
    assert len(key_dirs) == 1
    key = json.loads((key_dirs[0] / "key.json").read_text())
    assert key["target"]["mcpu"] == tvm_backend.host_cpu()
    assert key["tvm_version"] == tvm_backend.version()
    assert key["spaces"] == tvm_backend.SPACES

    reused, reused_lib = compile_with(0, db, "reused.boost")
    assert reused == {
        "key": tuned["key"],
        "records": records,
        "trials_this_build": 0,
        "untuned_kernels": tuned["untuned_kernels"],
    }
    assert TuningDatabase(db).record_count(TuningKey(**key)) == records

    untuned, untuned_lib = compile_with(0, tmp_path / "empty-db", "untuned.boost")
    assert untuned["records"] == 0
    assert untuned["untuned_kernels"] > reused["untuned_kernels"]
    # The records change the generated code; reusing them reproduces the tuned build's kernels.
    assert untuned_lib.read_bytes() != reused_lib.read_bytes()


def two_layer_mlp(path: Path) -> Path:
    """x(1, 64) -> dense 64x32 + relu -> dense 32x10: two kernels to tune, quickly."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        for name, shape in (("w1", (64, 32)), ("w2", (32, 10)))
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what ONNX Runtime reads
    onnx.save(model, path)
    return path


def test_bounded_tuning_tunes_the_kernels_without_records(
    keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """The default of ``boost-build compile``: every kernel gets one round of candidates even
    when the time is up at once, the build applies them, and a later compile tunes only the
    kernels that still have no record."""
    model = two_layer_mlp(tmp_path / "mlp.onnx")
    db = tmp_path / "tuning"

    def compile_bounded(out: str) -> dict[str, int]:
        request = CompileRequest(
            model=model, target="x86_64", tune_minutes=0.001, output=tmp_path / out
        )
        result = compile_model(request, db, keys[0], "test", Progress(False))
        verified = open_artifact(result.artifact, [load_public_key(keys[1])], tmp_path / out[:-6])
        m = verified.manifest
        loaded = TvmRuntime().load(verified.path(m.library), m.inputs, m.outputs)
        report = golden_check(loaded, verified.path(m.golden.file), m.golden.rtol, m.golden.atol)
        assert report.passed, report.describe()
        return {k: int(v) for k, v in result.manifest.tuning.items() if k != "key"}

    first = compile_bounded("first.boost")
    records_file = next(db.iterdir()) / tvm_backend.RECORDS_FILE
    lines = records_file.read_text().splitlines()
    workloads = {json.loads(line)[0] for line in lines}
    assert first["trials_this_build"] == first["records"] == len(lines) > 0
    assert first["untuned_kernels"] == 0
    assert len(workloads) == 2, "one round of candidates for each of the two dense kernels"
    assert compile_bounded("again.boost")["trials_this_build"] == 0

    forgotten = max(workloads)
    records_file.write_text(
        "".join(line + "\n" for line in lines if json.loads(line)[0] != forgotten)
    )
    kept = len(records_file.read_text().splitlines())
    third = compile_bounded("third.boost")
    added = records_file.read_text().splitlines()[kept:]
    assert third["trials_this_build"] == len(added) > 0
    assert {json.loads(line)[0] for line in added} == {forgotten}


def jsonl(*rows: object) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def read_jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_shipped_records_join_the_users_once(tmp_path: Path) -> None:
    key = TuningKey("ab" * 32, targets.resolve("x86_64").tvm_dict(), "0.27.0")
    shipped = tmp_path / "shipped"
    (shipped / key.digest).mkdir(parents=True)
    for name, text in (
        (tvm_backend.WORKLOADS_FILE, jsonl(["h0", "conv"], ["h1", "dense"])),
        (tvm_backend.RECORDS_FILE, jsonl([0, ["trace a"]], [1, ["trace b"]])),
    ):
        (shipped / key.digest / f"{name}.gz").write_bytes(gzip.compress(text.encode()))
    db = TuningDatabase(tmp_path / "user", shipped)
    assert db.record_count(key) == 2
    assert db.record_count(TuningKey("cd" * 32, key.target, key.tvm_version)) == 0
    directory = db.prepare(key)
    records = directory / tvm_backend.RECORDS_FILE
    assert records.read_text() == jsonl([0, ["trace a"]], [1, ["trace b"]])
    with records.open("a") as tuning_further:
        tuning_further.write(jsonl([1, ["trace c"]]))
    db.prepare(key)  # nothing shipped is added twice
    assert db.record_count(key) == 3 == len(records.read_text().splitlines())

    # A database with its own records, one of a workload the compile pipeline no longer makes:
    # the shipped records join them, numbered by the user's workload file.
    own = TuningDatabase(tmp_path / "own", shipped)
    directory = own.directory(key)
    directory.mkdir(parents=True)
    (directory / tvm_backend.WORKLOADS_FILE).write_text(jsonl(["old", "x"], ["h1", "dense"]))
    (directory / tvm_backend.RECORDS_FILE).write_text(jsonl([0, ["old"]], [1, ["mine"]]))
    assert own.record_count(key) == 4
    own.prepare(key)
    workloads = (directory / tvm_backend.WORKLOADS_FILE).read_text()
    assert workloads == jsonl(["old", "x"], ["h1", "dense"], ["h0", "conv"])
    added = (directory / tvm_backend.RECORDS_FILE).read_text().splitlines()[2:]
    assert [json.loads(line) for line in added] == [[2, ["trace a"]], [1, ["trace b"]]]
    shipped_records = shipped / key.digest / f"{tvm_backend.RECORDS_FILE}.gz"
    assert gzip.decompress(shipped_records.read_bytes()).count(b"\n") == 2


def ship_fake(shipped: Path, key: TuningKey, workloads: str, records: str) -> None:
    (shipped / key.digest).mkdir(parents=True)
    for name, text in (
        (tvm_backend.WORKLOADS_FILE, workloads),
        (tvm_backend.RECORDS_FILE, records),
    ):
        (shipped / key.digest / f"{name}.gz").write_bytes(gzip.compress(text.encode()))
    (shipped / key.digest / "key.json").write_text(key.as_json())


def test_records_shipped_for_other_cpus_are_candidates(tmp_path: Path) -> None:
    """The shipped records of the same model, TVM version, search spaces and target on another
    CPU (mcpu, features, cores) land in the key's candidates directory, merged; no others do."""
    here = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "icelake-server"}
    key = TuningKey("ab" * 32, here, "0.27.0")
    shipped = tmp_path / "shipped"
    other_cpus = [
        TuningKey(key.model_sha256, {**here, "mcpu": "skylake-avx512", "num-cores": 4}, "0.27.0"),
        TuningKey(key.model_sha256, {**here, "mcpu": "znver4", "mattr": ["-avx512f"]}, "0.27.0"),
    ]
    ship_fake(shipped, other_cpus[0], jsonl(["h0", "conv"], ["h1", "dense"]), jsonl(
        [0, ["skylake conv"]], [1, ["skylake dense"]]))  # fmt: skip
    ship_fake(shipped, other_cpus[1], jsonl(["h1", "dense"]), jsonl([0, ["zen dense"]]))
    for other in (
        TuningKey("cd" * 32, here, "0.27.0"),  # another model
        TuningKey(key.model_sha256, here, "0.28.0"),  # another TVM
        TuningKey(key.model_sha256, here, "0.27.0", key.spaces + 1),  # our next search spaces
        TuningKey(key.model_sha256, {**here, "mtriple": "aarch64-linux-gnu"}, "0.27.0"),
        TuningKey(key.model_sha256, {**here, "accelerator": "vta:x"}, "0.27.0"),  # VTA's CPU part
    ):
        ship_fake(shipped, other, jsonl(["h0", "conv"]), jsonl([0, ["not a candidate"]]))

    db = TuningDatabase(tmp_path / "user", shipped)
    assert db.record_count(key) == 0, "candidates are not records until timed here"
    candidates = db.prepare(key) / tvm_backend.CANDIDATES_DIR
    workloads = read_jsonl(candidates / tvm_backend.WORKLOADS_FILE)
    assert sorted(workloads) == [["h0", "conv"], ["h1", "dense"]]
    records = read_jsonl(candidates / tvm_backend.RECORDS_FILE)
    assert sorted((workloads[n][1], trace) for n, (trace,) in records) == [
        ("conv", "skylake conv"),
        ("dense", "skylake dense"),
        ("dense", "zen dense"),
    ]
    (candidates / tvm_backend.RECORDS_FILE).write_text("tuning read and wrote here\n")
    db.prepare(key)  # made anew: what is shipped now
    assert (candidates / tvm_backend.RECORDS_FILE).read_text().count("\n") == 3

    alone = TuningKey("ef" * 32, here, "0.27.0")
    assert not (db.prepare(alone) / tvm_backend.CANDIDATES_DIR).exists()


def test_records_made_on_another_cpu_are_timed_here_and_applied(tmp_path: Path) -> None:
    """A compile with no records for this CPU times the records shipped for another (as tuning
    times its candidates) and applies them: every kernel is scheduled, with no search."""
    model = two_layer_mlp(tmp_path / "mlp.onnx")
    onnx_model, digest = load_onnx(model)
    here = targets.resolve("x86_64").tvm_dict()
    mod = tvm_backend.import_onnx(onnx_model, str(model))
    elsewhere = tmp_path / "elsewhere"
    tvm_backend.optimize(mod, here, elsewhere, trials=2)  # a record for each kernel
    workloads = (elsewhere / tvm_backend.WORKLOADS_FILE).read_text()
    records = read_jsonl(elsewhere / tvm_backend.RECORDS_FILE)
    assert len(records) == 2
    for _, record in records:
        record[1] = [100.0]  # what "the other CPU" measured: no time measured here

    other = TuningKey(digest, {**here, "mcpu": "skylake-avx512"}, tvm_backend.version())
    ship_fake(tmp_path / "shipped", other, workloads, jsonl(*records))
    key = TuningKey(digest, here, tvm_backend.version())
    tuning_dir = TuningDatabase(tmp_path / "user", tmp_path / "shipped").prepare(key)
    built = tvm_backend.optimize(mod, here, tuning_dir, minutes=0.001)

    assert tvm_backend.untuned_kernels(built) == []
    timed = read_jsonl(tuning_dir / tvm_backend.RECORDS_FILE)
    assert [trace for _, (trace, *_) in timed] == [trace for _, (trace, *_) in records]
    assert all(0 < sum(run_secs) < 1 for _, (_, run_secs, *_) in timed), "timed here"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
def test_zoo_models_compile_with_the_shipped_records_without_tuning(
    name: str, zoo_model: Callable[[str], Path], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    model = zoo_model(name)
    target = targets.resolve("x86_64").tvm_dict()
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    key = TuningKey(digest, target, tvm_backend.version())
    if not (SHIPPED / key.digest).is_dir():
        shipped = sorted(json.loads(p.read_text())["target"].get("mcpu") for p in
                         SHIPPED.glob("*/key.json"))  # fmt: skip
        pytest.skip(f"no shipped records for {name} on this CPU ({target}); shipped: {shipped}")
    request = CompileRequest(model=model, target="x86_64", output=tmp_path / "a.boost")
    result = compile_model(request, tmp_path / "empty-db", keys[0], "test", Progress(False))
    assert result.manifest.tuning["trials_this_build"] == 0
    assert result.manifest.tuning["untuned_kernels"] == 0, "records for every kernel"
    assert result.manifest.tuning["records"] == TuningDatabase(tmp_path / "x").record_count(key) > 0
    verified = open_artifact(result.artifact, [load_public_key(keys[1])], tmp_path / "unpacked")
    m = verified.manifest
    loaded = TvmRuntime().load(verified.path(m.library), m.inputs, m.outputs)
    report = golden_check(loaded, verified.path(m.golden.file), m.golden.rtol, m.golden.atol)
    assert report.passed, report.describe()


def test_ship_keeps_the_best_record_of_each_workload_the_model_uses(tmp_path: Path) -> None:
    key = TuningKey("ab" * 32, targets.resolve("x86_64").tvm_dict(), "0.27.0")
    db = TuningDatabase(tmp_path / "user", tmp_path / "shipped")
    directory = db.prepare(key)
    records = [
        [0, [["trace a"], [0.3, 0.5]]],
        [1, [["trace old"], [0.1]]],
        [2, [["trace c"], [1.0]]],
        [0, [["trace b"], [0.2]]],
    ]
    (directory / tvm_backend.RECORDS_FILE).write_text(jsonl(*records))
    (directory / tvm_backend.WORKLOADS_FILE).write_text(
        jsonl(["w0", "conv"], ["gone", "a kernel the pipeline no longer makes"], ["w1", "dense"])
    )
    out = db.ship(key, {"w0", "w1"})
    kept = gzip.decompress((out / f"{tvm_backend.RECORDS_FILE}.gz").read_bytes()).decode()
    assert [json.loads(line) for line in kept.splitlines()] == [
        [0, [["trace b"], [0.2]]],
        [1, [["trace c"], [1.0]]],
    ]
    workloads = gzip.decompress((out / f"{tvm_backend.WORKLOADS_FILE}.gz").read_bytes())
    assert workloads.decode() == jsonl(["w0", "conv"], ["w1", "dense"])
    assert TuningDatabase(tmp_path / "elsewhere", tmp_path / "shipped").record_count(key) == 2


def test_ship_names_what_is_missing(zoo_model: Callable[[str], Path], tmp_path: Path) -> None:
    missing = run_cli("models.tuning", "ship", str(tmp_path / "no.onnx"), cwd=tmp_path)
    assert missing.returncode == 1 and "no.onnx: no such file" in missing.stderr
    model = str(zoo_model("tiny_cnn"))
    untuned = run_cli("models.tuning", "ship", model, str(tmp_path / "db"), cwd=tmp_path)
    assert untuned.returncode == 1 and "no tuning records for" in untuned.stderr
    assert "--tune-trials N" in untuned.stderr and not (tmp_path / "db").exists()


def threads_in_this_process() -> int:
    """TVM's thread pool size, asked in the tuning runner's worker process."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())


@pytest.mark.parametrize("cores", [1, 2])
def test_tuning_times_candidates_on_the_targets_cores(cores: int) -> None:
    """TVM's pool takes half the CPUs of an x86 machine by default: one of a 2-core machine's,
    where the candidates for a 2-core target must run on 2 threads."""
    import tvm

    target = tvm.target.Target({**targets.resolve("x86_64").tvm_dict(), "num-cores": cores})
    runner = tvm_backend._runner(target)
    assert runner.pool.submit(threads_in_this_process).result() == cores
