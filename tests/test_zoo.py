from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from models import zoo
from tests.conftest import run_cli


@pytest.mark.parametrize("name", ["tiny_cnn", "resnet18", "mobilenetv2", "feature_pipeline"])
def test_generators_are_deterministic_and_run(name: str) -> None:
    first, second = zoo.get(name), zoo.get(name)
    assert first.model.SerializeToString() == second.model.SerializeToString()
    session = ort.InferenceSession(first.model.SerializeToString())
    x = first.sample_inputs["input"][:1]
    (out,) = session.run(None, {"input": x})
    assert out.shape[0] == 1 and np.isfinite(out).all() and out.std() > 0


def test_resnet18_and_mobilenetv2_have_their_shapes() -> None:
    ops = {
        n: [node.op_type for node in zoo.get(n).model.graph.node]
        for n in ("resnet18", "mobilenetv2")
    }
    assert ops["resnet18"].count("Conv") == 20  # 1 stem + 16 block convs + 3 projection shortcuts
    assert ops["resnet18"].count("Add") == 8
    depthwise = [
        node
        for node in zoo.get("mobilenetv2").model.graph.node
        if node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute)
    ]
    assert len(depthwise) == 17
    assert ops["mobilenetv2"].count("Add") == 10


def test_digits_cnn_has_real_trained_weights() -> None:
    model = zoo.get("digits_cnn")
    assert model.test_set is not None
    x, y = model.test_set
    assert len(x) == 450 and set(np.unique(y)) == set(range(10))
    session = ort.InferenceSession(model.model.SerializeToString())
    predictions = np.array(
        [session.run(None, {"input": x[i : i + 1]})[0].argmax() for i in range(len(x))]
    )
    accuracy = float((predictions == y).mean())
    assert accuracy >= 0.95, accuracy


def test_unknown_zoo_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("models.cli", "zoo", "export", "alexnet", cwd=tmp_path)
    assert result.returncode == 2 and "invalid choice: 'alexnet'" in result.stderr
