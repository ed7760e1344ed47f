"""The CPU pipeline's import and graph rewrites: what they make of a model, and that it still
computes what ONNX Runtime computes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import targets, tvm_backend

NAN = float("nan")
SHAPE = [1, 8, 6, 6]


def checked_model(
    nodes: list[onnx.NodeProto],
    name: str,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto],
    opset: int = 13,
) -> onnx.ModelProto:
    """An ONNX model of one graph, checked by ONNX's checker."""
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


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
    return checked_model(
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
        opset=opset,
    )


def kernels(model: onnx.ModelProto) -> list[str]:
    mod = tvm_backend.optimize(tvm_backend.import_onnx(model, "m"), {"kind": "llvm"}, None)
    return sorted(gv.name_hint for gv in mod.get_global_vars() if gv.name_hint != "main")


def run_untuned(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], target: dict[str, object] | None = None
) -> np.ndarray:
    """The model's first output, as the CPU pipeline's untuned build computes it (for a
    generic CPU unless ``target`` is given)."""
    import tvm
    from tvm import relax

    target = target or {"kind": "llvm"}
    mod = tvm_backend.optimize(tvm_backend.import_onnx(model, "m"), target, None)
    vm = relax.VirtualMachine(tvm_backend.build(mod, target), tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(v) for v in feeds.values())).numpy()


def test_batch_norm_and_clip_fuse_into_a_channels_last_convolution() -> None:
    names = kernels(conv_bn_clip_conv(13, ["lo", "hi"]))
    # Only the graph's input and output change layout; the batch norm is in the weights.
    assert sum(n.startswith("transpose") for n in names) == 2, names
    assert [n for n in names if "maximum" in n] == ["fused_conv2d_streaming_add_maximum_minimum"], (
        names
    )


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
    stride 1 on 3x4 tiles (too few; both with more weights than outputs)."""
    rng = np.random.default_rng(2)
    weights = {"w1": (32, 32), "w2": (32, 32), "w3": (32, 32)}
    return checked_model(
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


def test_stride_one_convolutions_with_enough_channels_run_winograd() -> None:
    model = three_convs()
    names = kernels(model)
    assert [n for n in names if "conv2d" in n] == [
        "conv2d_streaming",
        "conv2d_streaming1",
        "fused_conv2d_winograd_relu",
    ], names
    feeds = {"x": np.random.default_rng(3).normal(0, 1, [1, 32, 24, 26]).astype(np.float32)}
    expected = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(run_untuned(model, feeds), expected, rtol=1e-4, atol=1e-4)


def weight_heavy_convs() -> onnx.ModelProto:
    """Convolutions with fewer weights than outputs (a 3x3 and a 1x1) and with more (a 3x3
    stride 3 and a 1x1 after it), each with a bias and the last three with a ReLU."""
    rng = np.random.default_rng(6)
    weights = {"w1": (8, 8, 3), "w2": (64, 8, 1), "w3": (64, 64, 3), "w4": (64, 64, 1)}
    inits = {k: rng.normal(0, 0.2, (o, i, k_, k_)) for k, (o, i, k_) in weights.items()}
    inits |= {f"b{k[1:]}": rng.normal(0, 0.2, o) for k, (o, _, _) in weights.items()}
    return checked_model(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1] * 4),
            helper.make_node("Conv", ["a", "w2", "b2"], ["b"]),
            helper.make_node("Relu", ["b"], ["br"]),
            helper.make_node("Conv", ["br", "w3", "b3"], ["c"], pads=[1] * 4, strides=[3, 3]),
            helper.make_node("Relu", ["c"], ["cr"]),
            helper.make_node("Conv", ["cr", "w4", "b4"], ["d"]),
            helper.make_node("Relu", ["d"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 4, 4])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )


#: The kernels scheduled by this project's search spaces, by name.
OUR_SPACES = ("conv2d_depthwise", "conv2d_pointwise", "conv2d_streaming", "gemv")
HEAVY_FEEDS = {"x": np.random.default_rng(7).normal(0, 1, [1, 8, 12, 12]).astype(np.float32)}


def test_convolutions_with_more_weights_than_outputs_stream_their_weights() -> None:
    model = weight_heavy_convs()
    assert [n for n in kernels(model) if "conv2d" in n] == [
        "fused_conv2d_add",  # TVM's own
        "fused_conv2d_pointwise_add1_relu",
        "fused_conv2d_streaming1_add2_relu1",  # the 1x1
        "fused_conv2d_streaming_add2_relu1",
    ]
    expected = ort.InferenceSession(model.SerializeToString()).run(None, HEAVY_FEEDS)[0]
    np.testing.assert_allclose(run_untuned(model, HEAVY_FEEDS), expected, rtol=1e-4, atol=1e-4)


def mobile_blocks() -> onnx.ModelProto:
    """MobileNet's and ResNet's cheap convolutions, on sizes that few tiles divide: a 1x1
    expansion with ReLU6, a depthwise 3x3 with ReLU6, a 1x1 projection added to the block's
    input; then a stride-2 depthwise 3x3 and 1x1, added to a stride-2 1x1 of the block's output
    (ResNet's shortcut)."""
    rng = np.random.default_rng(4)
    weights = {
        "we": (48, 16, 1, 1),
        "wd": (48, 1, 3, 3),
        "wp": (16, 48, 1, 1),
        "wd2": (16, 1, 3, 3),
        "wp2": (24, 16, 1, 1),
        "ws": (24, 16, 1, 1),
    }
    inits = {k: rng.normal(0, 0.3, shape) for k, shape in weights.items()}
    inits |= {f"b{k[1:]}": rng.normal(0, 0.3, shape[0]) for k, shape in weights.items()}
    inits |= {"lo": np.array(0.0), "hi": np.array(6.0)}

    def conv(x: str, w: str, y: str, **attrs: object) -> onnx.NodeProto:
        return helper.make_node("Conv", [x, w, f"b{w[1:]}"], [y], **attrs)

    return checked_model(
        [
            conv("x", "we", "e"),
            helper.make_node("Clip", ["e", "lo", "hi"], ["e6"]),
            conv("e6", "wd", "d", pads=[1] * 4, group=48),
            helper.make_node("Clip", ["d", "lo", "hi"], ["d6"]),
            conv("d6", "wp", "p"),
            helper.make_node("Add", ["p", "x"], ["block"]),
            conv("block", "wd2", "d2", pads=[1] * 4, strides=[2, 2], group=16),
            helper.make_node("Clip", ["d2", "lo", "hi"], ["d26"]),
            conv("d26", "wp2", "p2"),
            conv("block", "ws", "s", strides=[2, 2]),
            helper.make_node("Add", ["p2", "s"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 27, 23])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 24, 14, 12])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )


MOBILE_FEEDS = {"x": np.random.default_rng(5).normal(0, 2, [1, 16, 27, 23]).astype(np.float32)}


def test_depthwise_and_1x1_convolutions_compute_what_onnx_runtime_does() -> None:
    model = mobile_blocks()
    assert [n for n in kernels(model) if "conv2d" in n] == [
        "fused_conv2d_depthwise1_add3_maximum1_minimum1",  # stride 2
        "fused_conv2d_depthwise_add_maximum_minimum",
        "fused_conv2d_pointwise1_add1_add2",  # the projection and the block's input
        "fused_conv2d_pointwise2_add4_add5",  # the stride-2 1x1 and the shortcut
        "fused_conv2d_pointwise3_add4",  # the shortcut
        "fused_conv2d_pointwise_add_maximum_minimum",
    ]
    expected = ort.InferenceSession(model.SerializeToString()).run(None, MOBILE_FEEDS)[0]
    np.testing.assert_allclose(run_untuned(model, MOBILE_FEEDS), expected, rtol=1e-4, atol=1e-4)


#: An x86 CPU with AVX-512: vectors of 16 floats.
AVX512 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"}


def summed_and_stored(mod: object) -> list[tuple[int, int]]:
    """Each 1x1 kernel's outputs a pixel: those it sums, those it stores."""
    import tvm

    def channels(sch: object, block: str) -> int:
        return int(sch.get(sch.get_sblock(block)).iter_vars[3].dom.extent)  # type: ignore[attr-defined]

    found = []
    for gv, func in mod.functions_items():  # type: ignore[attr-defined]
        if "conv2d_pointwise" in gv.name_hint:
            sch = tvm.s_tir.Schedule(func)
            store = tvm_backend.POINTWISE_STORE
            stored = store if f'T.sblock("{store}")' in func.script() else "pointwise"
            found.append((channels(sch, "pointwise"), channels(sch, stored)))
    return found


def test_1x1_outputs_are_summed_in_whole_vectors() -> None:
    """In AVX-512's 16-float vectors, a 1x1 with 24 outputs sums 32 (zero filters added) and
    stores the 24: 2 vectors rather than 3 of 8. 16 and 48 outputs are whole vectors, and
    8-float vectors hold 24 outputs whole."""
    model = mobile_blocks()
    padded = tvm_backend.optimize(tvm_backend.import_onnx(model, "m"), AVX512, None)
    assert sorted(summed_and_stored(padded)) == [(16, 16), (32, 24), (32, 24), (48, 48)]
    avx2 = {**AVX512, "mcpu": "haswell"}
    unpadded = tvm_backend.optimize(tvm_backend.import_onnx(model, "m"), avx2, None)
    assert sorted(summed_and_stored(unpadded)) == [(16, 16), (24, 24), (24, 24), (48, 48)]
    if "avx512f" not in tvm_backend.host_features():
        pytest.skip("this CPU cannot run AVX-512 code")
    expected = ort.InferenceSession(model.SerializeToString()).run(None, MOBILE_FEEDS)[0]
    got = run_untuned(model, MOBILE_FEEDS, AVX512)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cores", [1, 2, 3])
def test_each_core_computes_a_run_of_tiles(cores: int) -> None:
    """Our search spaces' loop of tiles, as tuning leaves it on a target with ``cores``
    cores: where the cores divide the tiles, a parallel loop of one iteration a core, each
    computing a run of tiles (a tile's buffers allocated once for the run); otherwise one
    iteration a tile. The kernel still computes what it did before it was scheduled."""
    import tvm
    from tvm.tirx import ForKind

    target = {**targets.resolve("x86_64").tvm_dict(), "num-cores": cores}
    mod = tvm_backend.optimize(tvm_backend.import_onnx(mobile_blocks(), "m"), target, None)
    spaces = {
        "depthwise": tvm_backend._schedule_depthwise,
        "pointwise": tvm_backend._schedule_pointwise,
    }
    runs = 0
    for gv, func in mod.functions_items():
        block = next((b for b in spaces if f"conv2d_{b}" in gv.name_hint), None)
        if block is None:
            continue
        sch = tvm.s_tir.Schedule(func, seed=cores)
        spaces[block](sch, sch.get_sblock(block))
        tiles = tvm_backend._next_tiles(sch)
        count = int(sch.get(tiles).extent)
        tvm_backend._run_per_core(sch, tiles, cores)
        assert tvm_backend._next_tiles(sch) is None
        loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock(block))]
        first = next(i for i, loop in enumerate(loops) if loop.kind == ForKind.PARALLEL)
        if count > cores and count % cores == 0:
            assert [int(loop.extent) for loop in loops[first : first + 2]] == [
                cores,
                count // cores,
            ]
            runs += 1
        else:
            assert int(loops[first].extent) == count, (gv.name_hint, count, cores)
        args = [
            np.random.default_rng(i).normal(0, 1, [int(d) for d in param.shape])
            for i, param in enumerate(func.params)
        ]
        results = []
        for kernel in (func, sch.mod["main"]):
            tensors = [tvm.runtime.tensor(a.astype(np.float32)) for a in args]
            tvm.tirx.build(kernel.with_attr("global_symbol", "main"), target)(*tensors)
            results.append(tensors[-1].numpy())
        np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-5)
    if cores == 1:  # every kernel has more than one tile
        assert runs == 6


def classifier_head() -> onnx.ModelProto:
    """A CNN's classifier: global average pool, flatten, a dense layer with a bias (ONNX's
    Gemm, weights transposed) to 40 classes, and a product of the scores with a matrix given
    at run time."""
    rng = np.random.default_rng(8)
    inits = {"w": rng.normal(0, 0.3, (40, 96)), "b": rng.normal(0, 0.3, 40)}
    return checked_model(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "w", "b"], ["scores"], transB=1),
            helper.make_node("MatMul", ["scores", "m"], ["y"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 96, 5, 5]),
            helper.make_tensor_value_info("m", TensorProto.FLOAT, [40, 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )


HEAD_FEEDS = {
    "x": np.random.default_rng(9).normal(0, 1, [1, 96, 5, 5]).astype(np.float32),
    "m": np.random.default_rng(10).normal(0, 1, [40, 8]).astype(np.float32),
}


def test_a_dense_layer_streams_its_weights() -> None:
    model = classifier_head()
    # The dense layer's constant weights stream (_gemv); the product of two inputs is TVM's.
    assert [n for n in kernels(model) if "gemv" in n or "matmul" in n] == [
        "fused_gemv_add",
        "matmul",
    ]
    expected = ort.InferenceSession(model.SerializeToString()).run(None, HEAD_FEEDS)[0]
    np.testing.assert_allclose(run_untuned(model, HEAD_FEEDS), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,feeds,spaces",
    [
        (mobile_blocks, MOBILE_FEEDS, 6),  # depthwise and 1x1
        (weight_heavy_convs, HEAVY_FEEDS, 3),  # two streaming, one 1x1
        (classifier_head, HEAD_FEEDS, 1),  # the dense layer
    ],
)
def test_our_search_spaces_tune_in_vectors_of_channels(
    tmp_path: Path,
    model: Callable[[], onnx.ModelProto],
    feeds: dict[str, np.ndarray],
    spaces: int,
) -> None:
    """The search spaces of ``_schedule_depthwise``, ``_schedule_pointwise``,
    ``_schedule_streaming`` and ``_schedule_gemv``: whatever the tuner picks, every loop nest's
    innermost loop is a vector of channels (the products', and the bias', activation's and
    residual's after them), and the sums stay in a buffer of their own (a tile's, in
    registers). The tuned build still computes what ONNX Runtime does."""
    import tvm
    from tvm import relax

    onnx_model = model()
    target = targets.resolve("x86_64").tvm_dict()
    mod = tvm_backend.optimize(
        tvm_backend.import_onnx(onnx_model, "m"), target, tmp_path, trials=64
    )
    assert tvm_backend.untuned_kernels(mod) == []
    tuned = {
        gv.name_hint: func.script()
        for gv, func in mod.functions_items()
        if any(space in gv.name_hint for space in OUR_SPACES) and gv.name_hint.endswith("prepacked")
    }
    assert len(tuned) == spaces, sorted(tuned)
    for name, script in tuned.items():
        lines = script.splitlines()
        blocks = [i for i, line in enumerate(lines) if line.lstrip().startswith("with T.sblock(")]
        assert len(blocks) >= 3, (name, script)
        for i in blocks:  # every block's innermost loop
            assert "T.vectorized(" in lines[i - 1], (name, lines[i], script)
        assert "T.sblock_alloc_buffer(" in script, (name, script)
    vm = relax.VirtualMachine(tvm_backend.build(mod, target), tvm.cpu())
    got = vm["main"](*(tvm.runtime.tensor(v) for v in feeds.values())).numpy()
    expected = ort.InferenceSession(onnx_model.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
