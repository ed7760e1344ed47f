"""The ONNX Runtime interposer: an unmodified script, a real agent with its local API, a real
build worker; the script's session moves to the boost build only when that is faster."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from agent.runtime import InferenceInputError
from tests.support.fleet import REPO, AgentProcess, Watcher, WorkerProcess, online

# An application that knows nothing of boost: it runs its model until told to stop (a file
# appears) and prints its first and last outputs.
APP = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import onnxruntime as ort

    model, inputs, stop = sys.argv[1:4]
    session = ort.InferenceSession(model)
    name = session.get_inputs()[0].name
    x = np.load(inputs)[name][:1]
    first = session.run(None, {name: x})[0]
    calls = 1
    while not os.path.exists(stop):
        last = session.run([session.get_outputs()[0].name], {name: x})[0]
        calls += 1
    print(json.dumps({"first": first.tolist(), "last": last.tolist(), "calls": calls}))
    """
)


def start_app(
    tmp_path: Path, agent: AgentProcess, onnx: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    (tmp_path / "app.py").write_text(APP)
    stop = tmp_path / "stop"
    env = {
        **os.environ,
        "BOOST_CONFIG": str(agent.config),
        "BOOST_INTERPOSE_POLL_S": "0.5",
        "BOOST_INTERPOSE_REPORT_S": "1",
        "PYTHONPATH": str(REPO),
    }
    app = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.interpose",
            str(tmp_path / "app.py"),
            str(onnx),
            str(onnx.with_suffix(".npz")),
            str(stop),
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return app, stop


def finish(app: subprocess.Popen[bytes], stop: Path) -> dict[str, Any]:
    stop.touch()
    out, err = app.communicate(timeout=60)
    assert app.returncode == 0, err.decode()[-3000:]
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.mark.parametrize(
    ("model", "engine"),
    [("feature_pipeline", "tvm"), ("tiny_cnn", "onnxruntime")],
)
def test_an_unmodified_script_moves_to_the_build_only_when_it_is_faster(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    workers: Callable[[str], WorkerProcess],
    zoo_model: Callable[[str], Path],
    tmp_path: Path,
    model: str,
    engine: str,
) -> None:
    workers("w1")
    agent = agents("dev1", extra="local_api = true\nmetrics_interval_s = 1")
    online(watcher, agent)
    onnx = zoo_model(model)
    app, stop = start_app(tmp_path, agent, onnx)
    try:
        seen = watcher.metrics_until(model, lambda m: "choice" in m, 240)
        if engine == "tvm":  # and then the script runs on the build alone
            watcher.metrics_until(model, lambda m: set(m.get("engines", {})) == {"tvm"}, 30)
    finally:
        result = finish(app, stop)
    choice = seen[-1]["choice"]
    latency = choice["latency_ms"]
    assert choice["engine"] == engine, choice
    faster = min(latency, key=latency.get)
    assert faster == engine, choice  # the measured faster engine is the one chosen
    # Before the build was there, the script ran on ONNX Runtime.
    assert seen[0]["engines"] == {"onnxruntime": seen[0]["invocations"]}, seen[0]
    reference = ort.InferenceSession(str(onnx)).run(
        None, {"input": np.load(onnx.with_suffix(".npz"))["input"][:1]}
    )[0]
    np.testing.assert_allclose(result["first"], reference, rtol=1e-6)
    np.testing.assert_allclose(result["last"], reference, rtol=1e-3, atol=1e-4)
    print(
        f"\n{model}: {engine} chosen (ONNX Runtime {latency['onnxruntime']} ms, "
        f"TVM build {latency['tvm']} ms), {result['calls']} calls by the unmodified script"
    )


@pytest.fixture
def without_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The interposer module, with no agent to find; disabled after the test."""
    (tmp_path / "deploy.toml").write_text('[agent]\nstate_dir = "nowhere"\n')
    monkeypatch.setenv("BOOST_CONFIG", str(tmp_path / "deploy.toml"))
    interpose = importlib.import_module("agent.interpose")
    interpose.disable()  # importing it enabled it: each test starts from ONNX Runtime's class
    yield interpose
    interpose.disable()


def test_without_an_agent_the_session_is_onnx_runtime_and_disable_restores_it(
    zoo_model: Callable[[str], Path], without_agent: Any
) -> None:
    onnx = zoo_model("tiny_cnn")
    original = ort.InferenceSession
    try:
        without_agent.enable()
        assert ort.InferenceSession is without_agent.BoostSession
        session = ort.InferenceSession(str(onnx))
        x = np.load(onnx.with_suffix(".npz"))["input"][:1]
        expected = original(str(onnx)).run(None, {"input": x})
        assert [i.name for i in session.get_inputs()] == ["input"]
        assert [o.name for o in session.get_outputs()] == ["logits"]
        assert session.get_providers() == ["CPUExecutionProvider"]
        np.testing.assert_array_equal(session.run(None, {"input": x})[0], expected[0])
        session.boost_close()
        assert session.boost_engine == "onnxruntime"
    finally:
        without_agent.disable()
    assert ort.InferenceSession is original


class FailingBuild:
    """A loaded build whose accelerator went away: every run fails."""

    outputs = ()

    def run(self, feeds: object) -> list[object]:
        raise RuntimeError("vta-serial: the coprocessor does not answer")


class RefusingBuild:
    outputs = ()

    def run(self, feeds: object) -> list[object]:
        raise InferenceInputError("input 'input': expected float32")


def test_a_failing_build_falls_back_to_onnx_runtime(
    zoo_model: Callable[[str], Path], without_agent: Any
) -> None:
    onnx = zoo_model("tiny_cnn")
    without_agent.enable()
    session = ort.InferenceSession(str(onnx))
    session.boost_close()
    session._build = FailingBuild()  # as if it had been chosen
    session.boost_engine = "tvm"
    x = np.load(onnx.with_suffix(".npz"))["input"][:1]
    expected = session._ort.run(None, {"input": x})
    np.testing.assert_array_equal(session.run(None, {"input": x})[0], expected[0])
    assert session.boost_engine == "onnxruntime" and session._build is None
    assert "does not answer" in session.boost_choice["fallback"]
    # Inputs a build refuses get ONNX Runtime's own error, and the build stays chosen.
    session._build = RefusingBuild()
    with pytest.raises(Exception, match=r"(?i)invalid|type|shape|rank") as raised:
        session.run(None, {"input": x.astype(np.float64)})
    assert not isinstance(raised.value, InferenceInputError)
    assert isinstance(session._build, RefusingBuild)
