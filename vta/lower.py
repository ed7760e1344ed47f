"""Lowering of int8 layers to VTA programs, ahead of time, on the build host.

A layer is a 2-D convolution of a batch-1 int8 activation with int8 weights (a dense layer is a
1x1 convolution of a 1x1 image), followed by the epilogue VTA runs on its ALU: bias add with the
rounding constant folded in, an arithmetic shift (the power-of-two requantization), and a clip
(MIN then MAX) that is also the ReLU. A residual input may be added to the accumulators first:
it is loaded like an activation and multiplied by ``2**residual_shift`` on the identity matrix in
the GEMM core, so the whole block stays on the accelerator. When the residual's scale is much
coarser than the accumulator's, the accumulators are first shifted part of the way
(``pre_shift``, rounded), the residual added at that scale, and the rest of the shift follows.

Layouts are those of VTA-ISA.md section 5 with channels zero-padded to the block. The program
works in one DRAM *arena*: the input, the residual and the output first, then the constants
(packed weights, biases, the identity block, and the micro-ops last). Its DRAM addresses are
arena offsets, so the device adds the arena's physical address once when it loads the layer
(``relocate``).

Tiling keeps every buffer in its SRAM with room for two tiles: steps alternate between two
halves of the input and weight buffers and output tiles between two halves of the accumulators,
with dependency tokens so that loads of the next step overlap the compute of this one and
stores of a tile overlap the compute of the next. Everything emitted runs on the FPGA design
(the simulator's HLS mode passes): no MUL, no 8-bit accumulator loads, shifts within -16..15,
and at least three issues between two GEMM writes of one accumulator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from vta import isa
from vta.config import VtaConfig
from vta.drivers.base import DeviceBuffer
from vta.errors import VtaError
from vta.isa import AluOp, Insn, MemId, MemInsn, Stage, Uop
from vta.runtime import Loop, ProgramBuilder, UopKernel

#: Every arena region starts on this boundary (the largest element, a weight block, is 256 B).
REGION_ALIGN = 256
#: Accumulator entries the HLS hazard spacers write (garbage, never stored).
SPACERS = 2
#: GEMM issues between two writes of one accumulator that the FPGA pipeline needs.
HAZARD_DISTANCE = 3
#: The most DMA padding one LOAD can add on a side (a 4-bit field).
MAX_PAD = (1 << isa.PAD_BITS) - 1
#: Shift range the FPGA's ALU honours.
SHIFT_RANGE = (-16, 15)
#: How much one instruction costs against one byte moved, when tilings are compared.
INSN_COST_BYTES = 4096


class LoweringError(VtaError):
    """A layer cannot run on the configured VTA design."""


@dataclass(frozen=True)
class ConvSpec:
    """One int8 layer: shapes, the requantization and the epilogue."""

    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    """(top, left, bottom, right), as Relax and ONNX order them."""
    shift: int = 0
    """Accumulators are divided by ``2**shift`` (rounding half up); negative multiplies."""
    clip: tuple[int, int] = (-127, 127)
    residual_shift: int | None = None
    """When set, a residual int8 input of the output's shape is added as ``r * 2**shift``."""
    pre_shift: int = 0
    """With a residual: the part of ``shift`` done before the residual is added."""

    def __post_init__(self) -> None:
        kh, kw = self.kernel
        if min(self.in_channels, self.out_channels, self.height, self.width, kh, kw) < 1:
            raise LoweringError(f"{self}: every size must be at least 1")
        if min(self.stride) < 1 or min(self.padding) < 0:
            raise LoweringError(f"{self}: strides must be >= 1 and padding >= 0")
        if max(self.padding) > MAX_PAD:
            raise LoweringError(f"padding {self.padding}: DMA pads at most {MAX_PAD} per side")
        if self.out_height < 1 or self.out_width < 1:
            raise LoweringError(f"{self}: the kernel is larger than the padded input")
        lo, hi = self.clip
        if not -128 <= lo <= hi <= 127:
            raise LoweringError(f"clip {self.clip}: must lie within int8 (-128..127)")
        if self.residual_shift is not None and not 0 <= self.residual_shift <= 6:
            raise LoweringError(
                f"residual shift {self.residual_shift}: the identity weight 2**k is int8, so k "
                "must be 0..6; add the residual on the CPU"
            )
        if self.pre_shift and (self.residual_shift is None or not 0 < self.pre_shift <= 31):
            raise LoweringError(f"pre-shift {self.pre_shift}: needs a residual and 1..31")
        if not -31 <= self.shift <= 31:
            raise LoweringError(f"shift {self.shift}: must lie within -31..31")
        if self.pre_shift and self.shift - self.pre_shift > SHIFT_RANGE[1]:
            raise LoweringError(
                f"shift {self.shift} after a pre-shift of {self.pre_shift}: the rest rounds with "
                f"a 16-bit immediate, so it must be at most {SHIFT_RANGE[1]}"
            )

    @property
    def out_height(self) -> int:
        top, _, bottom, _ = self.padding
        return (self.height + top + bottom - self.kernel[0]) // self.stride[0] + 1

    @property
    def out_width(self) -> int:
        _, left, _, right = self.padding
        return (self.width + left + right - self.kernel[1]) // self.stride[1] + 1

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the layer itself (unpadded channels)."""
        kh, kw = self.kernel
        return self.out_channels * self.out_height * self.out_width * self.in_channels * kh * kw

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ConvSpec:
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        return cls(**values)


def blocks(channels: int, cfg: VtaConfig) -> int:
    return -(-channels // cfg.block)


# -- data layouts (VTA-ISA.md section 5, batch 1) ---------------------------------------------


def pack_weights(w: NDArray[np.int8], cfg: VtaConfig) -> NDArray[np.int8]:
    """(O, I, KH, KW) → (O/B, I/B, KH, KW, B, B), both channel counts zero-padded."""
    o, i, kh, kw = w.shape
    b = cfg.block
    padded = np.zeros((blocks(o, cfg) * b, blocks(i, cfg) * b, kh, kw), np.int8)
    padded[:o, :i] = w
    return padded.reshape(-1, b, blocks(i, cfg), b, kh, kw).transpose(0, 2, 4, 5, 1, 3).copy()


# -- tiling -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiling:
    """Output tiles of ``oc_blocks`` x ``rows`` x ``cols``; reduction steps of ``ic_blocks``."""

    oc_blocks: int
    ic_blocks: int
    rows: int
    cols: int

    def in_rows(self, spec: ConvSpec, rows: int) -> int:
        return (rows - 1) * spec.stride[0] + spec.kernel[0]

    def in_cols(self, spec: ConvSpec, cols: int) -> int:
        return (cols - 1) * spec.stride[1] + spec.kernel[1]


@dataclass(frozen=True)
class SramPlan:
    """Where the halves and the fixed entries sit in each SRAM buffer."""

    inp_half: int
    wgt_half: int
    acc_half: int
    identity: int  # weight entry of the 2**k identity block
    bias: int  # first accumulator entry of the per-block biases
    spacer: int  # first of the hazard spacers

    @classmethod
    def of(cls, cfg: VtaConfig, out_blocks: int) -> SramPlan:
        acc_free = cfg.acc_depth - out_blocks - SPACERS
        return cls(
            inp_half=cfg.inp_depth // 2,
            wgt_half=(cfg.wgt_depth - 1) // 2,
            acc_half=acc_free // 2,
            identity=cfg.wgt_depth - 1,
            bias=acc_free,
            spacer=acc_free + out_blocks,
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _balanced(total: int, most: int) -> int:
    """The tile size that splits ``total`` into the fewest, most even tiles of at most ``most``."""
    return -(-total // -(-total // most))


def plan_tiling(spec: ConvSpec, cfg: VtaConfig) -> Tiling:
    """The tiling that fits the SRAM halves and moves the fewest bytes and instructions."""
    icb, ocb = blocks(spec.in_channels, cfg), blocks(spec.out_channels, cfg)
    sram = SramPlan.of(cfg, ocb)
    if sram.acc_half < 1:
        raise LoweringError(f"{ocb} output channel blocks leave no accumulators for tiles")
    kh, kw = spec.kernel
    oh, ow = spec.out_height, spec.out_width
    best: tuple[float, Tiling] | None = None
    col_options = sorted({_balanced(ow, m) for m in range(1, ow + 1)})
    for tocb in _divisors(ocb):
        for ticb in _divisors(icb):
            if tocb * ticb * kh * kw > sram.wgt_half:
                continue
            for cols in col_options:
                rows = _most_rows(spec, Tiling(tocb, ticb, 1, cols), sram, cfg)
                if rows == 0:
                    continue
                tiling = Tiling(tocb, ticb, _balanced(oh, rows), cols)
                cost = _cost(spec, tiling, icb, ocb)
                if best is None or cost < best[0]:
                    best = (cost, tiling)
    if best is None:
        raise LoweringError(
            f"no tiling of {spec} fits design {cfg.bitstream_id}: the kernel "
            f"{kh}x{kw} with one channel block needs more SRAM than half a buffer"
        )
    return best[1]


def _most_rows(spec: ConvSpec, t: Tiling, sram: SramPlan, cfg: VtaConfig) -> int:
    """The most output rows a tile of ``t``'s width and channels can have (0: none fits)."""
    in_cols = t.in_cols(spec, t.cols)
    best = 0
    for rows in range(1, spec.out_height + 1):
        npos = rows * t.cols
        fits = (
            t.ic_blocks * t.in_rows(spec, rows) * in_cols <= sram.inp_half
            and t.oc_blocks * npos <= sram.acc_half
            and (spec.residual_shift is None or t.oc_blocks * npos <= sram.inp_half)
            and _gemm_uop_count(spec, t, npos) <= cfg.uop_depth // 4
        )
        if not fits:
            break
        best = rows
    return best


def _cost(spec: ConvSpec, t: Tiling, icb: int, ocb: int) -> float:
    kh, kw = spec.kernel
    tiles_y, tiles_x = -(-spec.out_height // t.rows), -(-spec.out_width // t.cols)
    spatial = tiles_y * tiles_x
    tiles = (ocb // t.oc_blocks) * spatial
    steps = tiles * (icb // t.ic_blocks)
    inp = (ocb // t.oc_blocks) * spatial * icb * t.in_rows(spec, t.rows) * t.in_cols(spec, t.cols)
    weights_resident = icb == t.ic_blocks
    wgt = ocb * icb * kh * kw * (1 if weights_resident else spatial)
    insns = steps * (t.ic_blocks + 3) + tiles * (t.oc_blocks + 8)
    return inp * 16 + wgt * 256 + insns * INSN_COST_BYTES


# -- micro-op kernels -------------------------------------------------------------------------


def _spaced(groups: Iterator[list[Uop]], sram: SramPlan, src: int, wgt: int) -> list[Uop]:
    """Concatenate groups of GEMM uops that write distinct accumulators, padding each group
    with writes to the spacer entries so that no accumulator is written twice within
    ``HAZARD_DISTANCE`` issues."""
    out: list[Uop] = []
    for group in groups:
        out.extend(group)
        out.extend(Uop(sram.spacer + j, src, wgt) for j in range(HAZARD_DISTANCE - len(group)))
    return out


def _gemm_uop_count(spec: ConvSpec, t: Tiling, npos: int) -> int:
    """How many micro-ops ``_gemm_uops`` makes for a tile of ``npos`` positions."""
    taps = spec.kernel[0] * spec.kernel[1]
    if npos >= HAZARD_DISTANCE:
        return taps * npos
    return taps * max(HAZARD_DISTANCE, npos * t.oc_blocks)


def _gemm_uops(
    spec: ConvSpec, t: Tiling, rows: int, cols: int, acc: int, inp: int, wgt: int, sram: SramPlan
) -> list[Uop]:
    """The convolution's micro-ops for one tile (see ``_gemm_kernel`` for the loops)."""
    kh, kw = spec.kernel
    sh, sw = spec.stride
    in_cols = t.in_cols(spec, cols)
    npos = rows * cols

    def src(p: int, y: int, x: int) -> int:
        return inp + (p // cols * sh + y) * in_cols + p % cols * sw + x

    if npos >= HAZARD_DISTANCE:
        # Positions innermost: consecutive issues write different accumulators.
        return [
            Uop(acc + p, src(p, y, x), wgt + y * kw + x)
            for y in range(kh)
            for x in range(kw)
            for p in range(npos)
        ]
    # Too few positions: output blocks go innermost as well, spaced when still too few.
    per_block = t.ic_blocks * kh * kw
    return _spaced(
        (
            [
                Uop(acc + o * npos + p, src(p, y, x), wgt + o * per_block + y * kw + x)
                for p in range(npos)
                for o in range(t.oc_blocks)
            ]
            for y in range(kh)
            for x in range(kw)
        ),
        sram,
        inp,
        wgt,
    )


def _gemm_kernel(
    spec: ConvSpec, t: Tiling, rows: int, cols: int, acc: int, inp: int, wgt: int, sram: SramPlan
) -> UopKernel:
    kh, kw = spec.kernel
    uops = tuple(_gemm_uops(spec, t, rows, cols, acc, inp, wgt, sram))
    in_block = t.in_rows(spec, rows) * t.in_cols(spec, cols)
    per_ic = Loop(t.ic_blocks, dst_factor=0, src_factor=in_block, wgt_factor=kh * kw)
    if rows * cols >= HAZARD_DISTANCE:
        per_oc = Loop(
            t.oc_blocks, dst_factor=rows * cols, src_factor=0, wgt_factor=t.ic_blocks * kh * kw
        )
        return UopKernel(uops, (per_oc, per_ic))
    return UopKernel(uops, (per_ic,))


def _residual_kernel(t: Tiling, npos: int, acc: int, inp: int, sram: SramPlan) -> UopKernel:
    """acc += residual · (2**k · I): the residual tile sits in the input buffer like the output."""
    if npos >= HAZARD_DISTANCE:
        uops = tuple(Uop(acc + p, inp + p, sram.identity) for p in range(npos))
        return UopKernel(uops, (Loop(t.oc_blocks, dst_factor=npos, src_factor=npos),))
    groups = (
        [Uop(acc + o * npos + p, inp + o * npos + p, sram.identity) for o in range(t.oc_blocks)]
        for p in range(npos)
    )
    return UopKernel(tuple(_spaced(groups, sram, inp, sram.identity)))


def _tile_kernel(t: Tiling, npos: int, acc: int, src: int, src_per_block: int) -> UopKernel:
    """One uop per position of a tile, looped over its output blocks (ALU and GEMM reset)."""
    uops = tuple(Uop(acc + p, src, 0) for p in range(npos))
    return UopKernel(uops, (Loop(t.oc_blocks, dst_factor=npos, src_factor=src_per_block),))


# -- the program ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    offset: int
    nbytes: int


@dataclass(frozen=True)
class LoweredLayer:
    """A layer ready for a device: program, constant image and the arena map."""

    spec: ConvSpec
    tiling: Tiling
    insns: tuple[Insn, ...]
    constants: Region
    """Where ``image`` goes in the arena."""
    image: bytes
    """Weights, biases, the identity block and the micro-ops, uploaded once."""
    arena_bytes: int
    input: Region
    residual: Region | None
    output: Region
    uop_count: int

    def counts(self) -> dict[str, int]:
        """Instructions by opcode, micro-ops, and the bytes each memory type moves."""
        out: dict[str, int] = {"instructions": len(self.insns), "uops": self.uop_count}
        for insn in self.insns:
            out[insn.opcode.name.lower()] = out.get(insn.opcode.name.lower(), 0) + 1
        return out


class _Arena:
    """Lays out regions one after another, each aligned to ``REGION_ALIGN``."""

    def __init__(self) -> None:
        self.top = 0

    def region(self, nbytes: int) -> Region:
        region = Region(self.top, nbytes)
        self.top += -(-nbytes // REGION_ALIGN) * REGION_ALIGN
        return region

    @staticmethod
    def buffer(region: Region) -> DeviceBuffer:
        return DeviceBuffer(region.offset, region.nbytes)


def requantize_bias(
    bias: NDArray[np.integer] | None, spec: ConvSpec, cfg: VtaConfig
) -> NDArray[np.int32]:
    """Per-channel accumulator offsets: the bias plus the rounding constant of the first shift."""
    out = np.zeros(blocks(spec.out_channels, cfg) * cfg.block, np.int64)
    if bias is not None:
        out[: spec.out_channels] = bias
    first = spec.pre_shift if spec.pre_shift else spec.shift
    if first > 0:
        out += 1 << (first - 1)
    if np.abs(out).max(initial=0) >= 1 << 31:
        raise LoweringError("a bias does not fit the 32-bit accumulators")
    return out.astype(np.int32)


def lower(
    spec: ConvSpec,
    weights: NDArray[np.int8],
    bias: NDArray[np.integer] | None,
    cfg: VtaConfig,
    tiling: Tiling | None = None,
) -> LoweredLayer:
    """The program that computes ``spec`` with these weights (O, I, KH, KW) and bias (O,)."""
    kh, kw = spec.kernel
    if weights.shape != (spec.out_channels, spec.in_channels, kh, kw):
        raise LoweringError(
            f"weights of shape {weights.shape} do not match {spec.out_channels}x"
            f"{spec.in_channels}x{kh}x{kw}"
        )
    t = tiling or plan_tiling(spec, cfg)
    icb, ocb = blocks(spec.in_channels, cfg), blocks(spec.out_channels, cfg)
    if ocb % t.oc_blocks or icb % t.ic_blocks:
        raise LoweringError(
            f"{t}: tiles of channel blocks must divide the {ocb} output and {icb} input blocks"
        )
    sram = SramPlan.of(cfg, ocb)
    b = cfg.block
    oh, ow, h, w = spec.out_height, spec.out_width, spec.height, spec.width

    packed_w = pack_weights(weights, cfg)
    identity = np.zeros((b, b), np.int8)
    if spec.residual_shift is not None:
        np.fill_diagonal(identity, 1 << spec.residual_shift)
    biases = requantize_bias(bias, spec, cfg)
    # Activations first, constants after them, micro-ops last: their count is known only once
    # the stream is emitted, and nothing else depends on where they lie.
    arena = _Arena()
    regions = {"inp": arena.region(icb * h * w * b)}
    if spec.residual_shift is not None:
        regions["res"] = arena.region(ocb * oh * ow * b)
    regions["out"] = arena.region(ocb * oh * ow * b)
    constants = {
        "wgt": packed_w.reshape(-1).view(np.uint8),
        "bias": biases.view(np.uint8),
        "identity": identity.reshape(-1).view(np.uint8),
    }
    for name, data in constants.items():
        regions[name] = arena.region(data.size)
    builder = ProgramBuilder(cfg)
    _Emitter(builder, spec, t, sram, {k: arena.buffer(r) for k, r in regions.items()}).emit()
    uops = builder.uops
    regions["uop"] = arena.region(len(uops) * isa.UOP_BYTES)
    insns = builder.build(uop_base=regions["uop"].offset // isa.UOP_BYTES)
    constants["uop"] = np.frombuffer(isa.encode_uops(uops, cfg), np.uint8)
    start = regions["wgt"].offset
    image = np.zeros(arena.top - start, np.uint8)
    for name, data in constants.items():
        offset = regions[name].offset - start
        image[offset : offset + data.size] = data
    return LoweredLayer(
        spec=spec,
        tiling=t,
        insns=tuple(insns),
        constants=Region(start, image.size),
        image=image.tobytes(),
        arena_bytes=arena.top,
        input=regions["inp"],
        residual=regions.get("res"),
        output=regions["out"],
        uop_count=len(uops),
    )


class _Emitter:
    """Walks the tiles of one layer and emits its instruction stream (see the module doc)."""

    def __init__(
        self,
        builder: ProgramBuilder,
        spec: ConvSpec,
        t: Tiling,
        sram: SramPlan,
        buffers: dict[str, DeviceBuffer],
    ) -> None:
        self.q, self.spec, self.t, self.sram, self.buffers = builder, spec, t, sram, buffers
        self.icb = blocks(spec.in_channels, builder.config)
        self.ocb = blocks(spec.out_channels, builder.config)
        self.tiles = [
            (oc0, y0, x0)
            for oc0 in range(0, self.ocb, t.oc_blocks)
            for y0 in range(0, spec.out_height, t.rows)
            for x0 in range(0, spec.out_width, t.cols)
        ]
        # The last two steps and tiles hand no buffer half back: nobody waits for it.
        steps_per_tile = self.icb // t.ic_blocks + (spec.residual_shift is not None)
        self.total_steps = len(self.tiles) * steps_per_tile

    def emit(self) -> None:
        q, spec, t, sram, buffers = self.q, self.spec, self.t, self.sram, self.buffers
        kh, kw = spec.kernel
        oh, ow = spec.out_height, spec.out_width
        residual = spec.residual_shift is not None
        # Constants: biases into the accumulators (compute queue), identity into the weights.
        q.load_2d(MemId.ACC, buffers["bias"], 0, x_size=self.ocb, y_size=1, x_stride=self.ocb,
                  sram_base=sram.bias)  # fmt: skip
        if residual:
            q.load_2d(MemId.WGT, buffers["identity"], 0, x_size=1, y_size=1, x_stride=1,
                      sram_base=sram.identity)  # fmt: skip
        step = 0
        weights_in_half: list[tuple[int, int] | None] = [None, None]
        for u, (oc0, y0, x0) in enumerate(self.tiles):
            rows, cols = min(t.rows, oh - y0), min(t.cols, ow - x0)
            npos = rows * cols
            acc = (u % 2) * sram.acc_half
            if u >= 2:
                q.dep_pop(Stage.STORE, Stage.COMPUTE)
            q.gemm(_tile_kernel(t, npos, acc, 0, 0), reset=True)
            for ic0 in range(0, self.icb, t.ic_blocks):
                half = step % 2
                inp, wgt = half * sram.inp_half, half * sram.wgt_half
                if step >= 2:
                    q.dep_pop(Stage.COMPUTE, Stage.LOAD)
                self._load_input(buffers["inp"], ic0, y0, x0, rows, cols, inp)
                if weights_in_half[half] != (oc0, ic0):
                    per_oc = self.icb * kh * kw
                    q.load_2d(
                        MemId.WGT, buffers["wgt"], oc0 * per_oc + ic0 * kh * kw,
                        x_size=t.ic_blocks * kh * kw, y_size=t.oc_blocks, x_stride=per_oc,
                        sram_base=wgt,
                    )  # fmt: skip
                    weights_in_half[half] = (oc0, ic0)
                self._compute(q.gemm, _gemm_kernel(spec, t, rows, cols, acc, inp, wgt, sram), step)
                step += 1
            if residual:
                self._requantize(acc, npos, oc0, spec.pre_shift)
                half = step % 2
                inp = half * sram.inp_half
                if step >= 2:
                    q.dep_pop(Stage.COMPUTE, Stage.LOAD)
                for offset, sram_base, x, y, stride in self._blocks(oc0, y0, x0, rows, cols, inp):
                    q.load_2d(
                        MemId.INP, buffers["res"], offset,
                        x_size=x, y_size=y, x_stride=stride, sram_base=sram_base,
                    )  # fmt: skip
                self._compute(q.gemm, _residual_kernel(t, npos, acc, inp, sram), step)
                step += 1
            if residual:
                rest = spec.shift - spec.pre_shift
                if spec.pre_shift and rest > 0:
                    q.alu(_tile_kernel(t, npos, acc, acc, 0), AluOp.ADD, 1 << (rest - 1))
                self._requantize(acc, npos, None, rest)
            else:
                self._requantize(acc, npos, oc0, spec.shift)
            lo, hi = spec.clip
            q.alu(_tile_kernel(t, npos, acc, acc, 0), AluOp.MIN, hi)
            q.alu(_tile_kernel(t, npos, acc, acc, 0), AluOp.MAX, lo)
            q.dep_push(Stage.COMPUTE, Stage.STORE)
            q.dep_pop(Stage.COMPUTE, Stage.STORE)
            for offset, sram_base, x, y, stride in self._blocks(oc0, y0, x0, rows, cols, acc):
                q.store_2d(
                    buffers["out"], offset, x_size=x, y_size=y, x_stride=stride, sram_base=sram_base
                )
            if u + 2 < len(self.tiles):
                q.dep_push(Stage.STORE, Stage.COMPUTE)

    def _blocks(
        self, oc0: int, y0: int, x0: int, rows: int, cols: int, sram: int
    ) -> list[tuple[int, int, int, int, int]]:
        """The DRAM <-> SRAM transfers of an output-shaped tile: (DRAM offset, SRAM base,
        x_size, y_size, x_stride).

        One per output block, or a single one when the tile is the whole image (then the blocks
        lie one after another on both sides).
        """
        oh, ow = self.spec.out_height, self.spec.out_width
        if rows == oh and cols == ow:
            return [(oc0 * oh * ow, sram, oh * ow, self.t.oc_blocks, oh * ow)]
        return [
            (((oc0 + o) * oh + y0) * ow + x0, sram + o * rows * cols, cols, rows, ow)
            for o in range(self.t.oc_blocks)
        ]

    def _compute(self, gemm: Any, kernel: UopKernel, step: int) -> None:
        """Wait for the step's loads, run its GEMM, hand its buffer half back to the loads."""
        q = self.q
        q.dep_push(Stage.LOAD, Stage.COMPUTE)
        q.dep_pop(Stage.LOAD, Stage.COMPUTE)
        gemm(kernel)
        if step + 2 < self.total_steps:
            q.dep_push(Stage.COMPUTE, Stage.LOAD)

    def _load_input(
        self, inp_buffer: DeviceBuffer, ic0: int, y0: int, x0: int, rows: int, cols: int, sram: int
    ) -> None:
        """The input window of a tile, one LOAD per channel block, zero padding by DMA."""
        spec, t = self.spec, self.t
        top, left, _, _ = spec.padding
        h, w = spec.height, spec.width
        in_rows, in_cols = t.in_rows(spec, rows), t.in_cols(spec, cols)
        r0, c0 = y0 * spec.stride[0] - top, x0 * spec.stride[1] - left
        pad_top, pad_left = max(0, -r0), max(0, -c0)
        pad_bottom, pad_right = max(0, r0 + in_rows - h), max(0, c0 + in_cols - w)
        y_size, x_size = in_rows - pad_top - pad_bottom, in_cols - pad_left - pad_right
        if (y_size, x_size) == (in_rows, in_cols) == (h, w):
            # The whole image, unpadded: the channel blocks lie one after another.
            self.q.load_2d(
                MemId.INP, inp_buffer, ic0 * h * w,
                x_size=h * w, y_size=t.ic_blocks, x_stride=h * w, sram_base=sram,
            )  # fmt: skip
            return
        for i in range(t.ic_blocks):
            self.q.load_2d(
                MemId.INP, inp_buffer, ((ic0 + i) * h + r0 + pad_top) * w + c0 + pad_left,
                x_size=x_size, y_size=y_size, x_stride=w, sram_base=sram + i * in_rows * in_cols,
                pad=(pad_top, pad_bottom, pad_left, pad_right),
            )  # fmt: skip

    def _requantize(self, acc: int, npos: int, bias_block: int | None, shift: int) -> None:
        """Add the biases of the tile's blocks (with the rounding constant) when
        ``bias_block`` is given, then shift, on the ALU."""
        q, t = self.q, self.t
        if bias_block is not None:
            q.alu(_tile_kernel(t, npos, acc, self.sram.bias + bias_block, 1), AluOp.ADD)
        for amount in _shifts(shift):
            q.alu(_tile_kernel(t, npos, acc, acc, 0), AluOp.SHR, amount)


def _shifts(total: int) -> list[int]:
    """``total`` as a sum of shifts the FPGA's ALU can do (arithmetic shifts compose exactly)."""
    low, high = SHIFT_RANGE
    out = []
    while total > high or total < low:
        part = high if total > 0 else low
        out.append(part)
        total -= part
    if total:
        out.append(total)
    return out


# -- the device side ----------------------------------------------------------------------------


def relocate(insns: tuple[Insn, ...] | list[Insn], arena_addr: int, cfg: VtaConfig) -> list[Insn]:
    """The program with its arena offsets turned into physical element addresses."""
    if arena_addr % REGION_ALIGN:
        raise VtaError(f"an arena must be {REGION_ALIGN}-byte aligned, got {arena_addr:#x}")
    out: list[Insn] = []
    for insn in insns:
        if isinstance(insn, MemInsn) and insn.x_size:
            base = arena_addr // cfg.elem_bytes(insn.memory_type)
            insn = dataclasses.replace(insn, dram_base=insn.dram_base + base)
        out.append(insn)
    return out
