"""A simulated VTA device for tests: a sim driver, its command queue, and numpy-side packing."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from vta.config import VtaConfig
from vta.drivers.base import DeviceBuffer
from vta.drivers.sim import SimDriver
from vta.isa import MemId
from vta.runtime import CommandQueue
from vta.sim import pack_lanes, unpack_lanes


class Device:
    def __init__(self, cfg: VtaConfig, *, hls: bool = False) -> None:
        self.cfg = cfg
        self.driver = SimDriver(cfg, dram_bytes=16 << 20, hls=hls)
        self.queue = CommandQueue(self.driver)
        self.sim = self.driver.simulator

    def width(self, mem: MemId) -> int:
        cfg = self.cfg
        return {MemId.INP: cfg.inp_width, MemId.WGT: cfg.wgt_width, MemId.OUT: cfg.out_width}.get(
            mem, 32
        )

    def upload(self, mem: MemId, values: NDArray[np.integer]) -> DeviceBuffer:
        """Elements (n, *lanes) of ``mem`` packed as the device stores them."""
        flat = values.reshape(values.shape[0], -1)
        raw = (
            flat.astype("<i4").view(np.uint8)
            if mem == MemId.ACC
            else pack_lanes(flat, self.width(mem))
        )
        buffer = self.queue.alloc(raw.size, mem)
        self.driver.copy_in(buffer, raw)
        return buffer

    def output(self, count: int) -> DeviceBuffer:
        return self.queue.alloc(count * self.cfg.elem_bytes(MemId.OUT), MemId.OUT)

    def download(self, buffer: DeviceBuffer, count: int) -> NDArray[np.int8]:
        """``count`` output elements as (count, batch, block) signed values."""
        eb = self.cfg.elem_bytes(MemId.OUT)
        raw = np.frombuffer(self.driver.copy_out(buffer, count * eb), np.uint8).reshape(count, eb)
        lanes = self.cfg.batch * self.cfg.block
        return unpack_lanes(raw, self.cfg.out_width, lanes).reshape(count, self.cfg.batch, -1)

    def random(self, mem: MemId, count: int, rng: np.random.Generator) -> NDArray[np.int64]:
        """Random values that fit ``mem``'s element type, shaped as the SRAM holds them."""
        cfg = self.cfg
        shape = {
            MemId.INP: (cfg.batch, cfg.block),
            MemId.WGT: (cfg.block, cfg.block),
            MemId.ACC: (cfg.batch, cfg.block),
        }[mem]
        bits = self.width(mem)
        return rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (count, *shape), dtype=np.int64)
