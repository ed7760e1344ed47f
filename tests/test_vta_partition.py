"""Quantization and partitioning decisions, and the errors a user meets with --target vta."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.artifact import TensorSpec
from agent.errors import BoostError
from models.tvm_backend import import_onnx
from models.vta_build import read_calibration
from models.vta_partition import _residual_shifts, exponent, partition
from vta.config import VtaConfig


def test_power_of_two_exponents_cover_the_range():
    assert exponent(127.0) == 0
    assert exponent(127.5) == 1
    assert exponent(1.0) == -6  # 1/64 steps: 1.0 is 64, within 127
    assert exponent(0.0) == -7
    with pytest.raises(BoostError, match="non-finite"):
        exponent(float("inf"))


@pytest.mark.parametrize(
    "k,total,expected",
    [
        (3, 9, (3, 0)),  # the residual fits the identity weights as it is
        (9, 10, (6, 3)),  # shift part of the way first
        (8, 20, (3, 5)),  # ... or as far as the rest of the shift needs
        (-1, 5, None),  # finer than the accumulators: the add stays on the CPU
        (20, 40, None),  # no split of the shift works
    ],
)
def test_residual_shifts(k, total, expected):
    assert _residual_shifts(k, total) == expected


def rgb_only_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "rgb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_model_with_nothing_for_vta_is_refused():
    mod = import_onnx(rgb_only_model(), "rgb")
    with pytest.raises(BoostError, match="no layer of this model can run on VTA"):
        partition(mod, [], {"kind": "llvm"}, VtaConfig(), "id")


def test_calibration_data_errors_name_the_problem(tmp_path: Path):
    specs = [TensorSpec("input", (1, 3, 8, 8), "float32")]
    with pytest.raises(BoostError, match="--calibration"):
        read_calibration(specs, None)
    path = tmp_path / "cal.npz"
    np.savez(path, other=np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(BoostError, match="no array named 'input'"):
        read_calibration(specs, path)
    np.savez(path, input=np.zeros((4, 3, 9, 9), np.float32))
    with pytest.raises(BoostError, match=r"samples of shape \(3, 8, 8\)"):
        read_calibration(specs, path)
    np.savez(path, input=np.ones((70, 3, 8, 8), np.float32))
    calibration = read_calibration(specs, path)
    assert len(calibration.samples) == 64 and calibration.samples[0]["input"].shape == (1, 3, 8, 8)


def test_relu6_becomes_the_clip_of_the_layer():
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.2, (24, 16, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Clip", ["c", "lo", "hi"], ["y"]),
        ],
        "relu6",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 24, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    samples = [{"x": rng.normal(0, 2, (1, 16, 8, 8)).astype(np.float32)} for _ in range(4)]
    part = partition(import_onnx(model, "relu6"), samples, {"kind": "llvm"}, VtaConfig(), "id")
    (layer,) = part.report["layers"]
    e_y = layer["exponents"]["output"]
    assert tuple(layer["spec"]["clip"]) == (0, min(127, round(6 / 2.0**e_y)))
    # Nothing of the clip is left for the CPU.
    assert "call_tir" not in part.module.script(show_meta=False).split("def main")[1]
