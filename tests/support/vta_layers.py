"""A numpy integer reference for the layers ``vta.lower`` compiles, and a way to run them
(with the activation layouts of VTA-ISA.md section 5, which the compiled model does in Relax).

The reference does the arithmetic the layer means, straight: im2col and an exact float64
product (every partial sum is an integer far below 2**53), the residual times ``2**k``, the
bias with the rounding constant, an arithmetic shift and the clip.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from vta.config import VtaConfig
from vta.drivers.base import Driver
from vta.drivers.sim import SimDriver
from vta.engine import LayerRunner
from vta.lower import (
    ConvSpec,
    LoweredLayer,
    blocks,
    requantize_bias,
)


def reference(
    spec: ConvSpec,
    x: NDArray[np.int8],
    w: NDArray[np.int8],
    bias: NDArray[np.int32] | None,
    residual: NDArray[np.int8] | None = None,
) -> NDArray[np.int8]:
    """(C, H, W) int8 in, (O, OH, OW) int8 out."""
    kh, kw = spec.kernel
    sh, sw = spec.stride
    top, left, bottom, right = spec.padding
    oh, ow = spec.out_height, spec.out_width
    padded = np.pad(x.astype(np.float64), ((0, 0), (top, bottom), (left, right)))
    cols = np.stack(
        [
            padded[:, y : y + (oh - 1) * sh + 1 : sh, z : z + (ow - 1) * sw + 1 : sw]
            for y in range(kh)
            for z in range(kw)
        ],
        axis=1,
    )  # (C, KH*KW, OH, OW)
    acc = (w.astype(np.float64).reshape(spec.out_channels, -1) @ cols.reshape(-1, oh * ow)).astype(
        np.int64
    )
    acc = acc.reshape(spec.out_channels, oh, ow)
    acc += requantize_bias(bias, spec, VtaConfig())[: spec.out_channels, None, None]
    shift = spec.shift
    if residual is not None:
        assert spec.residual_shift is not None
        acc = shift_right(acc, spec.pre_shift)
        acc += residual.astype(np.int64) << spec.residual_shift
        shift -= spec.pre_shift
        if spec.pre_shift and shift > 0:
            acc += 1 << (shift - 1)
    return np.clip(shift_right(acc, shift), *spec.clip).astype(np.int8)


def shift_right(acc: NDArray[np.int64], shift: int) -> NDArray[np.int64]:
    """Arithmetic shift; a negative amount shifts left."""
    return acc >> shift if shift >= 0 else acc << -shift


def run_on_simulator(
    layer: LoweredLayer,
    x: NDArray[np.int8],
    residual: NDArray[np.int8] | None = None,
    cfg: VtaConfig | None = None,
) -> tuple[NDArray[np.int8], SimDriver]:
    """Upload the layer to a fresh HLS-mode simulator, run it once, unpack the output."""
    driver = SimDriver(cfg or VtaConfig(), hls=True)
    return run_on(driver, layer, x, residual), driver


def run_on(
    driver: Driver,
    layer: LoweredLayer,
    x: NDArray[np.int8],
    residual: NDArray[np.int8] | None = None,
) -> NDArray[np.int8]:
    """Upload the layer to ``driver``'s device, run it once, unpack the output."""
    cfg, spec = driver.config, layer.spec
    runner = LayerRunner(driver, layer)
    inputs = [pack_activation(x, cfg)]
    if residual is not None:
        inputs.append(pack_activation(residual, cfg))
    out = np.zeros(
        (blocks(spec.out_channels, cfg), spec.out_height, spec.out_width, cfg.block), np.int8
    )
    runner.run(inputs, out)
    runner.close()
    return unpack_activation(out, spec.out_channels)


def pack_activation(x: NDArray[np.int8], cfg: VtaConfig) -> NDArray[np.int8]:
    """(C, H, W) → (C/B, H, W, B), channels zero-padded to the block."""
    c, h, w = x.shape
    b = cfg.block
    padded = np.zeros((blocks(c, cfg) * b, h, w), np.int8)
    padded[:c] = x
    return padded.reshape(-1, b, h, w).transpose(0, 2, 3, 1).copy()


def unpack_activation(y: NDArray[np.int8], channels: int) -> NDArray[np.int8]:
    """(C/B, H, W, B) → (C, H, W), the padding channels dropped."""
    cb, h, w, b = y.shape
    return y.transpose(0, 3, 1, 2).reshape(cb * b, h, w)[:channels]
