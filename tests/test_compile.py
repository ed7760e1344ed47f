"""compile -> package -> verify -> load with the runtime-only loader -> compare with ORT."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from agent.artifact import load_public_key, open_artifact
from agent.runtime import InferenceInputError, TvmRuntime, golden_check
from models import zoo
from tests.conftest import REPO, run_cli

LOADER_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from agent.artifact import load_public_key, open_artifact
from agent.runtime import TvmRuntime
artifact, key, dest, inputs = sys.argv[1:5]
verified = open_artifact(Path(artifact), [load_public_key(Path(key))], Path(dest))
m = verified.manifest
model = TvmRuntime().load(verified.path(m.library), m.inputs, m.outputs)
feeds = dict(np.load(inputs))
np.save(Path(dest) / "out.npy", model.run(feeds)[0])
maps = Path("/proc/self/maps").read_text()
print(json.dumps({"compiler_mapped": "libtvm_compiler" in maps,
                  "runtime_mapped": "libtvm_runtime" in maps,
                  "tvm_imported": "tvm" in sys.modules,
                  "onnx_imported": "onnx" in sys.modules}))
"""


@pytest.mark.parametrize("name", ["tiny_cnn", "resnet18"])
def test_runtime_only_loader_matches_onnx_runtime(
    name: str, build: Callable[..., Path], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    artifact = build(name)
    model = zoo.get(name)
    feeds = {"input": model.sample_inputs["input"][1:2]}  # not the golden sample
    np.savez(tmp_path / "in.npz", **feeds)
    script = tmp_path / "load.py"
    script.write_text(LOADER_SCRIPT)
    result = run_cli(
        "load",
        str(artifact),
        str(keys[1]),
        str(tmp_path / "x"),
        str(tmp_path / "in.npz"),
        cwd=tmp_path,
        env={"PYTHONPATH": f"{REPO}:{tmp_path}"},
    )
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts == {
        "compiler_mapped": False,
        "runtime_mapped": True,
        "tvm_imported": False,
        "onnx_imported": False,
    }
    expected = ort.InferenceSession(model.model.SerializeToString()).run(None, feeds)[0]
    got = np.load(tmp_path / "x" / "out.npy")
    np.testing.assert_allclose(
        got, expected, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(expected).max())
    )


def test_golden_test_and_input_checks(
    build: Callable[..., Path], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    verified = open_artifact(build("tiny_cnn"), [load_public_key(keys[1])], tmp_path)
    m = verified.manifest
    assert m.golden.atol > 0 and m.golden.rtol > 0
    model = TvmRuntime().load(verified.path(m.library), m.inputs, m.outputs)
    report = golden_check(model, verified.path(m.golden.file), m.golden.rtol, m.golden.atol)
    assert report.passed, report.describe()
    assert report.max_abs_error < m.golden.atol
    # Outputs moved by twice the tolerance fail the same check.
    with np.load(verified.path(m.golden.file)) as data:
        moved = {
            k: data[k] + (2 * m.golden.atol if k.startswith("output:") else 0) for k in data.files
        }
    np.savez(tmp_path / "moved.npz", **moved)
    assert not golden_check(model, tmp_path / "moved.npz", m.golden.rtol, m.golden.atol).passed
    good = np.zeros((1, 3, 32, 32), np.float32)
    with pytest.raises(
        InferenceInputError, match=r"input 'input': expected float32\[1, 3, 32, 32\], got float64"
    ):
        model.run({"input": good.astype(np.float64)})
    with pytest.raises(InferenceInputError, match=r"got float32\[1, 3, 16, 16\]"):
        model.run({"input": good[:, :, :16, :16]})
    with pytest.raises(InferenceInputError, match=r"missing \['input'\], unknown \['x'\]"):
        model.run({"x": good})


def test_each_run_computes_on_its_own_inputs(
    build: Callable[..., Path], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """Inputs are copied into buffers the model keeps: every run sees the values it was given,
    from strided views as from contiguous arrays, and no caller's array is written."""
    verified = open_artifact(build("tiny_cnn"), [load_public_key(keys[1])], tmp_path)
    m = verified.manifest
    model = TvmRuntime().load(verified.path(m.library), m.inputs, m.outputs)
    rng = np.random.default_rng(7)
    a = rng.standard_normal((1, 3, 32, 32), dtype=np.float32)
    wide = rng.standard_normal((1, 3, 32, 64), dtype=np.float32)
    b = wide[..., ::2]  # not contiguous
    kept = b.copy()
    first = model.run({"input": a})[0]
    other = model.run({"input": b})[0]
    again = model.run({"input": a})[0]
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    np.testing.assert_array_equal(other, model.run({"input": np.ascontiguousarray(b)})[0])
    np.testing.assert_array_equal(b, kept)


def test_boost_agent_check(
    build: Callable[..., Path], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    artifact = build("tiny_cnn")
    result = run_cli(
        "agent.cli",
        "check",
        str(artifact),
        cwd=tmp_path,
        env={"BOOST_AGENT_TRUSTED_KEYS": str(keys[1])},
    )
    assert result.returncode == 0, result.stderr
    assert "signature ok" in result.stdout and "golden test passed" in result.stdout


def test_compile_cli_end_to_end(tmp_path: Path) -> None:
    """The commands a user types: keygen, zoo export, compile, verify, check."""
    steps = [
        ("models.cli", "keygen"),
        ("models.cli", "zoo", "export", "digits_cnn", "-o", "zoo"),
        (
            "models.cli",
            "compile",
            "zoo/digits_cnn.onnx",
            "--inputs",
            "zoo/digits_cnn.npz",
            "--model-version",
            "3",
        ),
        ("models.cli", "verify", "digits_cnn-3-x86_64.boost"),
        ("agent.cli", "check", "digits_cnn-3-x86_64.boost"),
    ]
    for step in steps:
        # Without tuning: test_tuning covers the bounded tuning a compile does by default.
        result = run_cli(*step, cwd=tmp_path, env={"BOOST_BUILD_TUNE_MINUTES": "0"})
        assert result.returncode == 0, (step, result.stderr)
    with np.load(tmp_path / "zoo/digits_cnn.npz") as data:
        assert data["test_inputs"].shape[1:] == (1, 8, 8)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [".boost"]


def unsupported_model(path: Path) -> Path:
    node = helper.make_node("Det", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def dynamic_model(path: Path) -> Path:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (
            lambda d: unsupported_model(d / "m.onnx"),
            ["m.onnx"],
            "The following operators are not supported for frontend ONNX: Det",
        ),
        (
            lambda d: dynamic_model(d / "m.onnx"),
            ["m.onnx"],
            "input 'x' has a dynamic dimension N; export the model with fixed input shapes",
        ),
        (
            lambda d: (d / "m.onnx").write_bytes(b"garbage"),
            ["m.onnx"],
            "m.onnx: not a valid ONNX model",
        ),
        (lambda d: None, ["missing.onnx"], "missing.onnx: no such file"),
        (
            lambda d: zoo.tiny_cnn().save(str(d / "m.onnx")),
            ["m.onnx", "--target", "riscv"],
            "unknown target 'riscv'; known targets: x86_64, aarch64, armv7",
        ),
        (
            lambda d: zoo.tiny_cnn().save(str(d / "m.onnx")),
            ["m.onnx", "--target", "armv7", "--board", "rpi4"],
            "board rpi4 runs target aarch64, not armv7; use --target aarch64",
        ),
        (
            lambda d: zoo.tiny_cnn().save(str(d / "m.onnx")),
            ["m.onnx", "--target", "aarch64", "--tune-trials", "5"],
            "tuning measures candidates on this machine, so it runs for x86_64 only",
        ),
        (
            lambda d: zoo.tiny_cnn().save(str(d / "m.onnx")),
            ["m.onnx", "--inputs", "nope.npz"],
            "nope.npz: not a readable .npz file",
        ),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(
    tmp_path: Path, setup: Callable[[Path], object], args: list[str], message: str
) -> None:
    assert run_cli("models.cli", "keygen", cwd=tmp_path).returncode == 0
    setup(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli("models.cli", "compile", *args, "-o", "out.boost", cwd=tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("boost-build: error: ") and message in last, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_missing_signing_key_is_reported_before_compiling(tmp_path: Path) -> None:
    zoo.tiny_cnn().save(str(tmp_path / "m.onnx"))
    result = run_cli("models.cli", "compile", "m.onnx", cwd=tmp_path)
    assert result.returncode == 1
    assert "signing key not found; create one with 'boost-build keygen'" in result.stderr


def test_missing_cross_compiler_names_the_package(tmp_path: Path) -> None:
    zoo.tiny_cnn().save(str(tmp_path / "m.onnx"))
    result = run_cli(
        "models.cli",
        "compile",
        "m.onnx",
        "--target",
        "aarch64",
        cwd=tmp_path,
        env={"PATH": str(Path(sys.executable).parent)},
    )
    assert result.returncode == 1
    assert (
        "compiler aarch64-linux-gnu-g++ not found; install it with "
        "'apt-get install g++-aarch64-linux-gnu'"
    ) in result.stderr
