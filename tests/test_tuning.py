"""MetaSchedule records are keyed, stored, and reapplied by a later compile with no trials."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.artifact import load_public_key, open_artifact
from models import targets, tvm_backend
from models.compiler import CompileRequest, compile_model
from models.progress import Progress
from models.tuning import TuningDatabase, TuningKey


def test_tuning_key_separates_targets_and_versions() -> None:
    x86 = targets.resolve("x86_64").tvm_dict()
    base = TuningKey("ab" * 32, x86, "0.27.0")
    assert base.digest == TuningKey("ab" * 32, dict(x86), "0.27.0").digest
    assert base.digest != TuningKey("ab" * 32, {**x86, "num-cores": 1}, "0.27.0").digest
    assert base.digest != TuningKey("ab" * 32, x86, "0.28.0").digest
    assert base.digest != TuningKey("cd" * 32, x86, "0.27.0").digest


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

    reused, reused_lib = compile_with(0, db, "reused.boost")
    assert reused == {"key": tuned["key"], "records": records, "trials_this_build": 0}
    assert (
        TuningDatabase(db).record_count(
            TuningKey(key["model_sha256"], key["target"], key["tvm_version"])
        )
        == records
    )

    untuned, untuned_lib = compile_with(0, tmp_path / "empty-db", "untuned.boost")
    assert untuned["records"] == 0
    # The records change the generated code; reusing them reproduces the tuned build's kernels.
    assert untuned_lib.read_bytes() != reused_lib.read_bytes()
