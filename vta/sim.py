"""The functional simulator: the living definition of the VTA instruction set.

Semantics follow VTA-ISA.md section 3; where it is silent the original functional simulator
(tvm-vta ``src/sim/sim_driver.cc``) decides, and the comments say so. The work of GEMM is done
with exact vectorized arithmetic: products are summed in float32 (or float64) matrix products
whose every partial sum is an integer below 2**24 (2**53), so BLAS computes them exactly, and
accumulation into the 32-bit accumulators wraps modulo 2**32 as the hardware does.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from vta import isa
from vta.config import VtaConfig
from vta.errors import DeadlockError, HlsError, SimulationError
from vta.isa import AluInsn, AluOp, FinishInsn, GemmInsn, Insn, MemId, MemInsn, Stage

#: Token FIFOs by (producer, consumer) stage.
_L2G, _G2L, _G2S, _S2G = "load->compute", "compute->load", "compute->store", "store->compute"
#: (pop_prev, pop_next, push_prev, push_next) FIFOs of each stage.
_STAGE_FIFOS = {
    Stage.LOAD: (None, _G2L, None, _L2G),
    Stage.COMPUTE: (_L2G, _S2G, _G2L, _G2S),
    Stage.STORE: (_G2S, None, _S2G, None),
}
#: Dependency flags a stage does not have (there is no load<->store token queue).
_MISSING_FLAGS = {
    Stage.LOAD: ("pop_prev", "push_prev"),
    Stage.COMPUTE: (),
    Stage.STORE: ("pop_next", "push_next"),
}
_STAGE_NAMES = {Stage.LOAD: "load", Stage.COMPUTE: "compute", Stage.STORE: "store"}
#: HLS: an accumulator written by a GEMM uop must not be written again by the next two.
HLS_GEMM_DEP_DISTANCE = 3
HLS_SHIFT_RANGE = (-16, 15)


@dataclass
class Counters:
    """The original simulator's profiler counters (same names)."""

    inp_load_nbytes: int = 0
    wgt_load_nbytes: int = 0
    acc_load_nbytes: int = 0
    uop_load_nbytes: int = 0
    out_store_nbytes: int = 0
    gemm_counter: int = 0
    alu_counter: int = 0

    def add(self, other: Counters) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class Dram:
    """Simulated physical memory: one byte array whose offset is the physical address."""

    def __init__(self, data: NDArray[np.uint8]) -> None:
        self.data = data

    @classmethod
    def zeros(cls, nbytes: int) -> Dram:
        return cls(np.zeros(nbytes, dtype=np.uint8))

    @property
    def nbytes(self) -> int:
        return int(self.data.size)

    def check(self, start: int, end: int, what: str) -> None:
        if start < 0 or end > self.nbytes:
            raise SimulationError(
                f"{what} touches DRAM bytes [{start:#x}, {end:#x}), outside the "
                f"{self.nbytes:#x}-byte memory"
            )

    def rows(
        self, byte_addr: int, y_size: int, row_bytes: int, stride_bytes: int
    ) -> NDArray[np.uint8]:
        """A (y_size, row_bytes) view of rows ``stride_bytes`` apart (bounds already checked)."""
        return np.lib.stride_tricks.as_strided(
            self.data[byte_addr:],
            shape=(y_size, row_bytes),
            strides=(stride_bytes, 1),
            writeable=True,
        )


def unpack_lanes(raw: NDArray[np.uint8], width: int, lanes: int) -> NDArray[np.int8]:
    """(n, element bytes) raw elements → (n, lanes) signed values of ``width`` bits each.

    Sub-byte values are packed from bit 0 of each byte upwards, as the original BitPacker did.
    """
    n = raw.shape[0]
    if width == 8:
        return np.ascontiguousarray(raw).view(np.int8).reshape(n, lanes)
    bits = np.unpackbits(raw, axis=1, bitorder="little").reshape(n, lanes, width)
    value = (bits.astype(np.int16) << np.arange(width, dtype=np.int16)).sum(axis=2)
    value -= (value >> (width - 1)) << width
    signed: NDArray[np.int8] = value.astype(np.int8)
    return signed


def pack_lanes(values: NDArray[np.integer], width: int) -> NDArray[np.uint8]:
    """(n, lanes) integers → (n, element bytes), keeping the low ``width`` bits (wrap)."""
    n = values.shape[0]
    if width == 8:
        return values.astype(np.int8).view(np.uint8).reshape(n, -1)
    low = (values & ((1 << width) - 1)).astype(np.uint8)
    bits = (low[..., None] >> np.arange(width, dtype=np.uint8)) & 1
    return np.packbits(bits.reshape(n, -1), axis=1, bitorder="little")


def _wrap32(values: NDArray[np.int64]) -> NDArray[np.int32]:
    return values.astype(np.int32)


class Simulator:
    """One VTA device: SRAM buffers that persist across runs, three queues, four token FIFOs.

    ``hls=True`` rejects what the FPGA design cannot run (VTA-ISA.md section 4), so programs
    that pass here are board-safe.
    """

    def __init__(self, config: VtaConfig, dram: Dram, *, hls: bool = False) -> None:
        self.config = config
        self.dram = dram
        self.hls = hls
        c = config
        self.inp = np.zeros((c.inp_depth, c.batch, c.block), dtype=np.int8)
        self.wgt = np.zeros((c.wgt_depth, c.block, c.block), dtype=np.int8)
        self.acc = np.zeros((c.acc_depth, c.batch, c.block), dtype=np.int32)
        self.uop = np.zeros((c.uop_depth, 3), dtype=np.int64)  # decoded (dst, src, wgt)
        # Exact float copies of the GEMM operands, kept in step with every load.
        self._inp_f = np.zeros(self.inp.shape, dtype=np.float32)
        self._wgt_f = np.zeros(self.wgt.shape, dtype=np.float32)
        # HLS: which accumulator entries the output buffer holds (written by GEMM or ALU).
        self._out_valid = np.zeros(c.acc_depth, dtype=bool)
        # Largest |partial sum| of one input·weight dot product over BLOCK lanes.
        self._dot_bound = c.block << (c.inp_width - 1 + c.wgt_width - 1)
        self.counters = Counters()
        self._run_counters = Counters()
        self._plans: dict[tuple[Insn, bytes], _GemmPlan | _AluPlan] = {}
        self._programs: dict[bytes, list[Insn]] = {}

    # -- running programs -------------------------------------------------------------------

    def run(self, program: bytes | Sequence[Insn]) -> Counters:
        """Run a program to its FINISH; returns this run's counters (also added to ``counters``).

        Scheduling follows the HLS design's test bench: the load queue runs as far as its tokens
        allow, then compute, then store, round after round. A round in which no queue moves is a
        deadlock and raises with a snapshot instead of spinning.
        """
        insns = self._decode(program) if isinstance(program, bytes) else program
        queues: dict[Stage, deque[tuple[int, Insn]]] = {s: deque() for s in Stage}
        for index, insn in enumerate(insns):
            self._check_dep_flags(index, insn)
            queues[insn.stage].append((index, insn))
        if not any(isinstance(insn, FinishInsn) for insn in insns):
            raise SimulationError("the program has no FINISH instruction; it would never end")
        # Token FIFOs start empty on every run, as the original simulator's TLPP model did.
        tokens = {_L2G: 0, _G2L: 0, _G2S: 0, _S2G: 0}
        run_counters = self._run_counters = Counters()
        finished = False
        while not finished:
            progressed = False
            for stage in Stage:
                queue = queues[stage]
                while queue and not finished and self._ready(queue[0][1], tokens):
                    index, insn = queue.popleft()
                    self._pop_tokens(insn, tokens)
                    try:
                        finished = self._execute(insn)
                    except SimulationError as err:
                        raise type(err)(f"instruction {index} ({insn.opcode.name}): {err}") from err
                    self._push_tokens(insn, tokens)
                    progressed = True
            if finished:
                left = {_STAGE_NAMES[s]: len(q) for s, q in queues.items() if q}
                if left:
                    raise SimulationError(
                        f"FINISH ran while instructions were still queued ({left}); make FINISH "
                        "wait for the other stages with dependency tokens"
                    )
            elif not progressed:
                raise self._deadlock(queues, tokens)
        self.counters.add(run_counters)
        return run_counters

    def _decode(self, program: bytes) -> Sequence[Insn]:
        """Decoded instructions; a program that runs again (a layer, every inference) is decoded
        once."""
        insns = self._programs.get(program)
        if insns is None:
            if len(self._programs) >= _PROGRAM_CACHE_SIZE:
                self._programs.clear()
            insns = self._programs[program] = isa.decode_program(program, self.config)
        return insns

    @staticmethod
    def _check_dep_flags(index: int, insn: Insn) -> None:
        for flag in _MISSING_FLAGS[insn.stage]:
            if getattr(insn, flag):
                raise SimulationError(
                    f"instruction {index} ({insn.opcode.name}) sets {flag}, which the "
                    f"{_STAGE_NAMES[insn.stage]} stage does not have (there is no load<->store "
                    "token queue)"
                )

    def _ready(self, insn: Insn, tokens: dict[str, int]) -> bool:
        pop_prev, pop_next, _, _ = _STAGE_FIFOS[insn.stage]
        return not (insn.pop_prev and pop_prev and tokens[pop_prev] == 0) and not (
            insn.pop_next and pop_next and tokens[pop_next] == 0
        )

    def _pop_tokens(self, insn: Insn, tokens: dict[str, int]) -> None:
        pop_prev, pop_next, _, _ = _STAGE_FIFOS[insn.stage]
        if insn.pop_prev and pop_prev:
            tokens[pop_prev] -= 1
        if insn.pop_next and pop_next:
            tokens[pop_next] -= 1

    def _push_tokens(self, insn: Insn, tokens: dict[str, int]) -> None:
        _, _, push_prev, push_next = _STAGE_FIFOS[insn.stage]
        if insn.push_prev and push_prev:
            tokens[push_prev] += 1
        if insn.push_next and push_next:
            tokens[push_next] += 1

    def _deadlock(
        self, queues: dict[Stage, deque[tuple[int, Insn]]], tokens: dict[str, int]
    ) -> DeadlockError:
        heads: dict[str, object] = {}
        waits = []
        for stage, queue in queues.items():
            if not queue:
                continue
            index, insn = queue[0]
            heads[_STAGE_NAMES[stage]] = {
                "index": index,
                "insn": isa.disassemble(insn, self.config),
                "queued": len(queue),
            }
            pop_prev, pop_next, _, _ = _STAGE_FIFOS[insn.stage]
            wanted = [
                fifo
                for flag, fifo in ((insn.pop_prev, pop_prev), (insn.pop_next, pop_next))
                if flag and fifo and tokens[fifo] == 0
            ]
            waits.append(
                f"{_STAGE_NAMES[stage]} instruction {index} waits for a {' and a '.join(wanted)} "
                "token"
            )
        snapshot: dict[str, object] = {"heads": heads, "tokens": dict(tokens)}
        return DeadlockError(
            "deadlock: no queue can proceed: " + "; ".join(waits) + f" (tokens: {tokens})",
            snapshot,
        )

    def _execute(self, insn: Insn) -> bool:
        """Run one instruction; True when it was FINISH."""
        if isinstance(insn, MemInsn):
            if insn.is_store:
                self._store(insn)
            else:
                self._load(insn)
        elif isinstance(insn, GemmInsn):
            self._gemm(insn)
        elif isinstance(insn, AluInsn):
            self._alu(insn)
        else:
            return True
        return False

    # -- LOAD and STORE ---------------------------------------------------------------------

    def _load(self, op: MemInsn) -> None:
        # A zero-width transfer only moves tokens (and counts nothing), as in the original.
        if op.x_size == 0:
            return
        cfg, mem = self.config, op.memory_type
        if mem == MemId.OUT:
            raise SimulationError("LOAD cannot read into the output buffer (memory type OUT)")
        if self.hls and mem == MemId.ACC_8BIT:
            raise HlsError("the FPGA design has no 8-bit accumulator load (ACC_8BIT)")
        if self.hls and mem == MemId.WGT and any(op.pads):
            raise HlsError("the FPGA design ignores padding on weight loads; pad in DRAM")
        eb = cfg.elem_bytes(mem)
        first = op.dram_base * eb
        last = (op.dram_base + (op.y_size - 1) * op.x_stride + op.x_size) * eb
        self.dram.check(first, last, "LOAD")
        raw = self.dram.rows(first, op.y_size, op.x_size * eb, op.x_stride * eb)
        raw = raw.reshape(op.y_size * op.x_size, eb)
        xtotal = op.x_pad_0 + op.x_size + op.x_pad_1
        ytotal = op.y_pad_0 + op.y_size + op.y_pad_1
        depth = cfg.depth(mem)
        if op.sram_base + xtotal * ytotal > depth:
            raise SimulationError(
                f"LOAD {mem.name} writes SRAM entries [{op.sram_base}, "
                f"{op.sram_base + xtotal * ytotal}), beyond the {depth}-entry buffer"
            )
        lanes = cfg.batch * cfg.block
        values: NDArray[np.integer]
        if mem == MemId.UOP:
            words = raw.copy().view("<u4").reshape(-1).astype(np.int64)
            values = _decode_uop_words(words, cfg)
            target: NDArray[np.integer] = self.uop
            self._run_counters.uop_load_nbytes += op.x_size * op.y_size * eb
        elif mem == MemId.INP:
            values = unpack_lanes(raw, cfg.inp_width, lanes).reshape(-1, cfg.batch, cfg.block)
            target = self.inp
            self._run_counters.inp_load_nbytes += op.x_size * op.y_size * eb
        elif mem == MemId.WGT:
            values = unpack_lanes(raw, cfg.wgt_width, cfg.block * cfg.block)
            values = values.reshape(-1, cfg.block, cfg.block)
            target = self.wgt
            self._run_counters.wgt_load_nbytes += op.x_size * op.y_size * eb
        else:
            if mem == MemId.ACC:
                values = raw.copy().view("<i4").reshape(-1, cfg.batch, cfg.block)
            else:  # ACC_8BIT: int8 values sign-extended into the accumulators
                values = raw.view(np.int8).astype(np.int32).reshape(-1, cfg.batch, cfg.block)
            target = self.acc
            # The original counts accumulator-sized elements for ACC_8BIT loads too.
            self._run_counters.acc_load_nbytes += op.x_size * op.y_size * cfg.acc_elem_bits // 8
            self._out_valid[op.sram_base : op.sram_base + xtotal * ytotal] = False
        block = np.zeros((ytotal, xtotal, *target.shape[1:]), dtype=target.dtype)
        block[op.y_pad_0 : op.y_pad_0 + op.y_size, op.x_pad_0 : op.x_pad_0 + op.x_size] = (
            values.reshape(op.y_size, op.x_size, *target.shape[1:])
        )
        region = slice(op.sram_base, op.sram_base + xtotal * ytotal)
        target[region] = block.reshape(-1, *target.shape[1:])
        if mem == MemId.INP:
            self._inp_f[region] = self.inp[region]
        elif mem == MemId.WGT:
            self._wgt_f[region] = self.wgt[region]

    def _store(self, op: MemInsn) -> None:
        if op.x_size == 0:
            return
        cfg = self.config
        if op.memory_type != MemId.OUT:
            raise SimulationError(
                f"STORE writes only the output buffer (memory type OUT), not {op.memory_type.name}"
            )
        if any(op.pads):
            raise SimulationError("STORE cannot pad: set every pad field to 0")
        count = op.x_size * op.y_size
        if op.sram_base + count > cfg.acc_depth:
            raise SimulationError(
                f"STORE reads output entries [{op.sram_base}, {op.sram_base + count}), beyond "
                f"the {cfg.acc_depth}-entry buffer"
            )
        valid = self._out_valid[op.sram_base : op.sram_base + count]
        if self.hls and not valid.all():
            stale = op.sram_base + int(np.argmin(valid))
            raise HlsError(
                f"STORE of accumulator entry {stale}, which no GEMM or ALU op wrote since it was "
                "loaded or reset: the FPGA stores from a separate output buffer (pass the tile "
                "through an ALU op such as SHR 0 first)"
            )
        eb = cfg.out_elem_bits // 8
        first = op.dram_base * eb
        last = (op.dram_base + (op.y_size - 1) * op.x_stride + op.x_size) * eb
        self.dram.check(first, last, "STORE")
        values = self.acc[op.sram_base : op.sram_base + count].reshape(count, -1)
        packed = pack_lanes(values, cfg.out_width).reshape(op.y_size, op.x_size * eb)
        if op.x_stride >= op.x_size or op.y_size == 1:
            self.dram.rows(first, op.y_size, op.x_size * eb, op.x_stride * eb)[:] = packed
        else:  # overlapping rows: later rows win, as sequential writes would have it
            for y in range(op.y_size):
                start = first + y * op.x_stride * eb
                self.dram.data[start : start + op.x_size * eb] = packed[y]
        self._run_counters.out_store_nbytes += count * eb

    # -- GEMM and ALU -------------------------------------------------------------------------

    def _plan(self, op: GemmInsn | AluInsn) -> _GemmPlan | _AluPlan:
        """What an instruction computes, worked out once per (instruction, micro-ops) and cached:
        repeated tiles of a layer reuse the analysis and only do the arithmetic."""
        if op.uop_end > self.config.uop_depth:
            raise SimulationError(
                f"micro-ops [{op.uop_bgn}, {op.uop_end}) run past the "
                f"{self.config.uop_depth}-entry micro-op buffer"
            )
        key = (op, self.uop[op.uop_bgn : max(op.uop_bgn, op.uop_end)].tobytes())
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.clear()
            plan = self._gemm_plan(op) if isinstance(op, GemmInsn) else self._alu_plan(op)
            self._plans[key] = plan
        return plan

    def _indices(self, op: isa.LoopInsn) -> tuple[NDArray[np.int64], ...]:
        """Flattened (dst, src[, wgt]) indices of every uop issue, in loop order."""
        uops = self.uop[op.uop_bgn : max(op.uop_bgn, op.uop_end)]
        i_out = np.arange(op.iter_out, dtype=np.int64)[:, None, None]
        i_in = np.arange(op.iter_in, dtype=np.int64)[None, :, None]
        factors = [
            (0, op.dst_factor_out, op.dst_factor_in),
            (1, op.src_factor_out, op.src_factor_in),
        ]
        if isinstance(op, GemmInsn):
            factors.append((2, op.wgt_factor_out, op.wgt_factor_in))
        return tuple(
            (uops[None, None, :, column] + i_out * f_out + i_in * f_in).reshape(-1)
            for column, f_out, f_in in factors
        )

    @staticmethod
    def _check_range(index: NDArray[np.int64], depth: int, what: str) -> None:
        if index.size and int(index.max()) >= depth:
            raise SimulationError(
                f"{what} index {int(index.max())} is outside the {depth}-entry buffer"
            )

    def _gemm_plan(self, op: GemmInsn) -> _GemmPlan:
        cfg = self.config
        dst, src, wgt = self._indices(op)
        self._check_range(dst, cfg.acc_depth, "accumulator")
        if op.reset or dst.size == 0:
            return _GemmPlan(dst.size, _as_index(np.unique(dst)), ())
        self._check_range(src, cfg.inp_depth, "input")
        self._check_range(wgt, cfg.wgt_depth, "weight")
        if self.hls:
            _check_gemm_hazard(dst)
        # Sum every contribution per accumulator: sort the issues by destination (stable, so
        # each destination's issues keep their order), then handle destinations in buckets that
        # receive the same number of contributions.
        order = np.argsort(dst.astype(np.uint16), kind="stable")
        dst_sorted = dst[order]
        starts = np.flatnonzero(np.r_[True, dst_sorted[1:] != dst_sorted[:-1]])
        counts = np.diff(np.r_[starts, dst.size])
        buckets = []
        for count in np.unique(counts):
            rows = starts[counts == count]
            issue = order[rows[:, None] + np.arange(count)]  # (destinations, count) issue numbers
            buckets.append(self._bucket(dst[issue[:, 0]], src[issue], wgt[issue]))
        return _GemmPlan(dst.size, _as_index(np.unique(dst)), tuple(buckets))

    def _bucket(
        self, dst: NDArray[np.int64], src: NDArray[np.int64], wgt: NDArray[np.int64]
    ) -> _Bucket:
        """How to compute acc[dst[i]] += Σ_r inp[src[i, r]] · wgt[wgt[i, r]]ᵀ.

        Each destination's operand is its input vectors concatenated over r (im2col, found
        rather than assumed), and its weights the matching concatenation. Destinations share
        operands: with few distinct input and weight sequences, one matrix product of all of
        them is the whole instruction; otherwise one product per weight sequence, or a batched
        product when nearly every destination has weights of its own.
        """
        n, r = src.shape
        src_rows, src_of = _unique_rows(src)
        wgt_rows, wgt_of = _unique_rows(wgt)
        if len(src_rows) * len(wgt_rows) <= 2 * n:
            groups: tuple[NDArray[np.intp], ...] | None = None
        elif len(wgt_rows) * 4 <= n:
            groups = tuple(np.flatnonzero(wgt_of == k) for k in range(len(wgt_rows)))
        else:
            groups = ()
        exact32 = r * self._dot_bound < 1 << 24
        return _Bucket(
            _as_index(dst), src_rows, src_of, wgt_rows, wgt_of, groups,
            np.float32 if exact32 else np.float64,
        )  # fmt: skip

    def _gemm(self, op: GemmInsn) -> None:
        plan = self._plan(op)
        assert isinstance(plan, _GemmPlan)
        if op.reset:
            self.acc[plan.dst] = 0
            self._out_valid[plan.dst] = False
            return
        self._run_counters.gemm_counter += plan.issues
        self._out_valid[plan.dst] = True
        cfg = self.config
        for b in plan.buckets:
            rows, depth = len(b.src_rows), b.src_rows.shape[1] * cfg.block
            # (rows, r, batch, block) → (rows * batch, r * block): one operand row each, 2-D so
            # that one BLAS call does the product
            x: NDArray[np.floating[Any]] = self._inp_f[b.src_rows].astype(b.dtype, copy=False)
            x = x.transpose(0, 2, 1, 3).reshape(rows * cfg.batch, depth)
            # (rows, r, out, in) → (rows, r * in, out)
            w: NDArray[np.floating[Any]] = self._wgt_f[b.wgt_rows].astype(b.dtype, copy=False)
            w = w.transpose(0, 1, 3, 2).reshape(len(b.wgt_rows), depth, cfg.block)
            result: NDArray[np.floating[Any]]
            if b.groups is None:
                # Every input sequence against every weight sequence in one product.
                every = x @ w.transpose(1, 0, 2).reshape(depth, -1)
                every = every.reshape(rows, cfg.batch, len(b.wgt_rows), cfg.block)
                result = every[b.src_of, :, b.wgt_of]
            else:
                x = x.reshape(rows, cfg.batch, depth)
                if b.groups:
                    result = np.empty((len(b.src_of), cfg.batch, cfg.block), dtype=b.dtype)
                    for k, members in enumerate(b.groups):
                        operand = x[b.src_of[members]].reshape(-1, depth)
                        result[members] = (operand @ w[k]).reshape(-1, cfg.batch, cfg.block)
                else:
                    result = x[b.src_of] @ w[b.wgt_of]
            total = self.acc[b.dst].astype(np.int64) + result.astype(np.int64)
            self.acc[b.dst] = _wrap32(total)

    def _alu_plan(self, op: AluInsn) -> _AluPlan:
        cfg = self.config
        dst, src = self._indices(op)
        # The original reads the source pointer even with an immediate, so it must be in range.
        self._check_range(dst, cfg.acc_depth, "accumulator")
        self._check_range(src, cfg.acc_depth, "accumulator (ALU source)")
        runs = _hazard_free_runs(dst, None if op.use_imm else src, cfg.acc_depth)
        return _AluPlan(
            dst.size,
            _as_index(np.unique(dst)),
            tuple((_as_index(dst[run]), _as_index(src[run])) for run in runs),
        )

    def _alu(self, op: AluInsn) -> None:
        if self.hls and op.alu_opcode == AluOp.MUL:
            raise HlsError("the FPGA design has no ALU MUL")
        plan = self._plan(op)
        assert isinstance(plan, _AluPlan)
        self._run_counters.alu_counter += plan.issues
        self._out_valid[plan.dst] = True
        for dst, src in plan.runs:
            y: NDArray[np.int64] | int = op.imm if op.use_imm else self.acc[src].astype(np.int64)
            if self.hls and op.alu_opcode == AluOp.SHR:
                low, high = HLS_SHIFT_RANGE
                if np.any(np.asarray(y) < low) or np.any(np.asarray(y) > high):
                    raise HlsError(
                        f"SHR by an amount outside {low}..{high}: the FPGA uses only the low 5 "
                        "bits of the shift"
                    )
            in_place = _in_place(op.alu_opcode, op.imm) if op.use_imm else None
            if in_place is not None and isinstance(dst, slice):
                ufunc, operand = in_place
                view = self.acc[dst]
                ufunc(view, operand, out=view)
                continue
            self.acc[dst] = _alu_op(op.alu_opcode, self.acc[dst].astype(np.int64), y)


def _in_place(opcode: AluOp, imm: int) -> tuple[np.ufunc, int] | None:
    """(ufunc, operand) that applies an ALU op with an immediate to int32 accumulators in
    place; these results stay in int32, and ADD wraps as the hardware does. None where the
    general path must run: MUL, and SHR by a negative amount (a left shift)."""
    if opcode == AluOp.SHR:
        return (np.right_shift, min(imm, 31)) if imm >= 0 else None
    ufunc = {AluOp.MIN: np.minimum, AluOp.MAX: np.maximum, AluOp.ADD: np.add}.get(opcode)
    return None if ufunc is None else (ufunc, imm)


#: Consecutive ascending indices become a slice: views instead of gathers and scatters.
Index = NDArray[np.int64] | slice


def _as_index(values: NDArray[np.int64]) -> Index:
    consecutive = values.size and int(values[-1]) - int(values[0]) == values.size - 1
    if consecutive and np.all(np.diff(values) == 1):
        return slice(int(values[0]), int(values[-1]) + 1)
    return values


@dataclass(frozen=True)
class _Bucket:
    """Destinations that each receive the same number of GEMM contributions."""

    dst: Index
    src_rows: NDArray[np.int64]  # distinct input index sequences
    src_of: NDArray[np.intp]  # which sequence each destination uses
    wgt_rows: NDArray[np.int64]
    wgt_of: NDArray[np.intp]
    # None: one product of every pair; members per weight sequence; (): batched per row.
    groups: tuple[NDArray[np.intp], ...] | None
    dtype: type[np.floating[Any]]


@dataclass(frozen=True)
class _GemmPlan:
    issues: int
    dst: Index
    buckets: tuple[_Bucket, ...]


@dataclass(frozen=True)
class _AluPlan:
    issues: int
    dst: Index
    runs: tuple[tuple[Index, Index], ...]  # (dst, src) of each hazard-free run


#: Bounds of the caches: a model's distinct instructions and programs fit; past that they start
#: over, so memory stays bounded on a device that runs many models.
_PLAN_CACHE_SIZE = 1024
_PROGRAM_CACHE_SIZE = 64


def _check_gemm_hazard(dst: NDArray[np.int64]) -> None:
    for distance in range(1, HLS_GEMM_DEP_DISTANCE):
        same = np.flatnonzero(dst[distance:] == dst[:-distance])
        if same.size:
            issue = int(same[0]) + distance
            raise HlsError(
                f"GEMM issues {issue - distance} and {issue} both write accumulator "
                f"{int(dst[issue])}: the FPGA pipeline needs {HLS_GEMM_DEP_DISTANCE} issues "
                "between writes to one accumulator (vary an output coordinate in the loop "
                "just outside the GEMM, not a reduction axis)"
            )


def _alu_op(opcode: AluOp, x: NDArray[np.int64], y: NDArray[np.int64] | int) -> NDArray[np.int32]:
    if opcode == AluOp.MIN:
        return np.minimum(x, y).astype(np.int32)
    if opcode == AluOp.MAX:
        return np.maximum(x, y).astype(np.int32)
    if opcode == AluOp.ADD:
        return _wrap32(x + y)
    if opcode == AluOp.MUL:
        return _wrap32(x * y)
    # SHR: arithmetic right shift by y >= 0, left shift by -y when y < 0. The original is C's
    # int32 shift, undefined from 32 on; here shifts saturate as the arithmetic means them:
    # right by >= 32 leaves the sign, left by >= 32 leaves 0.
    shift = np.broadcast_to(np.asarray(y, dtype=np.int64), x.shape)
    right = x >> np.clip(shift, 0, 31)
    left = x << np.clip(-shift, 0, 32)
    return _wrap32(np.where(shift >= 0, right, left))


def _hazard_free_runs(
    dst: NDArray[np.int64], src: NDArray[np.int64] | None, depth: int
) -> list[slice]:
    """Split uop issues into consecutive runs that can each be applied at once.

    Within a run no destination repeats and no source reads a destination written earlier in
    the run, so a vectorized update sees exactly what in-order execution would.
    """
    n = dst.size
    position = np.arange(n)
    first_write = np.full(depth, n, dtype=np.int64)
    first_write[dst[::-1]] = position[::-1]
    unique = np.bincount(dst, minlength=depth).max() <= 1
    if unique and (src is None or not np.any(first_write[src] < position)):
        return [slice(0, n)]
    runs = []
    start = 0
    written: set[int] = set()
    for i in range(n):
        d = int(dst[i])
        if d in written or (src is not None and int(src[i]) in written):
            runs.append(slice(start, i))
            start, written = i, set()
        written.add(d)
    runs.append(slice(start, n))
    return runs


#: Random odd multipliers that fingerprint a row of indices in one int64 (wrapping) dot product.
_ROW_HASH = np.random.default_rng(0x56544100).integers(1, 1 << 62, 4096, dtype=np.int64) | 1


def _unique_rows(rows: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.intp]]:
    """(distinct rows, which distinct row each row is), like ``np.unique(axis=0)`` but fast.

    Rows are grouped by a fingerprint and then compared in full, so a collision only costs the
    slow exact path, never a wrong answer.
    """
    width = rows.shape[1]
    if width <= _ROW_HASH.size:
        with np.errstate(over="ignore"):
            keys = rows @ _ROW_HASH[:width]
        _, first, which = np.unique(keys, return_index=True, return_inverse=True)
        distinct = rows[first]
        if np.array_equal(distinct[which], rows):
            return distinct, which.reshape(-1)
    distinct, which = np.unique(rows, axis=0, return_inverse=True)
    return distinct, which.reshape(-1)


def _decode_uop_words(words: NDArray[np.int64], cfg: VtaConfig) -> NDArray[np.int64]:
    """Raw micro-op words → (n, 3) decoded (dst, src, wgt), by the ISA table's UOP layout."""
    fields = isa.layouts(cfg)["UOP"].fields
    return np.stack([(words >> f.lo) & ((1 << f.width) - 1) for f in fields], axis=1)
