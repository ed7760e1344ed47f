"""The functional simulator against numpy references and the scalar reference interpreter."""

from __future__ import annotations

import random

import numpy as np
import pytest
from numpy.typing import NDArray

from tests.support import vta_random
from tests.support.vta_device import Device
from tests.support.vta_programs import Conv3x3
from tests.support.vta_random import CONFIGS
from tests.support.vta_ref import Reference
from vta import isa
from vta.config import VtaConfig
from vta.errors import DeadlockError, SimulationError
from vta.isa import AluInsn, AluOp, FinishInsn, GemmInsn, MemId, MemInsn, Stage, Uop
from vta.runtime import Loop, UopKernel
from vta.sim import Dram, Simulator, pack_lanes, unpack_lanes

DEFAULT = VtaConfig()


def wrap32(values: NDArray[np.int64]) -> NDArray[np.int64]:
    return ((values + (1 << 31)) % (1 << 32)) - (1 << 31)


def kernel(uops: list[tuple[int, int, int]], *loops: Loop) -> UopKernel:
    return UopKernel(tuple(Uop(*u) for u in uops), loops)


# -- GEMM -----------------------------------------------------------------------------------------


def _matmul(dev: Device, m: int, kb: int, nb: int, variant: str, rng: np.random.Generator) -> None:
    """out[m, b, n] = Σ_k x[m, b, k] · w[n, k] over blocks; layouts: x (m, kb), w (nb, kb),
    acc (m, nb) elements."""
    cfg, q = dev.cfg, dev.queue
    x = dev.random(MemId.INP, m * kb, rng)
    w = dev.random(MemId.WGT, nb * kb, rng)
    q.load_2d(MemId.INP, dev.upload(MemId.INP, x), 0, x_size=m * kb, y_size=1,
              x_stride=m * kb, sram_base=0)  # fmt: skip
    q.load_2d(MemId.WGT, dev.upload(MemId.WGT, w), 0, x_size=nb * kb, y_size=1,
              x_stride=nb * kb, sram_base=0)  # fmt: skip
    q.dep_push(Stage.LOAD, Stage.COMPUTE)
    q.dep_pop(Stage.LOAD, Stage.COMPUTE)
    q.gemm(kernel([(i, 0, 0) for i in range(m * nb)]), reset=True)
    rows = Loop(m, dst_factor=nb, src_factor=kb)
    if variant == "one uop, both loops":  # one instruction per reduction block
        for k in range(kb):
            q.gemm(kernel([(0, k, k)], rows, Loop(nb, dst_factor=1, src_factor=0, wgt_factor=kb)))
    elif variant == "uops over k, both loops":
        uops = [(0, k, k) for k in range(kb)]
        q.gemm(kernel(uops, rows, Loop(nb, dst_factor=1, src_factor=0, wgt_factor=kb)))
    else:  # "uops over (n, k), one loop"
        q.gemm(kernel([(n, k, n * kb + k) for n in range(nb) for k in range(kb)], rows))
    q.synchronize()
    xs = x.reshape(m, kb, cfg.batch, cfg.block).transpose(0, 2, 1, 3).reshape(m, cfg.batch, -1)
    ws = w.reshape(nb, kb, cfg.block, cfg.block).transpose(0, 2, 1, 3).reshape(nb * cfg.block, -1)
    expected = (xs @ ws.T).reshape(m, cfg.batch, nb, cfg.block).transpose(0, 2, 1, 3)
    got = dev.sim.acc[: m * nb].reshape(m, nb, cfg.batch, cfg.block)
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 2, 4), (7, 5, 3)])
@pytest.mark.parametrize(
    "variant", ["one uop, both loops", "uops over k, both loops", "uops over (n, k), one loop"]
)
def test_blocked_gemm(name: str, shape: tuple[int, int, int], variant: str) -> None:
    _matmul(Device(CONFIGS[name]), *shape, variant, np.random.default_rng(sum(shape)))


def test_gemm_accumulates_with_int32_wrap() -> None:
    dev = Device(DEFAULT)
    q, rng = dev.queue, np.random.default_rng(1)
    start = np.full((2, 1, 16), 2**31 - 100, dtype=np.int64)
    start[1] = -(2**31) + 100
    x = np.full((1, 1, 16), 127, dtype=np.int64)
    w = np.where(np.arange(2)[:, None, None] == 0, 127, -128) * np.ones((2, 16, 16), np.int64)
    q.load_2d(MemId.ACC, dev.upload(MemId.ACC, start), 0, x_size=2, y_size=1, x_stride=2,
              sram_base=0)  # fmt: skip
    q.load_2d(MemId.INP, dev.upload(MemId.INP, x), 0, x_size=1, y_size=1, x_stride=1, sram_base=0)
    q.load_2d(MemId.WGT, dev.upload(MemId.WGT, w), 0, x_size=2, y_size=1, x_stride=2, sram_base=0)
    q.dep_push(Stage.LOAD, Stage.COMPUTE)
    q.dep_pop(Stage.LOAD, Stage.COMPUTE)
    q.gemm(kernel([(0, 0, 0), (1, 0, 1)]))
    q.synchronize()
    expected = wrap32(start[:, 0] + np.array([127 * 127 * 16, -127 * 128 * 16])[:, None])
    assert np.array_equal(dev.sim.acc[:2, 0], expected)
    assert expected[0, 0] < 0 < expected[1, 0]  # both wrapped
    del rng


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize(("h", "w", "c", "o"), [(8, 8, 32, 32), (10, 12, 16, 48)])
def test_conv3x3_layer_matches_numpy_and_is_board_safe(
    h: int, w: int, c: int, o: int, relu: bool
) -> None:
    dev = Device(DEFAULT, hls=True)
    conv = Conv3x3(DEFAULT, h, w, c, o, shift=9, relu=relu)
    rng = np.random.default_rng(h * w)
    x = rng.integers(-128, 128, (c, h, w), dtype=np.int8)
    weights = rng.integers(-128, 128, (o, c, 3, 3), dtype=np.int8)
    inp = dev.upload(MemId.INP, conv.pack_input(x).reshape(-1, 1, 16))
    wgt = dev.upload(MemId.WGT, conv.pack_weights(weights).reshape(-1, 16, 16))
    out = dev.output(o * h * w // 16)
    conv.emit(dev.queue, inp, wgt, out)
    dev.queue.synchronize()
    y = dev.download(out, o * h * w // 16).reshape(o // 16, h, w, 16)
    assert np.array_equal(conv.unpack_output(y), conv.reference(x, weights))


def test_reset_zeroes_only_its_accumulators() -> None:
    dev = Device(DEFAULT)
    start = dev.random(MemId.ACC, 6, np.random.default_rng(3))
    dev.queue.load_2d(MemId.ACC, dev.upload(MemId.ACC, start), 0, x_size=6, y_size=1,
                      x_stride=6, sram_base=0)  # fmt: skip
    dev.queue.gemm(kernel([(1, 0, 0), (4, 0, 0)]), reset=True)
    dev.queue.synchronize()
    expected = start.copy()
    expected[[1, 4]] = 0
    assert np.array_equal(dev.sim.acc[:6], expected)


# -- ALU -------------------------------------------------------------------------------------------

SHIFTS = np.array([-40, -31, -3, -1, 0, 1, 5, 31, 32, 40])


def _alu_reference(op: AluOp, x: NDArray[np.int64], y: NDArray[np.int64]) -> NDArray[np.int64]:
    if op == AluOp.MIN:
        return np.minimum(x, y)
    if op == AluOp.MAX:
        return np.maximum(x, y)
    if op == AluOp.ADD:
        return wrap32(x + y)
    if op == AluOp.MUL:
        return wrap32(x * y)
    shifted = [
        int(a) >> int(b) if b >= 0 else int(a) << min(-int(b), 32)
        for a, b in zip(x.ravel(), np.broadcast_to(y, x.shape).ravel(), strict=True)
    ]
    return wrap32(np.array(shifted, dtype=np.int64).reshape(x.shape))


@pytest.mark.parametrize("op", list(AluOp))
@pytest.mark.parametrize("use_imm", [True, False])
def test_alu_op(op: AluOp, use_imm: bool) -> None:
    dev = Device(DEFAULT)
    rng = np.random.default_rng(int(op) * 2 + use_imm)
    x = rng.integers(-(2**31), 2**31, (8, 1, 16), dtype=np.int64)
    x[0, 0, :4] = [2**31 - 1, -(2**31), 0, -1]
    y = rng.integers(-(2**31), 2**31, (8, 1, 16), dtype=np.int64)
    if op == AluOp.SHR:
        y = rng.choice(SHIFTS, (8, 1, 16))
    both = np.concatenate([x, y])
    dev.queue.load_2d(MemId.ACC, dev.upload(MemId.ACC, both), 0, x_size=16, y_size=1,
                      x_stride=16, sram_base=0)  # fmt: skip
    imm = -3 if op == AluOp.SHR else -12345
    # uops over the first four entries, a loop of two over the rest: dst i reads src 8 + i.
    dev.queue.alu(kernel([(i, 8 + i, 0) for i in range(4)], Loop(2, 4, 4)), op,
                  imm if use_imm else None)  # fmt: skip
    dev.queue.synchronize()
    expected = _alu_reference(op, x, np.array(imm) if use_imm else y)
    assert np.array_equal(dev.sim.acc[:8], expected)
    assert np.array_equal(dev.sim.acc[8:16], y)


def test_alu_runs_in_order_when_a_uop_reads_an_earlier_result() -> None:
    dev = Device(DEFAULT)
    start = np.arange(1, 6, dtype=np.int64)[:, None, None] * np.ones((1, 1, 16), np.int64)
    dev.queue.load_2d(MemId.ACC, dev.upload(MemId.ACC, start), 0, x_size=5, y_size=1,
                      x_stride=5, sram_base=0)  # fmt: skip
    # acc[i] += acc[i-1] in order: prefix sums, not pairwise sums.
    dev.queue.alu(kernel([(i, i - 1, 0) for i in range(1, 5)]), AluOp.ADD)
    # the same destination three times: +7 three times
    dev.queue.alu(kernel([(0, 0, 0)] * 3), AluOp.ADD, 7)
    dev.queue.synchronize()
    assert list(dev.sim.acc[:5, 0, 0]) == [1 + 21, 3, 6, 10, 15]


# -- LOAD and STORE -------------------------------------------------------------------------------


@pytest.mark.parametrize("mem", [MemId.INP, MemId.WGT, MemId.ACC])
@pytest.mark.parametrize(
    "pad", [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (2, 1, 3, 2)]
)
@pytest.mark.parametrize("name", ["1x16_i8w8a32_15_15_18_17", "2x8_i2w4a32_10_10_12_12"])
def test_load_pads_with_zeros(mem: MemId, pad: tuple[int, int, int, int], name: str) -> None:
    dev = Device(CONFIGS[name])
    rows, cols, stride = 3, 4, 6
    data = dev.random(mem, rows * stride, np.random.default_rng(5))
    sram = {MemId.INP: dev.sim.inp, MemId.WGT: dev.sim.wgt, MemId.ACC: dev.sim.acc}[mem]
    sram[:] = 99 if mem == MemId.ACC else 1  # pads must overwrite what was there
    dev.queue.load_2d(mem, dev.upload(mem, data), 1, x_size=cols, y_size=rows, x_stride=stride,
                      sram_base=5, pad=pad)  # fmt: skip
    dev.queue.synchronize()
    block = data.reshape(rows * stride, -1)[1:].copy()
    block = np.concatenate([block, np.zeros((1, block.shape[1]), np.int64)])
    block = block.reshape(rows, stride, -1)[:, :cols]
    top, bottom, left, right = pad
    expected = np.pad(block, ((top, bottom), (left, right), (0, 0))).reshape(-1, *sram.shape[1:])
    assert np.array_equal(sram[5 : 5 + len(expected)], expected)
    assert np.all(sram[5 + len(expected) :] == sram.flat[-1])  # nothing else written


@pytest.mark.parametrize("name", ["1x16_i8w8a32_15_15_18_17", "2x8_i2w4a32_10_10_12_12"])
def test_store_narrows_by_wrapping(name: str) -> None:
    dev = Device(CONFIGS[name])
    cfg = dev.cfg
    lanes = cfg.batch * cfg.block
    pattern = np.array([127, 128, -129, 255, 2**31 - 1, -(2**31), 300, -3, 1, 2])
    values = np.resize(pattern, (3, lanes)).reshape(3, cfg.batch, cfg.block).astype(np.int64)
    dev.queue.load_2d(MemId.ACC, dev.upload(MemId.ACC, values), 0, x_size=3, y_size=1,
                      x_stride=3, sram_base=0)  # fmt: skip
    out = dev.output(6)
    dev.queue.store_2d(out, 1, x_size=1, y_size=3, x_stride=2, sram_base=0)
    dev.queue.synchronize()
    got = dev.download(out, 6)
    bits = cfg.out_width
    expected = ((values + (1 << (bits - 1))) % (1 << bits)) - (1 << (bits - 1))
    assert np.array_equal(got[[1, 3, 5]], expected)
    assert np.all(got[[0, 2, 4]] == 0)  # the stride skipped them


def test_sub_byte_packing_round_trips() -> None:
    rng = np.random.default_rng(9)
    for width in (2, 4, 8):
        values = rng.integers(-(1 << (width - 1)), 1 << (width - 1), (5, 16))
        packed = pack_lanes(values, width)
        assert packed.shape == (5, 16 * width // 8)
        assert np.array_equal(unpack_lanes(packed, width, 16), values)
    assert list(pack_lanes(np.array([[1, -1]]), 4)[0]) == [0xF1]  # value 0 in the low nibble


# -- queues, tokens, counters ------------------------------------------------------------------


def _sim(cfg: VtaConfig = DEFAULT) -> Simulator:
    return Simulator(cfg, Dram.zeros(1 << 16))


def _noop(stage: Stage, **flags: bool) -> MemInsn:
    mem = {Stage.LOAD: MemId.INP, Stage.COMPUTE: MemId.UOP, Stage.STORE: MemId.OUT}[stage]
    return MemInsn(is_store=stage == Stage.STORE, memory_type=mem, sram_base=0, dram_base=0,
                   y_size=0, x_size=0, x_stride=0, **flags)  # fmt: skip


def test_double_buffered_stream_with_tokens() -> None:
    """Two input halves: the load of tile t+1 overlaps the GEMM of tile t; a half is reloaded
    only after the compute stage handed it back."""
    dev = Device(DEFAULT)
    q, rng, tiles, half = dev.queue, np.random.default_rng(11), 6, 8
    x = dev.random(MemId.INP, tiles * half, rng)
    w = dev.random(MemId.WGT, 1, rng)
    inp = dev.upload(MemId.INP, x)
    q.load_2d(MemId.WGT, dev.upload(MemId.WGT, w), 0, x_size=1, y_size=1, x_stride=1, sram_base=0)
    out = dev.output(tiles * half)
    for t in range(tiles):
        if t >= 2:  # wait until compute released this half
            q.dep_pop(Stage.COMPUTE, Stage.LOAD)
        q.load_2d(MemId.INP, inp, t * half, x_size=half, y_size=1, x_stride=half,
                  sram_base=(t % 2) * half)  # fmt: skip
        q.dep_push(Stage.LOAD, Stage.COMPUTE)
    for t in range(tiles):
        q.dep_pop(Stage.LOAD, Stage.COMPUTE)
        if t >= 2:
            q.dep_pop(Stage.STORE, Stage.COMPUTE)
        acc = (t % 2) * half
        q.gemm(kernel([(acc + i, 0, 0) for i in range(half)]), reset=True)
        q.gemm(kernel([(acc + i, (t % 2) * half + i, 0) for i in range(half)]))
        q.alu(kernel([(acc + i, 0, 0) for i in range(half)]), AluOp.SHR, 10)
        q.dep_push(Stage.COMPUTE, Stage.LOAD)
        q.dep_push(Stage.COMPUTE, Stage.STORE)
        q.dep_pop(Stage.COMPUTE, Stage.STORE)
        q.store_2d(out, t * half, x_size=half, y_size=1, x_stride=half, sram_base=acc)
        q.dep_push(Stage.STORE, Stage.COMPUTE)
    q.synchronize()
    expected = (x[:, 0, :] @ w[0].T) >> 10
    assert np.array_equal(dev.download(out, tiles * half)[:, 0, :], wrap8(expected))


def wrap8(values: NDArray[np.int64]) -> NDArray[np.int64]:
    return ((values + 128) % 256) - 128


def test_deadlock_raises_with_a_snapshot() -> None:
    sim = _sim()
    program = [
        _noop(Stage.LOAD, pop_next=True, push_next=True),  # waits for compute
        _noop(Stage.COMPUTE, pop_prev=True),  # waits for load
        FinishInsn(),
    ]
    with pytest.raises(DeadlockError) as err:
        sim.run(isa.encode_program(program, DEFAULT))
    assert str(err.value) == (
        "deadlock: no queue can proceed: load instruction 0 waits for a compute->load token; "
        "compute instruction 1 waits for a load->compute token (tokens: {'load->compute': 0, "
        "'compute->load': 0, 'compute->store': 0, 'store->compute': 0})"
    )
    heads = err.value.snapshot["heads"]
    assert isinstance(heads, dict)
    assert heads["compute"]["index"] == 1 and heads["compute"]["queued"] == 2
    assert heads["load"]["insn"].startswith("LOAD INP")


def test_finish_must_come_last_and_exist() -> None:
    sim = _sim()
    with pytest.raises(SimulationError, match="no FINISH"):
        sim.run([_noop(Stage.LOAD)])
    with pytest.raises(SimulationError, match=r"FINISH ran while instructions were still queued"):
        sim.run([FinishInsn(), _noop(Stage.STORE)])
    with pytest.raises(SimulationError, match="sets push_prev, which the load stage does not have"):
        sim.run([_noop(Stage.LOAD, push_prev=True), FinishInsn()])


def test_counters_follow_the_original_definitions() -> None:
    dev = Device(DEFAULT)
    q, rng = dev.queue, np.random.default_rng(2)
    q.load_2d(MemId.INP, dev.upload(MemId.INP, dev.random(MemId.INP, 6, rng)), 0, x_size=3,
              y_size=2, x_stride=3, sram_base=0, pad=(1, 1, 1, 1))  # fmt: skip
    q.load_2d(MemId.WGT, dev.upload(MemId.WGT, dev.random(MemId.WGT, 2, rng)), 0, x_size=2,
              y_size=1, x_stride=2, sram_base=0)  # fmt: skip
    q.load_2d(MemId.ACC, dev.upload(MemId.ACC, dev.random(MemId.ACC, 4, rng)), 0, x_size=4,
              y_size=1, x_stride=4, sram_base=0)  # fmt: skip
    q.dep_push(Stage.LOAD, Stage.COMPUTE)
    q.dep_pop(Stage.LOAD, Stage.COMPUTE)
    q.gemm(kernel([(0, 0, 0), (1, 1, 1)], Loop(2, 2, 2), Loop(3, 0, 0)))  # 12 issues
    q.gemm(kernel([(0, 0, 0)]), reset=True)  # resets are not counted
    q.alu(kernel([(0, 0, 0)], Loop(5, 0, 0)), AluOp.ADD, 1)  # 5 issues
    q.store_2d(dev.output(4), 0, x_size=2, y_size=2, x_stride=2, sram_base=0)
    q.synchronize()
    assert dev.sim.counters.as_dict() == {
        "inp_load_nbytes": 6 * 16,  # padding is not transferred
        "wgt_load_nbytes": 2 * 256,
        "acc_load_nbytes": 4 * 64,
        "uop_load_nbytes": 4 * 4,  # three kernels, four micro-ops
        "out_store_nbytes": 4 * 16,
        "gemm_counter": 12,
        "alu_counter": 5,
    }


def test_bad_indices_and_addresses_are_errors() -> None:
    sim = _sim()
    gemm = GemmInsn(uop_bgn=0, uop_end=1, iter_out=1, iter_in=3000, dst_factor_out=0,
                    dst_factor_in=1, src_factor_out=0, src_factor_in=0)  # fmt: skip
    with pytest.raises(SimulationError) as err:
        sim.run([gemm, FinishInsn()])
    assert str(err.value) == (
        "instruction 0 (GEMM): accumulator index 2999 is outside the 2048-entry buffer"
    )
    load = MemInsn(memory_type=MemId.ACC, sram_base=0, dram_base=1023, y_size=1, x_size=2,
                   x_stride=2)  # fmt: skip
    with pytest.raises(SimulationError, match=r"LOAD touches DRAM bytes \[0xffc0, 0x10040\)"):
        sim.run([load, FinishInsn()])
    alu = AluInsn(alu_opcode=AluOp.ADD, uop_bgn=8190, uop_end=8200, iter_out=1, iter_in=1,
                  dst_factor_out=0, dst_factor_in=0, src_factor_out=0, src_factor_in=0)  # fmt: skip
    with pytest.raises(SimulationError, match="run past the 8192-entry micro-op buffer"):
        sim.run([alu, FinishInsn()])


def test_sram_persists_across_runs() -> None:
    dev = Device(DEFAULT)
    values = dev.random(MemId.ACC, 2, np.random.default_rng(4))
    dev.queue.load_2d(MemId.ACC, dev.upload(MemId.ACC, values), 0, x_size=2, y_size=1,
                      x_stride=2, sram_base=0)  # fmt: skip
    dev.queue.synchronize()
    out = dev.output(2)
    dev.queue.store_2d(out, 0, x_size=2, y_size=1, x_stride=2, sram_base=0)
    dev.queue.synchronize()
    assert np.array_equal(dev.download(out, 2), wrap8(values))


# -- against the scalar reference -----------------------------------------------------------------

RANDOM_PROGRAMS = 1200


def test_random_programs_match_the_scalar_reference() -> None:
    configs = list(CONFIGS.values())
    for seed in range(RANDOM_PROGRAMS):
        rng = random.Random(seed)
        cfg = configs[seed % len(configs)]
        image = vta_random.dram_image(cfg, rng)
        program = vta_random.program(cfg, rng, rng.randint(1, 60))
        reference = Reference(cfg, bytearray(image))
        expected_counters = reference.run(program)
        sim = Simulator(cfg, Dram(np.frombuffer(bytes(image), np.uint8).copy()))
        counters = sim.run(isa.encode_program(program, cfg))
        context = f"seed {seed}, design {cfg.bitstream_id}"
        assert counters.as_dict() == expected_counters, context
        assert sim.dram.data.tobytes() == bytes(reference.dram), context
        assert np.array_equal(sim.acc.reshape(len(sim.acc), -1), np.array(reference.acc)), context
        assert np.array_equal(sim.inp.reshape(len(sim.inp), -1), np.array(reference.inp)), context
