"""Simulator throughput on a GEMM-heavy stream: ``python -m tests.bench_vta`` (from the repo root).

The stream is a ResNet-18 3x3 convolution layer (56x56, 64 -> 64 channels, int8) lowered the way
the original VTA flow did (tests/support/vta_programs.py). Three engines do the same arithmetic:
the simulator, numpy/BLAS directly (im2col + one float32 matrix product: the practical limit of
this machine), and the scalar reference interpreter of the tests (on one tile of the layer, as
the whole layer would take it minutes). Figures are medians of repeated runs in one process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from tests.support.vta_programs import Conv3x3
from tests.support.vta_ref import Reference
from vta import isa
from vta.config import VtaConfig
from vta.drivers.sim import SimDriver
from vta.isa import MemId
from vta.runtime import CommandQueue

REPEATS = 7


def median_s(run: Callable[[], object], repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(conv: Conv3x3, seed: int) -> tuple[SimDriver, bytes, np.ndarray, np.ndarray]:
    """Upload random data, lower the layer; returns the device, the program and the operands."""
    cfg = conv.cfg
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (conv.in_channels, conv.height, conv.width), dtype=np.int8)
    w = rng.integers(-128, 128, (conv.out_channels, conv.in_channels, 3, 3), dtype=np.int8)
    driver = SimDriver(cfg, hls=True)
    queue = CommandQueue(driver)
    inp = queue.alloc(x.nbytes, MemId.INP)
    wgt = queue.alloc(w.nbytes, MemId.WGT)
    out = queue.alloc(conv.out_channels * conv.height * conv.width, MemId.OUT)
    driver.copy_in(inp, conv.pack_input(x))
    driver.copy_in(wgt, conv.pack_weights(w))
    conv.emit(queue, inp, wgt, out)
    insns = queue.synchronize()  # runs once: checks the lowering end to end
    result = np.frombuffer(driver.copy_out(out, out.nbytes), np.int8)
    y = conv.unpack_output(result.reshape(conv.ocb, conv.height, conv.width, cfg.block))
    if not np.array_equal(y, conv.reference(x, w)):
        raise SystemExit("the simulator disagrees with numpy: no figures")
    return driver, isa.encode_program(insns, cfg), x, w


def measure() -> dict[str, float]:
    """The layer's GOP and the seconds of each engine (medians)."""
    cfg = VtaConfig()
    layer = Conv3x3(cfg, 56, 56, 64, 64)
    driver, program, x, w = build(layer, seed=0)
    sim = driver.simulator
    ops = 2 * sim.run(program).gemm_counter * cfg.batch * cfg.block * cfg.block
    # The same layer on a fresh simulator: its first run also works out (and caches) what each
    # instruction computes.
    cold_driver = SimDriver(cfg, hls=True)
    cold_driver.dram.data[:] = driver.dram.data
    cold_s = median_s(lambda: cold_driver.simulator.run(program), 1)
    sim_s = median_s(lambda: sim.run(program))
    blas_s = median_s(lambda: layer.reference(x, w))

    tile = Conv3x3(cfg, layer.tile_rows(), 56, 64, 64)  # one tile of the same layer
    tile_driver, tile_program, _, _ = build(tile, seed=1)
    tile_ops = 2 * tile_driver.simulator.run(tile_program).gemm_counter * cfg.block * cfg.block
    tile_sim_s = median_s(lambda: tile_driver.simulator.run(tile_program))
    reference = Reference(cfg, bytearray(tile_driver.dram.data[: 1 << 20].tobytes()))
    insns = isa.decode_program(tile_program, cfg)
    start = time.perf_counter()
    reference.run(insns)
    ref_s = time.perf_counter() - start

    return {
        "gop": ops / 1e9,
        "instructions": len(program) // 16,
        "blas_s": blas_s,
        "cold_s": cold_s,
        "sim_s": sim_s,
        "tile_rows": layer.tile_rows(),
        "tile_gop": tile_ops / 1e9,
        "tile_sim_s": tile_sim_s,
        "ref_s": ref_s,
    }


def main() -> None:
    m = measure()
    ops, blas_s, cold_s, sim_s = m["gop"] * 1e9, m["blas_s"], m["cold_s"], m["sim_s"]
    tile_ops, tile_sim_s, ref_s = m["tile_gop"] * 1e9, m["tile_sim_s"], m["ref_s"]
    print(f"layer 56x56x64->64 3x3 int8: {m['gop']:.3f} GOP, {m['instructions']} instructions")
    print(f"{'engine':<42}{'time':>12}{'GOP/s':>10}")
    rows = [
        ("numpy/BLAS im2col (the limit)", blas_s, ops),
        ("simulator, first run (plans the stream)", cold_s, ops),
        ("simulator, steady state", sim_s, ops),
        (f"one tile ({m['tile_rows']} rows): simulator", tile_sim_s, tile_ops),
        ("one tile: scalar reference interpreter", ref_s, tile_ops),
    ]
    for name, seconds, count in rows:
        print(f"{name:<42}{seconds * 1e3:>10.1f}ms{count / seconds / 1e9:>10.3f}")
    ratio, first = sim_s / blas_s, cold_s / blas_s
    print(f"simulator / BLAS time: {ratio:.2f}x (goal <= 3x); first run {first:.2f}x")
    print(f"simulator speed-up over the scalar reference: {ref_s / tile_sim_s:.0f}x (goal >= 20x)")


if __name__ == "__main__":
    main()
