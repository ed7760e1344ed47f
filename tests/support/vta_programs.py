"""VTA micro-programs for tests and benchmarks, built with the command-queue runtime.

``Conv3x3`` lowers a stride-1, pad-1 3x3 int8 convolution (batch 1) the way the original VTA flow
did: input tiles of whole rows with DMA padding, all weights resident, one GEMM whose micro-ops
walk (kernel row, kernel column, output row, output column) inside loops over output and input
channel blocks, then the requantize epilogue on the ALU and a narrowing store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from vta.config import VtaConfig
from vta.drivers.base import DeviceBuffer
from vta.isa import AluOp, MemId, Stage, Uop
from vta.runtime import CommandQueue, Loop, UopKernel


@dataclass(frozen=True)
class Conv3x3:
    cfg: VtaConfig
    height: int
    width: int
    in_channels: int
    out_channels: int
    shift: int = 8
    relu: bool = False

    @property
    def icb(self) -> int:
        return self.in_channels // self.cfg.block

    @property
    def ocb(self) -> int:
        return self.out_channels // self.cfg.block

    def tile_rows(self) -> int:
        """The most output rows whose inputs and accumulators fit the SRAM buffers."""
        cfg = self.cfg
        rows = self.height
        while rows > 1 and (
            self.icb * (rows + 2) * (self.width + 2) > cfg.inp_depth
            or self.ocb * rows * self.width > cfg.acc_depth
        ):
            rows -= 1
        return rows

    # -- data layouts (VTA-ISA.md section 5, batch 1) ------------------------------------------

    def pack_input(self, x: NDArray[np.int8]) -> NDArray[np.int8]:
        """(C, H, W) → (C/B, H, W, B)."""
        b = self.cfg.block
        return x.reshape(self.icb, b, self.height, self.width).transpose(0, 2, 3, 1).copy()

    def pack_weights(self, w: NDArray[np.int8]) -> NDArray[np.int8]:
        """(O, I, 3, 3) → (O/B, I/B, 3, 3, B, B)."""
        b = self.cfg.block
        return w.reshape(self.ocb, b, self.icb, b, 3, 3).transpose(0, 2, 4, 5, 1, 3).copy()

    def unpack_output(self, y: NDArray[np.int8]) -> NDArray[np.int8]:
        """(O/B, H, W, B) → (O, H, W)."""
        return y.transpose(0, 3, 1, 2).reshape(self.out_channels, self.height, self.width)

    def reference(self, x: NDArray[np.int8], w: NDArray[np.int8]) -> NDArray[np.int8]:
        """The same arithmetic straight in numpy (im2col + BLAS), requantized."""
        padded = np.pad(x.astype(np.float32), ((0, 0), (1, 1), (1, 1)))
        cols = np.stack(
            [
                padded[:, kh : kh + self.height, kw : kw + self.width]
                for kh in range(3)
                for kw in range(3)
            ],
            axis=1,
        )  # (C, 9, H, W)
        acc = w.astype(np.float32).reshape(self.out_channels, -1) @ cols.reshape(
            -1, self.height * self.width
        )
        return self.requantize(acc.astype(np.int64)).reshape(
            self.out_channels, self.height, self.width
        )

    def requantize(self, acc: NDArray[np.int64]) -> NDArray[np.int8]:
        shifted = (acc + (1 << (self.shift - 1))) >> self.shift
        return np.clip(shifted, 0 if self.relu else -127, 127).astype(np.int8)

    # -- the instruction stream ------------------------------------------------------------------

    def emit(
        self,
        queue: CommandQueue,
        inp: DeviceBuffer,
        wgt: DeviceBuffer,
        out: DeviceBuffer,
    ) -> None:
        """Append the whole layer to ``queue`` (buffers from ``queue.alloc``)."""
        width, rows = self.width, self.tile_rows()
        row_entries = (rows + 2) * (width + 2)  # one input channel block of a tile
        queue.load_2d(
            MemId.WGT, wgt, 0, x_size=self.ocb * self.icb * 9, y_size=1,
            x_stride=self.ocb * self.icb * 9, sram_base=0,
        )  # fmt: skip
        first = True
        for y0 in range(0, self.height, rows):
            th = min(rows, self.height - y0)
            top = 1 if y0 == 0 else 0
            bottom = 1 if y0 + th == self.height else 0
            if not first:
                queue.dep_pop(Stage.COMPUTE, Stage.LOAD)
            for c in range(self.icb):
                queue.load_2d(
                    MemId.INP,
                    inp,
                    (c * self.height + y0 - 1 + top) * width,
                    x_size=width,
                    y_size=th + 2 - top - bottom,
                    x_stride=width,
                    sram_base=c * row_entries,
                    pad=(top, bottom, 1, 1),
                )
            queue.dep_push(Stage.LOAD, Stage.COMPUTE)
            queue.dep_pop(Stage.LOAD, Stage.COMPUTE)
            if not first:
                queue.dep_pop(Stage.STORE, Stage.COMPUTE)
            tile = th * width
            outputs = tuple(Uop(i, 0, 0) for i in range(tile))
            per_block = Loop(self.ocb, dst_factor=tile, src_factor=0)
            queue.gemm(UopKernel(outputs, (per_block,)), reset=True)
            uops = tuple(
                Uop(ty * width + x, (ty + kh) * (width + 2) + x + kw, kh * 3 + kw)
                for kh in range(3)
                for kw in range(3)
                for ty in range(th)
                for x in range(width)
            )
            loops = (
                Loop(self.ocb, dst_factor=tile, src_factor=0, wgt_factor=self.icb * 9),
                Loop(self.icb, dst_factor=0, src_factor=row_entries, wgt_factor=9),
            )
            queue.gemm(UopKernel(uops, loops))
            epilogue = UopKernel(outputs, (per_block,))
            queue.alu(epilogue, AluOp.ADD, 1 << (self.shift - 1))
            queue.alu(epilogue, AluOp.SHR, self.shift)
            queue.alu(epilogue, AluOp.MIN, 127)
            queue.alu(epilogue, AluOp.MAX, 0 if self.relu else -127)
            queue.dep_push(Stage.COMPUTE, Stage.LOAD)
            queue.dep_push(Stage.COMPUTE, Stage.STORE)
            queue.dep_pop(Stage.COMPUTE, Stage.STORE)
            for o in range(self.ocb):
                queue.store_2d(
                    out,
                    (o * self.height + y0) * width,
                    x_size=width,
                    y_size=th,
                    x_stride=width,
                    sram_base=o * tile,
                )
            queue.dep_push(Stage.STORE, Stage.COMPUTE)
            first = False
