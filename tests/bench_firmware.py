"""Firmware figures: ``python -m tests.bench_firmware`` (from the repo root, after
``make -C firmware host``).

1. Core throughput: the same lowered layers run on the Python simulator (HLS mode) and on the
   firmware's C core (host build over a pseudo-terminal, line unthrottled): the time of one run
   of the resident program (for the firmware, one RUN request and its reply), medians of
   repeated runs in one process.
2. Serial-link overhead at 921600 baud (the host build paces both directions as that UART
   would): a copy in, a one-instruction run and a copy out of N bytes, against the time the
   payload alone needs on the wire (10 bits a byte each way).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.bench_vta import median_s
from tests.support.firmware import FIRMWARE, FirmwareProcess
from vta import isa
from vta.config import VtaConfig
from vta.drivers.base import DeviceBuffer
from vta.drivers.serial import SerialDriver
from vta.drivers.sim import SimDriver
from vta.engine import LayerRunner
from vta.isa import FinishInsn
from vta.lower import ConvSpec, blocks, lower
from vta.runtime import CLEAR_DONE

CFG = VtaConfig()
BAUD = 921600
LAYERS = {
    "conv3x3 64->64 56x56": ConvSpec(64, 64, 56, 56, (3, 3), (1, 1), (1, 1, 1, 1), shift=8),
    "conv3x3 256->256 14x14": ConvSpec(256, 256, 14, 14, (3, 3), (1, 1), (1, 1, 1, 1), shift=9),
    "dense 512->1000": ConvSpec(512, 1000, 1, 1, shift=9),
}
PAYLOADS = (256, 1024, 4096, 16384, 65536)


def layer_seconds(driver: SimDriver | SerialDriver, spec: ConvSpec, repeats: int) -> float:
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (spec.out_channels, spec.in_channels, *spec.kernel), np.int8)
    bias = rng.integers(-3000, 3000, spec.out_channels, dtype=np.int32)
    runner = LayerRunner(driver, lower(spec, w, bias, CFG))
    x = rng.integers(-127, 128, (blocks(spec.in_channels, CFG), spec.height, spec.width, 16))
    out = np.zeros((blocks(spec.out_channels, CFG), spec.out_height, spec.out_width, 16), np.int8)
    runner.run([x.astype(np.int8)], out)  # warm-up (the simulator plans each instruction once)
    program, count = runner.program, len(runner.layer.insns)
    assert program is not None
    seconds = median_s(lambda: driver.run(program, count, 60.0), repeats)
    runner.close()
    return seconds


def main() -> None:
    binary = FIRMWARE / "build" / "host" / "vta-coprocessor"
    if not binary.exists():
        raise SystemExit(f"{binary} is missing: run `make -C firmware host` first")
    print("## Core throughput (the same resident layer program, one run)\n")
    print("| layer | GOP | Python simulator ms | firmware C core ms | firmware / simulator time |")
    print("|---|---|---|---|---|")
    with FirmwareProcess(Path(binary), dram_bytes=64 << 20) as device:
        serial = SerialDriver(device.port)
        sim = SimDriver(CFG, hls=True)
        for name, spec in LAYERS.items():
            gop = 2 * spec.macs / 1e9
            t_sim = layer_seconds(sim, spec, 5)
            t_fw = layer_seconds(serial, spec, 3)
            print(f"| {name} | {gop:.3f} | {t_sim * 1e3:.1f} | {t_fw * 1e3:.1f} | "
                  f"{t_fw / t_sim:.2f}x |")  # fmt: skip
        serial.close()
    print(f"\n## Serial link at {BAUD} baud (copy in + 1-instruction run + copy out)\n")
    print("| payload bytes | measured ms | payload on the wire ms | overhead |")
    print("|---|---|---|---|")
    stream = isa.encode_program([CLEAR_DONE, FinishInsn()], CFG)
    with FirmwareProcess(Path(binary), dram_bytes=1 << 20, baud=BAUD) as device:
        driver = SerialDriver(device.port, baudrate=BAUD)
        program = driver.alloc(len(stream), 16)
        driver.copy_in(program, stream)
        for size in (0, *PAYLOADS):
            data = np.random.default_rng(size).integers(0, 256, max(size, 1), np.uint8)
            buffer = driver.alloc(data.size, 16)

            def round_trip(
                size: int = size, buffer: DeviceBuffer = buffer, data: np.ndarray = data
            ) -> None:
                if size:
                    driver.copy_in(buffer, data)
                driver.run(program, 2, timeout_s=10)
                if size:
                    driver.copy_out(buffer, size)

            measured = median_s(round_trip, 5)
            wire = 2 * size * 10 / BAUD
            ratio = f"{measured / wire:.2f}x" if size else "(per program)"
            print(f"| {size} | {measured * 1e3:.2f} | {wire * 1e3:.2f} | {ratio} |")
            driver.free(buffer)
        driver.close()


if __name__ == "__main__":
    main()
