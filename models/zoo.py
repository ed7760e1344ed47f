"""The model zoo used by tests, examples and benchmarks.

Every model is generated deterministically from a seed, so the same name always yields the same ONNX
bytes (and so the same source digest). ``digits_cnn`` carries real weights, trained here with numpy
on the 8x8 handwritten digits that scikit-learn ships offline, and a labelled test split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


@dataclass(frozen=True)
class ZooModel:
    name: str
    model: onnx.ModelProto
    sample_inputs: dict[str, np.ndarray]
    """Inputs for golden data and calibration (a batch of representative samples per input)."""
    test_set: tuple[np.ndarray, np.ndarray] | None = None
    """(inputs, labels) for models with real weights."""

    def save(self, path: str) -> None:
        onnx.save(self.model, path)

    def save_inputs(self, path: str) -> None:
        """The sample inputs (a batch per input) and, when there is one, the labelled test set
        as ``test_inputs``/``test_labels``: what ``--inputs`` and ``--calibration`` read."""
        arrays: dict[str, Any] = dict(self.sample_inputs)
        if self.test_set is not None:
            arrays["test_inputs"], arrays["test_labels"] = self.test_set
        np.savez(path, **arrays)


class _Graph:
    """A small ONNX graph builder with seeded He-initialised weights."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}_{self.count}"

    def const(self, kind: str, value: np.ndarray) -> str:
        name = self.name(kind)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1) -> str:
        fan_in = cin // group * k * k
        w = self.rng.normal(0, np.sqrt(2.0 / fan_in), (cout, cin // group, k, k)).astype(np.float32)
        return self.node(
            "Conv",
            [x, self.const("w", w)],
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[k // 2] * 4,
            group=group,
        )

    def bn(self, x: str, c: int) -> str:
        gamma = self.rng.uniform(0.5, 1.0, c).astype(np.float32)
        beta = self.rng.normal(0, 0.1, c).astype(np.float32)
        mean = self.rng.normal(0, 0.1, c).astype(np.float32)
        var = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        params = [self.const(n, v) for n, v in (("g", gamma), ("b", beta), ("m", mean), ("v", var))]
        return self.node("BatchNormalization", [x, *params], epsilon=1e-5)

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1) -> str:
        return self.bn(self.conv(x, cin, cout, k, stride, group), cout)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def relu6(self, x: str) -> str:
        lo = self.const("lo", np.array(0.0, np.float32))
        hi = self.const("hi", np.array(6.0, np.float32))
        return self.node("Clip", [x, lo, hi])

    def head(self, x: str, cin: int, classes: int) -> str:
        pooled = self.node("GlobalAveragePool", [x])
        flat = self.node("Flatten", [pooled], axis=1)
        w = self.rng.normal(0, np.sqrt(1.0 / cin), (classes, cin)).astype(np.float32)
        b = self.rng.normal(0, 0.01, classes).astype(np.float32)
        return self.node("Gemm", [flat, self.const("fc_w", w), self.const("fc_b", b)], transB=1)

    def finish(
        self, name: str, x: str, shape: list[int], out: str, classes: int
    ) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [x], ["logits"], name="logits"))
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [shape[0], classes])],
            self.inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="mlinferbooster-zoo",
        )
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def _samples(seed: int, shape: tuple[int, ...], count: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    return {"input": rng.standard_normal((count, *shape[1:])).astype(np.float32)}


def tiny_cnn() -> ZooModel:
    """Two 3x3 convolutions and a classifier on 32x32 RGB: compiles in seconds."""
    g = _Graph(seed=1)
    x = g.relu(g.conv_bn("input", 3, 16, 3))
    x = g.relu(g.conv_bn(x, 16, 32, 3, stride=2))
    shape = [1, 3, 32, 32]
    return ZooModel(
        "tiny_cnn",
        g.finish("tiny_cnn", g.head(x, 32, 10), shape, "input", 10),
        _samples(1, tuple(shape)),
    )


def resnet18() -> ZooModel:
    """ResNet-18's shape (224x224, basic blocks 2-2-2-2, widths 64..512) with seeded weights."""
    g = _Graph(seed=18)
    x = g.relu(g.conv_bn("input", 3, 64, 7, stride=2))
    x = g.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            y = g.relu(g.conv_bn(x, cin, cout, 3, stride))
            y = g.conv_bn(y, cout, cout, 3)
            shortcut = g.conv_bn(x, cin, cout, 1, stride) if stride != 1 or cin != cout else x
            x = g.relu(g.node("Add", [y, shortcut]))
            cin = cout
    shape = [1, 3, 224, 224]
    return ZooModel(
        "resnet18",
        g.finish("resnet18", g.head(x, 512, 1000), shape, "input", 1000),
        _samples(18, tuple(shape), count=2),
    )


def mobilenetv2() -> ZooModel:
    """MobileNetV2's shape (inverted residuals, depthwise 3x3, ReLU6) with seeded weights."""
    g = _Graph(seed=2)
    x = g.relu6(g.conv_bn("input", 3, 32, 3, stride=2))
    cin = 32
    # (expansion, output channels, repeats, first stride) as in the MobileNetV2 paper.
    for t, c, n, s in (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ):
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            y = g.relu6(g.conv_bn(x, cin, hidden, 1)) if t != 1 else x
            y = g.relu6(g.conv_bn(y, hidden, hidden, 3, stride, group=hidden))
            y = g.conv_bn(y, hidden, c, 1)
            x = g.node("Add", [x, y]) if stride == 1 and cin == c else y
            cin = c
    x = g.relu6(g.conv_bn(x, cin, 1280, 1))
    shape = [1, 3, 224, 224]
    return ZooModel(
        "mobilenetv2",
        g.finish("mobilenetv2", g.head(x, 1280, 1000), shape, "input", 1000),
        _samples(2, tuple(shape), count=2),
    )


def digits_cnn() -> ZooModel:
    """A small CNN with real weights trained on scikit-learn's 8x8 digits; 75/25 split."""
    from models.digits import train_digits_cnn

    weights, (x_train, _), (x_test, y_test) = train_digits_cnn(seed=0)
    g = _Graph(seed=0)
    conv1 = g.node(
        "Conv",
        ["input", g.const("w", weights["conv1_w"]), g.const("b", weights["conv1_b"])],
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
    )
    x = g.relu(conv1)
    conv2 = g.node(
        "Conv",
        [x, g.const("w", weights["conv2_w"]), g.const("b", weights["conv2_b"])],
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
    )
    x = g.relu(conv2)
    flat = g.node("Flatten", [x], axis=1)
    logits = g.node(
        "Gemm", [flat, g.const("fc_w", weights["fc_w"]), g.const("fc_b", weights["fc_b"])], transB=1
    )
    shape = [1, 1, 8, 8]
    model = g.finish("digits_cnn", logits, shape, "input", 10)
    return ZooModel("digits_cnn", model, {"input": x_train[:32]}, test_set=(x_test, y_test))


def feature_pipeline() -> ZooModel:
    """A feature-preprocessing pipeline of the kind model converters emit (per-feature scale and
    shift steps and clips, one small operator each, on 64 features) before a linear classifier:
    ONNX Runtime pays its per-operator cost about 200 times, TVM fuses the chain into one loop."""
    g = _Graph(seed=5)
    features, x = 64, "input"
    for step in range(96):
        scale = g.const("scale", g.rng.uniform(0.9, 1.1, features).astype(np.float32))
        shift = g.const("shift", g.rng.normal(0, 0.05, features).astype(np.float32))
        x = g.node("Add", [g.node("Mul", [x, scale]), shift])
        if step % 8 == 7:
            x = g.relu6(x)
    w = g.rng.normal(0, np.sqrt(1.0 / features), (10, features)).astype(np.float32)
    b = g.rng.normal(0, 0.01, 10).astype(np.float32)
    logits = g.node("Gemm", [x, g.const("fc_w", w), g.const("fc_b", b)], transB=1)
    shape = [1, features]
    return ZooModel(
        "feature_pipeline",
        g.finish("feature_pipeline", logits, shape, "input", 10),
        _samples(5, tuple(shape)),
    )


ZOO: dict[str, Callable[[], ZooModel]] = {
    "tiny_cnn": tiny_cnn,
    "resnet18": resnet18,
    "mobilenetv2": mobilenetv2,
    "digits_cnn": digits_cnn,
    "feature_pipeline": feature_pipeline,
}


def get(name: str) -> ZooModel:
    from agent.errors import BoostError

    if name not in ZOO:
        raise BoostError(f"no zoo model named {name!r}; known: {', '.join(ZOO)}")
    return ZOO[name]()
