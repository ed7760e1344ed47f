"""Layers lowered to VTA programs, run on the HLS-mode simulator, against the numpy reference.

Every case must match bit for bit; the simulator's HLS mode rejects anything the FPGA design
could not run, so passing here also means the compiler's output is board-ready.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.support.vta_layers import reference, run_on_simulator
from vta import isa
from vta.bundle import Bundle
from vta.config import VtaConfig
from vta.errors import VtaError
from vta.lower import ConvSpec, LoweringError, Tiling, lower, relocate

GOLDEN = Path(__file__).parent / "golden"
CFG = VtaConfig()


def random_case(spec: ConvSpec, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.integers(-127, 128, (spec.in_channels, spec.height, spec.width), dtype=np.int8)
    w = rng.integers(-127, 128, (spec.out_channels, spec.in_channels, *spec.kernel), dtype=np.int8)
    b = rng.integers(-20000, 20000, spec.out_channels).astype(np.int32)
    r = None
    if spec.residual_shift is not None:
        shape = (spec.out_channels, spec.out_height, spec.out_width)
        r = rng.integers(-127, 128, shape, dtype=np.int8)
    return x, w, b, r


def check(spec: ConvSpec, seed: int, tiling: Tiling | None = None) -> None:
    x, w, b, r = random_case(spec, seed)
    layer = lower(spec, w, b, CFG, tiling)
    got, _ = run_on_simulator(layer, x, r)
    want = reference(spec, x, w, b, r)
    assert got.shape == want.shape
    mismatches = int((got != want).sum())
    assert mismatches == 0, f"{mismatches} of {want.size} outputs differ for {spec}"


CONVS = [
    # kernel, stride, padding (top, left, bottom, right), channels in/out, image
    ((1, 1), (1, 1), (0, 0, 0, 0), 20, 24, 9, 11),
    ((1, 1), (2, 2), (0, 0, 0, 0), 33, 40, 10, 9),
    ((3, 3), (1, 1), (1, 1, 1, 1), 20, 24, 9, 11),
    ((3, 3), (2, 2), (1, 1, 1, 1), 48, 17, 13, 13),
    ((3, 3), (1, 1), (0, 0, 0, 0), 5, 7, 6, 8),
    ((3, 3), (2, 2), (2, 1, 0, 3), 19, 35, 11, 7),
    ((7, 7), (2, 2), (3, 3, 3, 3), 20, 24, 19, 21),
    ((7, 7), (1, 1), (2, 3, 1, 0), 9, 30, 12, 12),
    ((3, 3), (1, 1), (1, 1, 1, 1), 64, 64, 56, 56),  # a ResNet-18 layer: many tiles
    ((3, 3), (2, 2), (1, 1, 1, 1), 40, 130, 2, 2),  # one output position: spaced micro-ops
]


@pytest.mark.parametrize("case", CONVS, ids=lambda c: f"k{c[0][0]}s{c[1][0]}p{c[2]}c{c[3]}-{c[4]}")
@pytest.mark.parametrize("relu", [False, True], ids=["clip", "relu"])
def test_conv_matches_reference(case, relu):
    kernel, stride, padding, cin, cout, h, w = case
    spec = ConvSpec(
        cin, cout, h, w, kernel, stride, padding, shift=9, clip=(0, 127) if relu else (-127, 127)
    )
    check(spec, seed=sum(map(ord, str(case))) + relu)


@pytest.mark.parametrize(
    "cin,cout", [(512, 1000), (40, 10), (16, 16), (100, 37), (1024, 20)], ids=str
)
def test_dense_matches_reference(cin, cout):
    check(ConvSpec(cin, cout, 1, 1, shift=11), seed=cin * cout)


@pytest.mark.parametrize("k", [0, 3, 6])
@pytest.mark.parametrize("image", [(8, 8, 1), (14, 14, 2), (2, 1, 1)], ids=str)
def test_residual_add_on_the_accumulator(k, image):
    h, w, stride = image
    spec = ConvSpec(
        33, 40, h, w, (1, 1), (stride, stride), shift=8, residual_shift=k, clip=(0, 127)
    )
    check(spec, seed=k + h)


@pytest.mark.parametrize("pre_shift", [1, 3, 8])
def test_residual_after_a_partial_shift(pre_shift):
    """A residual much coarser than the accumulators joins them half-way through the shift."""
    spec = ConvSpec(
        40, 24, 7, 7, (3, 3), (1, 1), (1, 1, 1, 1), shift=12, pre_shift=pre_shift,
        residual_shift=2, clip=(0, 127),
    )  # fmt: skip
    check(spec, seed=pre_shift)


@pytest.mark.parametrize("shift", [-3, 0, 1, 15, 16, 23, 30])
def test_shifts_beyond_the_alu_range_are_split(shift):
    check(ConvSpec(16, 16, 4, 4, (3, 3), padding=(1, 1, 1, 1), shift=shift), seed=shift + 50)


@pytest.mark.parametrize(
    "tiling",
    [Tiling(1, 1, 1, 1), Tiling(1, 1, 3, 5), Tiling(3, 1, 7, 2), Tiling(1, 2, 2, 12)],
    ids=str,
)
def test_forced_tilings_with_remainders(tiling):
    spec = ConvSpec(30, 40, 13, 12, (3, 3), (1, 1), (1, 1, 1, 1), shift=9, residual_shift=1)
    check(spec, seed=7, tiling=tiling)


def test_tiles_fit_half_buffers_and_overlap_loads():
    spec = ConvSpec(64, 64, 56, 56, (3, 3), (1, 1), (1, 1, 1, 1), shift=9)
    _, w, b, _ = random_case(spec, 0)
    layer = lower(spec, w, b, CFG)
    loads = [
        i for i in layer.insns if isinstance(i, isa.MemInsn) and i.memory_type == isa.MemId.INP
    ]
    # Input tiles alternate between the two halves of the input buffer.
    assert {i.sram_base // (CFG.inp_depth // 2) for i in loads} == {0, 1}
    # Loads after the first two steps wait for the compute stage to free their half.
    assert any(i.pop_next for i in loads)
    # Every GEMM step waits for its loads (the token rides on the step's first compute
    # instruction, which may be the micro-op load before the GEMM).
    steps = [i for i in layer.insns[1:] if isinstance(i, isa.GemmInsn) and not i.reset]
    waits = [i for i in layer.insns if i.stage == isa.Stage.COMPUTE and i.pop_prev]
    assert len(steps) > 2 and len(waits) == len(steps) + 1  # + the FINISH epilogue


def test_bad_layers_are_refused_with_the_reason():
    with pytest.raises(LoweringError, match="padding"):
        ConvSpec(16, 16, 8, 8, (3, 3), padding=(16, 0, 0, 0))
    with pytest.raises(LoweringError, match="residual"):
        ConvSpec(16, 16, 8, 8, residual_shift=7)
    with pytest.raises(LoweringError, match="pre-shift"):
        ConvSpec(16, 16, 8, 8, shift=4, pre_shift=2)
    with pytest.raises(LoweringError, match="16-bit"):
        ConvSpec(16, 16, 8, 8, shift=20, pre_shift=2, residual_shift=0)
    with pytest.raises(LoweringError, match="weights of shape"):
        lower(ConvSpec(16, 16, 8, 8), np.zeros((16, 16, 3, 3), np.int8), None, CFG)
    with pytest.raises(LoweringError, match="divide"):
        lower(
            ConvSpec(40, 40, 8, 8), np.zeros((40, 40, 1, 1), np.int8), None, CFG, Tiling(2, 1, 8, 8)
        )
    with pytest.raises(LoweringError, match="no tiling"):
        big = ConvSpec(16, 16, 64, 64, (31, 31), padding=(15, 15, 15, 15))
        lower(big, np.zeros((16, 16, 31, 31), np.int8), None, CFG)


def test_relocation_needs_an_aligned_arena():
    spec = ConvSpec(16, 16, 4, 4)
    layer = lower(spec, np.ones((16, 16, 1, 1), np.int8), None, CFG)
    moved = relocate(layer.insns, 1 << 20, CFG)
    loads = [(a, b) for a, b in zip(layer.insns, moved, strict=True) if a != b]
    assert loads and all(isinstance(b, isa.MemInsn) and b.dram_base > a.dram_base for a, b in loads)
    with pytest.raises(VtaError, match="aligned"):
        relocate(layer.insns, 100, CFG)


def test_bundle_round_trip(tmp_path):
    spec = ConvSpec(20, 24, 9, 11, (3, 3), padding=(1, 1, 1, 1), shift=9, residual_shift=2)
    x, w, b, r = random_case(spec, 3)
    bundle = Bundle("abc123", CFG, (lower(spec, w, b, CFG),))
    bundle.save(tmp_path)
    again = Bundle.load(tmp_path)
    assert again == bundle
    got, _ = run_on_simulator(again.layers[0], x, r)
    assert np.array_equal(got, reference(spec, x, w, b, r))
    (tmp_path / "vta.json").write_text('{"format": 1}')
    with pytest.raises(VtaError, match="malformed"):
        Bundle.load(tmp_path)


GOLDEN_LAYERS = {
    "conv3x3_16to16_4x4_relu": ConvSpec(
        16, 16, 4, 4, (3, 3), padding=(1, 1, 1, 1), shift=8, clip=(0, 127)
    ),
    "conv1x1_s2_residual": ConvSpec(16, 32, 4, 4, (1, 1), (2, 2), shift=7, residual_shift=2),
    "dense_48to10": ConvSpec(48, 10, 1, 1, shift=10),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_LAYERS))
def test_disassembly_is_pinned(name):
    """The exact program of a few small layers; after a deliberate change to the compiler, rerun
    with BOOST_UPDATE_GOLDEN=1 and review the diff."""
    spec = GOLDEN_LAYERS[name]
    _, w, b, _ = random_case(spec, 0)
    layer = lower(spec, w, b, CFG)
    text = "\n".join(isa.disassemble_program(layer.insns, CFG)) + "\n"
    path = GOLDEN / f"vta_{name}.txt"
    if os.environ.get("BOOST_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text()


def test_engine_serves_loaded_layers_and_names_what_is_missing():
    from vta.drivers.sim import SimDriver
    from vta.engine import VtaEngine

    spec = ConvSpec(16, 16, 4, 4, shift=6)
    x, w, b, _ = random_case(spec, 9)
    bundle = Bundle("build1", CFG, (lower(spec, w, b, CFG),))
    engine = VtaEngine(SimDriver(CFG, hls=True))
    engine.add(bundle)
    packed = np.ascontiguousarray(x.reshape(1, 16, 4, 4).transpose(0, 2, 3, 1))
    out = np.zeros((1, 4, 4, 16), np.int8)
    engine.call(bundle.key(0), packed, out)
    want = reference(spec, x, w, b)
    assert np.array_equal(out.transpose(0, 3, 1, 2).reshape(16, 4, 4), want)
    with pytest.raises(VtaError, match="no VTA layer 'build1/1'"):
        engine.call("build1/1", packed, out)
    engine.remove("build1")
    with pytest.raises(VtaError, match="no VTA layer 'build1/0'"):
        engine.call(bundle.key(0), packed, out)
    other = VtaConfig(log_inp_buff_size=14)
    with pytest.raises(VtaError, match="rebuild it for this design"):
        engine.add(Bundle("build2", other, ()))
    engine.close()
