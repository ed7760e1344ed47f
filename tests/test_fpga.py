"""FPGA bitstreams: the catalog, the store, builds that carry a bitstream, and agents that program
their board's FPGA when a deployment needs a design it does not hold, check it, and go back when
it fails.

The boards are simulated (``tests/support/fake_board``): a fake ``/sys`` and ``/proc`` tree and a
fake ``pynq`` package whose FPGA runs the VTA simulator for the design its "bitstream" names, so
the agent, the pynq driver and the register sequence are the real ones.
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from agent.artifact import Manifest, read_manifest, sha256_file
from agent.capabilities import incompatibilities
from agent.fpga import Fpga, FpgaError
from models.fleet import Fleet, decode_outputs
from tests.conftest import Keys, run_cli
from tests.support import fake_board
from tests.support.fleet import AgentProcess, CountingStore, Watcher, deploy, golden, online, resign
from tests.support.pynq_double import ScriptedPynq
from vta.bitstreams import CATALOG, BitstreamError, BitstreamRef, load_catalog
from vta.config import VtaConfig
from vta.drivers.pynq import BOARDS, program
from vta.errors import DriverError

DESIGN = VtaConfig().bitstream_id


# -- the catalog, the driver's programming step --------------------------------------------------


def test_the_catalog_names_known_boards_and_designs() -> None:
    entries = load_catalog(CATALOG)
    assert {(e.board, e.design) for e in entries} >= {("pynq-z1", DESIGN), ("ultra96", DESIGN)}
    ultra96 = next(e for e in entries if e.board == "ultra96")
    assert ultra96.axi_widths == {"m_axi_hpm0_fpd": 128, "s_axi_hpc0_fpd": 128}
    assert all(e.source for e in entries)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('board = "zx81"', "unknown board 'zx81'"),
        ('design = "1x16"', "expected BATCHxBLOCK"),
        ('sha256 = "abc"', "64 lowercase hex digits"),
        ("axi_widths = { s_axi_hpc0_fpd = 128 }", "ZynqMP boards only"),
    ],
)
def test_a_bad_catalog_entry_is_named(entry: str, message: str, tmp_path: Path) -> None:
    fields = {
        "board": '"pynq-z1"', "design": f'"{DESIGN}"', "file": '"a.bit"', "sha256": '""',
        "source": '"here"',
    }  # fmt: skip
    key = entry.split(" = ")[0]
    lines = [f"{k} = {v}" for k, v in fields.items() if k != key] + [entry]
    catalog = tmp_path / "bitstreams.toml"
    catalog.write_text("[[bitstream]]\n" + "\n".join(lines) + "\n")
    with pytest.raises(BitstreamError, match=message) as err:
        load_catalog(catalog)
    assert "bitstream 1" in str(err.value)


def test_programming_a_zynqmp_board_sets_its_port_widths() -> None:
    """The ultra96 design's ports get their width fields set by read-modify-write, other bits
    kept: FPD_SLCR AXI_FS DW_SS0_SEL = 2 (128 bits), AFIFM0 RDCTRL/WRCTRL FABRIC_WIDTH = 0."""
    double = ScriptedPynq()
    double.expect(
        ("download", "/b/vta.bit"),
        ("read", "fpd_slcr", 0x000, 0xF5A),
        ("write", "fpd_slcr", 0x000, 0xE5A),
        ("read", "afifm0", 0x000, 0x6),
        ("write", "afifm0", 0x000, 0x4),
        ("read", "afifm0", 0x014, 0x1),
        ("write", "afifm0", 0x014, 0x0),
    )
    widths = {"s_axi_hpc0_fpd": 128, "m_axi_hpm0_fpd": 128}
    program(Path("/b/vta.bit"), BOARDS["ultra96"], widths, double)  # type: ignore[arg-type]
    double.assert_done()
    with pytest.raises(DriverError, match="no settable AXI port widths"):
        double.expect(("download", "/b/vta.bit"))
        program(Path("/b/vta.bit"), BOARDS["pynq-z1"], widths, double)  # type: ignore[arg-type]


# -- the device's FPGA: program, check, go back ---------------------------------------------------


@pytest.fixture
def board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = fake_board.make_board(tmp_path / "board")
    monkeypatch.setenv("FAKE_BOARD_ROOT", str(root))
    return root


@pytest.fixture
def fake_pynq(board: Path) -> ModuleType:
    return importlib.import_module("tests.support.fake_board.pynq")


def kept(state: Path, behaviour: str, tmp_path: Path) -> BitstreamRef:
    """A fake bitstream of the default design, kept in the device's bitstreams."""
    source = fake_board.bitstream(tmp_path / f"{behaviour}.bit", DESIGN, behaviour)
    ref = BitstreamRef("pynq-z1", DESIGN, "vta.bit", sha256_file(source), source.stat().st_size)
    (state / "bitstreams").mkdir(parents=True, exist_ok=True)
    shutil.copy(source, state / "bitstreams" / ref.sha256)
    return ref


@pytest.mark.parametrize(
    ("behaviour", "why"),
    [("idle", "computed"), ("hang", "did not finish"), ("refuse", "rejected")],
)
def test_a_failed_programming_goes_back_to_the_bitstream_before(
    behaviour: str, why: str, board: Path, fake_pynq: ModuleType, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    fpga = Fpga(state, "pynq-z1", board, pynq=lambda: fake_pynq)
    good, bad = kept(state, "ok", tmp_path), kept(state, behaviour, tmp_path)
    assert fpga.loaded is None
    fpga.program(good)
    assert fpga.loaded == good
    with pytest.raises(FpgaError, match=why):
        fpga.program(bad)
    assert fpga.loaded is None  # unknown until the way back succeeds
    assert fpga.revert() == good and fpga.loaded == good
    assert [Path(p).name for p in fake_board.programmed(board)] == [
        good.sha256,
        bad.sha256,
        good.sha256,
    ]


def test_a_damaged_kept_bitstream_is_never_programmed(
    board: Path, fake_pynq: ModuleType, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    fpga = Fpga(state, "pynq-z1", board, pynq=lambda: fake_pynq)
    good = kept(state, "ok", tmp_path)
    path = fpga.path(good)
    path.write_bytes(path.read_bytes().replace(b"ok", b"OK"))
    with pytest.raises(FpgaError, match="missing or damaged"):
        fpga.program(good)
    assert not path.exists() and fake_board.programmed(board) == []


def test_without_the_pynq_package_programming_fails_with_the_fix(
    board: Path, tmp_path: Path
) -> None:
    def missing() -> ModuleType:
        raise DriverError("the pynq package is not installed: `pip install mlinferbooster[pynq]`")

    state = tmp_path / "state"
    fpga = Fpga(state, "pynq-z1", board, pynq=missing)
    with pytest.raises(FpgaError, match=r"mlinferbooster\[pynq\]"):
        fpga.program(kept(state, "ok", tmp_path))
    assert fpga.revert() is None and fake_board.programmed(board) == []


def test_what_the_fpga_holds_is_forgotten_at_a_reboot(
    board: Path, fake_pynq: ModuleType, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    fpga = Fpga(state, "pynq-z1", board, pynq=lambda: fake_pynq)
    fpga.program(kept(state, "ok", tmp_path))
    assert fpga.loaded is not None
    fake_board.reboot(board)
    assert fpga.loaded is None


def test_a_build_with_a_bitstream_suits_a_board_that_can_be_programmed() -> None:
    ref = BitstreamRef("pynq-z1", DESIGN, "vta.bit", "0" * 64, 10)
    caps = {
        "cpu": {"triple": "x86_64-linux-gnu", "features": []},
        "tvm_runtime": {"abi": "0.27"},
        "accelerators": [{"kind": "vta-fpga", "board": "ultra96", "design": None}],
    }
    from agent.artifact import TargetInfo

    manifest = Manifest(
        "m", "1", "0" * 64,
        TargetInfo("vta", "x86_64-linux-gnu", {}, (), f"vta:{DESIGN}"),
        "0.27.0", (), (), "lib.so", None, (), bitstream=ref,  # type: ignore[arg-type]
    )  # fmt: skip
    (problem,) = incompatibilities(manifest, caps)
    assert "a pynq-z1 FPGA to program (its FPGA boards: ultra96)" in problem
    caps["accelerators"][0]["board"] = "pynq-z1"  # type: ignore[index]
    assert incompatibilities(manifest, caps) == []


# -- end to end: bitstream add, compile --fpga, deploy over MQTT to a simulated board -----------


def build_with(
    bitstream: Path, version: str, store: CountingStore, keys: Keys, model: Path, work: Path
) -> Path:
    """``boost-build bitstream add`` the file, then ``compile --target vta --fpga pynq-z1``."""
    work.mkdir(exist_ok=True)
    config = work / "deploy.toml"
    config.write_text(
        f'[build]\nstore_dir = "{store.store.root}"\nsigning_key = "{keys[0]}"\n'
        f'tuning_db = "{work / "tuning"}"\n'
    )
    added = run_cli("models.cli", "--config", str(config), "bitstream", "add", str(bitstream),
                    "--board", "pynq-z1", cwd=work)  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "now pinned" in added.stdout  # the catalog has no published digest for pynq-z1
    out = work / f"tiny_cnn-{version}.boost"
    built = run_cli(
        "models.cli", "--config", str(config), "compile", str(model), "--target", "vta",
        "--fpga", "pynq-z1", "--model-version", version,
        "--calibration", str(model.with_suffix(".npz")), "-o", str(out), cwd=work,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert f"bitstream: pynq-z1 {DESIGN}" in built.stdout
    return out


def fpga_caps(watcher: Watcher, after: int, design: str | None) -> list[dict[str, object]]:
    """The accelerators of the first capability document from ``after`` on whose FPGA holds
    ``design``."""
    caps = watcher.wait_for(
        lambda topic, payload: (
            topic.endswith("dev1/caps")
            and [a.get("design") for a in payload["accelerators"] if a["kind"] == "vta-fpga"]
            == [design]
        ),
        after=after,
    )
    accelerators: list[dict[str, object]] = caps["accelerators"]
    return accelerators


def test_an_agent_programs_checks_and_keeps_its_fpga(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    fleet: Fleet,
    store: CountingStore,
    keys: Keys,
    zoo_model: Callable[[str], Path],
    board: Path,
    tmp_path: Path,
) -> None:
    model = zoo_model("tiny_cnn")
    work = tmp_path / "build"
    bad = build_with(
        fake_board.bitstream(tmp_path / "idle.bit", DESIGN, "idle"), "1", store, keys, model, work
    )
    good_bit = fake_board.bitstream(tmp_path / "ok.bit", DESIGN)
    good = build_with(good_bit, "2", store, keys, model, work)
    good_ref = Manifest.from_json(read_manifest(good)[0]).bitstream
    assert good_ref is not None and good_ref.sha256 == sha256_file(good_bit)

    def start() -> AgentProcess:
        mark = watcher.mark()
        agent = agents(
            extra=f'fpga_root = "{board}"',  # the default backends: vta-fpga, vta-sim, cpu
            env={"PYTHONPATH": fake_board.PYTHONPATH, "FAKE_BOARD_ROOT": str(board)},
        )
        online(watcher, agent, mark)
        return agent

    mark = watcher.mark()
    agent = start()
    # The boot loaded nothing the agent knows: VTA layers would run on the simulator.
    assert [(a["kind"], a["design"]) for a in fpga_caps(watcher, mark, None)] == [
        ("vta-fpga", None), ("vta-sim", DESIGN)
    ]  # fmt: skip

    # A bitstream that loads but does not compute: the smoke test catches it, nothing is known.
    (outcome,) = deploy(fleet, store, bad)
    assert outcome.state == "failed", (outcome, agent.log_text())
    assert "computed" in outcome.detail and "the FPGA's design is unknown" in outcome.detail
    assert [e["state"] for e in outcome.events][-2:] == ["programming", "failed"]

    # A good bitstream, but the build's own smoke test fails afterwards: the FPGA goes back.
    broken = resign(good, tmp_path / "broken.boost", *keys,
                    files={"golden.npz": corrupt_golden})  # fmt: skip
    (outcome,) = deploy(fleet, store, broken)
    assert outcome.state == "failed" and "the FPGA's design is unknown" in outcome.detail, outcome
    assert [e["state"] for e in outcome.events][-4:] == [
        "programming",
        "loading",
        "smoke-testing",
        "failed",
    ]

    # The good build: programmed (the bitstream is kept from the last deployment), checked, active.
    mark = watcher.mark()
    (outcome,) = deploy(fleet, store, good)
    assert outcome.state == "active", (outcome, agent.log_text())
    assert "programming" in [e["state"] for e in outcome.events]
    # The build's design is the simulator's too, but the FPGA its bitstream is for comes first.
    assert fpga_caps(watcher, mark, DESIGN) == [{
        "kind": "vta-fpga", "board": "pynq-z1", "manager": "fpga0", "state": "operating",
        "design": DESIGN, "bitstream": good_ref.sha256,
    }]  # fmt: skip
    inputs, expected = golden(good, tmp_path / "golden", keys[1])
    reply = fleet.infer("dev1", "tiny_cnn", inputs, 120)
    assert reply["ok"], reply
    (got,) = decode_outputs(reply).values()
    assert np.array_equal(got, expected[0])  # the fabric runs the design bit for bit
    assert "VTA layers run on vta-fpga" in agent.log_text()
    programmed = [Path(p).name for p in fake_board.programmed(board)]
    bad_sha = Manifest.from_json(read_manifest(bad)[0]).bitstream.sha256  # type: ignore[union-attr]
    assert programmed == [bad_sha, good_ref.sha256, good_ref.sha256]

    # A restart in the same boot: the design is still there, nothing is programmed again.
    agent.stop()
    mark = watcher.mark()
    agent = start()
    fpga_caps(watcher, mark, DESIGN)
    assert fleet.infer("dev1", "tiny_cnn", inputs, 120)["ok"]
    assert len(fake_board.programmed(board)) == 3

    # After a reboot the agent programs the active model's kept bitstream again, by itself.
    agent.stop()
    fake_board.reboot(board)
    mark = watcher.mark()
    agent = start()
    reply = fleet.infer("dev1", "tiny_cnn", inputs, 120)
    assert reply["ok"], (reply, agent.log_text())
    assert np.array_equal(next(iter(decode_outputs(reply).values())), expected[0])
    assert [Path(p).name for p in fake_board.programmed(board)][3:] == [good_ref.sha256]


def corrupt_golden(path: Path) -> None:
    with np.load(path) as data:
        arrays = dict(data)
    arrays["output:0"] = arrays["output:0"] + 1
    np.savez(path, **arrays)
