"""The CPU pipeline's import and graph rewrites: what they make of a model, and that it still
computes what ONNX Runtime computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import tvm_backend

NAN = float("nan")
SHAPE = [1, 8, 6, 6]


def conv_bn_clip_conv(opset: int, clip_inputs: list[str], **clip_attrs: float) -> onnx.ModelProto:
    """conv -> batch norm -> Clip -> conv, with the Clip's bounds as given."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": rng.normal(0, 0.5, (8, 8, 3, 3)),
        "gamma": rng.uniform(0.5, 1.5, 8),
        "beta": rng.normal(0, 0.5, 8),
        "mean": rng.normal(0, 0.5, 8),
        "var": rng.uniform(0.5, 1.5, 8),
        "w2": rng.normal(0, 0.5, (8, 8, 1, 1)),
        "lo": np.array(-1.0),
        "hi": np.array(2.0),
        "nan": np.array(NAN),
    }
    used = {"w1", "gamma", "beta", "mean", "var", "w2", *clip_inputs}
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"]),
            helper.make_node("Clip", ["b", *clip_inputs], ["r"], **clip_attrs),
            helper.make_node("Conv", ["r", "w2"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)]
        + [helper.make_tensor_value_info("bound", TensorProto.FLOAT, [])] * ("bound" in used),
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items() if k in used],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def kernels(model: onnx.ModelProto) -> list[str]:
    mod = tvm_backend.optimize(tvm_backend.import_onnx(model, "m"), {"kind": "llvm"}, None)
    return sorted(gv.name_hint for gv in mod.get_global_vars() if gv.name_hint != "main")


def run_untuned(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The model's first output, as the CPU pipeline's untuned build computes it."""
    import tvm
    from tvm import relax

    target = {"kind": "llvm"}
    mod = tvm_backend.optimize(tvm_backend.import_onnx(model, "m"), target, None)
    vm = relax.VirtualMachine(tvm_backend.build(mod, target), tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(v) for v in feeds.values())).numpy()


def test_batch_norm_and_clip_fuse_into_a_channels_last_convolution() -> None:
    names = kernels(conv_bn_clip_conv(13, ["lo", "hi"]))
    # Only the graph's input and output change layout; the batch norm is in the weights.
    assert sum(n.startswith("transpose") for n in names) == 2, names
    assert [n for n in names if "maximum" in n] == ["fused_conv2d_add_maximum_minimum"], names


@pytest.mark.parametrize(
    "opset,clip_inputs,clip_attrs",
    [
        (13, ["lo", "hi"], {}),
        (13, ["lo"], {}),
        (13, ["", "hi"], {}),
        (13, [], {}),
        (13, ["nan", "hi"], {}),  # a NaN bound is no bound
        (13, ["lo", "bound"], {}),  # a bound known at run time only: TVM's own import
        (10, [], {"min": -1.0, "max": 2.0}),  # bounds as attributes before opset 11
        (10, [], {"max": 2.0}),
    ],
)
def test_the_pipeline_computes_what_onnx_runtime_does(
    opset: int, clip_inputs: list[str], clip_attrs: dict[str, float]
) -> None:
    model = conv_bn_clip_conv(opset, clip_inputs, **clip_attrs)
    feeds = {"x": np.random.default_rng(1).normal(0, 2, SHAPE).astype(np.float32)}
    if "bound" in clip_inputs:
        feeds["bound"] = np.array(1.5, np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(run_untuned(model, feeds), expected, rtol=1e-4, atol=1e-4)


def three_convs() -> onnx.ModelProto:
    """32-channel 3x3 convolutions: stride 1 on 6x7 output tiles (Winograd's), stride 2, and
    stride 1 on 3x4 tiles (too few)."""
    rng = np.random.default_rng(2)
    weights = {"w1": (32, 32), "w2": (32, 32), "w3": (32, 32)}
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("Conv", ["r", "w2"], ["b"], pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node("Conv", ["b", "w3"], ["y"], pads=[1, 1, 1, 1]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 24, 26])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 12, 13])],
        [
            numpy_helper.from_array(rng.normal(0, 0.1, (o, i, 3, 3)).astype(np.float32), k)
            for k, (o, i) in weights.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_stride_one_convolutions_with_enough_channels_run_winograd() -> None:
    model = three_convs()
    names = kernels(model)
    assert [n for n in names if "conv2d" in n] == [
        "conv2d",
        "conv2d1",
        "fused_conv2d_winograd_relu",
    ], names
    feeds = {"x": np.random.default_rng(3).normal(0, 1, [1, 32, 24, 26]).astype(np.float32)}
    expected = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(run_untuned(model, feeds), expected, rtol=1e-4, atol=1e-4)
