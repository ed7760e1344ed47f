"""The command-queue runtime: builds VTA programs and runs them through a driver.

It follows the original runtime's rules (tvm-vta ``src/runtime.cc``): a dependency pop is
attached to the next instruction of the popping stage, a push to the previous instruction when
that one belongs to the pushing stage, and otherwise a zero-sized LOAD/STORE (a no-op that only
moves tokens) carries it. ``build`` appends the epilogue that makes FINISH wait for every store
and load; ``CommandQueue.synchronize`` also uploads the micro-ops and instructions and runs them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vta import isa
from vta.config import VtaConfig
from vta.drivers.base import DeviceBuffer, Driver
from vta.errors import VtaError
from vta.isa import AluInsn, AluOp, FinishInsn, GemmInsn, Insn, MemId, MemInsn, Stage, Uop

#: The most affine loops a GEMM/ALU instruction can run around its micro-ops.
MAX_LOOPS = 2


@dataclass(frozen=True)
class Loop:
    """One affine loop around a micro-op kernel: every index advances by its factor."""

    extent: int
    dst_factor: int
    src_factor: int
    wgt_factor: int = 0

    def __post_init__(self) -> None:
        if self.extent < 1:
            raise VtaError(f"a loop needs an extent of at least 1, got {self.extent}")


@dataclass(frozen=True)
class UopKernel:
    """Micro-ops run inside up to two affine loops (outer first)."""

    uops: tuple[Uop, ...]
    loops: tuple[Loop, ...] = ()

    def __post_init__(self) -> None:
        if not self.uops:
            raise VtaError("a micro-op kernel needs at least one micro-op")
        if len(self.loops) > MAX_LOOPS:
            raise VtaError(
                f"a micro-op kernel has at most {MAX_LOOPS} loops, got {len(self.loops)}: "
                "split it into several kernels"
            )

    @property
    def outer_inner(self) -> tuple[Loop, Loop]:
        """Both loops, a missing one standing in as a single iteration."""
        outer, inner = (*self.loops, Loop(1, 0, 0), Loop(1, 0, 0))[:MAX_LOOPS]
        return outer, inner


#: The first instruction of every stream: a GEMM over no micro-ops. It changes nothing, but the
#: FPGA's compute stage clears its "done" register when it runs a GEMM or ALU op, so a host
#: polling right after the start cannot mistake the last run's "done" for this one's
#: (VTA-ISA.md section 6; the pynq driver refuses streams that do not start with it).
CLEAR_DONE = GemmInsn(
    uop_bgn=0,
    uop_end=0,
    iter_out=1,
    iter_in=1,
    dst_factor_out=0,
    dst_factor_in=0,
    src_factor_out=0,
    src_factor_in=0,
)


class ProgramBuilder:
    """Builds one instruction stream: loads, stores, GEMM/ALU kernels and dependency tokens.

    DRAM addresses are whatever the given buffers say: physical addresses for a device's buffers
    (``CommandQueue``), offsets into an arena for programs compiled ahead of time (``vta.lower``).
    """

    def __init__(self, config: VtaConfig) -> None:
        self.config = config
        self._reset()

    def _reset(self) -> None:
        self._insns: list[Insn] = [CLEAR_DONE]
        self._pending: dict[Stage, tuple[bool, bool]] = {s: (False, False) for s in Stage}
        self._uops: list[Uop] = []  # the micro-op image of this program, uploaded at the end
        self._uop_offsets: dict[UopKernel, int] = {}  # kernel -> offset in the image
        self._resident: dict[UopKernel, int] = {}  # kernel -> position in the uop SRAM
        self._uop_top = 0
        self._uop_loads: list[int] = []  # instructions whose dram_base is an image offset

    # -- memory ---------------------------------------------------------------------------------

    def _dram_base(
        self, mem: MemId, buffer: DeviceBuffer, elem_offset: int, x: int, y: int, stride: int
    ) -> int:
        eb = self.config.elem_bytes(mem)
        if buffer.addr % eb:
            raise VtaError(
                f"buffer at {buffer.addr:#x} is not aligned to the {eb}-byte {mem.name} element"
            )
        end = (elem_offset + (y - 1) * stride + x) * eb if x and y else 0
        if elem_offset < 0 or end > buffer.nbytes:
            raise VtaError(
                f"a {y}x{x} {mem.name} block at element {elem_offset} (stride {stride}) runs "
                f"past the {buffer.nbytes}-byte buffer at {buffer.addr:#x}"
            )
        return buffer.addr // eb + elem_offset

    def load_2d(
        self,
        mem: MemId,
        buffer: DeviceBuffer,
        elem_offset: int,
        *,
        x_size: int,
        y_size: int,
        x_stride: int,
        sram_base: int,
        pad: tuple[int, int, int, int] = (0, 0, 0, 0),
    ) -> None:
        """Load a 2-D block of elements into SRAM; ``pad`` = (top, bottom, left, right) zeros."""
        y_pad_0, y_pad_1, x_pad_0, x_pad_1 = pad
        self._push(
            MemInsn(
                memory_type=mem,
                sram_base=sram_base,
                dram_base=self._dram_base(mem, buffer, elem_offset, x_size, y_size, x_stride),
                y_size=y_size,
                x_size=x_size,
                x_stride=x_stride,
                y_pad_0=y_pad_0,
                y_pad_1=y_pad_1,
                x_pad_0=x_pad_0,
                x_pad_1=x_pad_1,
            )
        )

    def store_2d(
        self,
        buffer: DeviceBuffer,
        elem_offset: int,
        *,
        x_size: int,
        y_size: int,
        x_stride: int,
        sram_base: int,
    ) -> None:
        """Store ``y_size`` rows of ``x_size`` output elements, narrowed to the output width."""
        self._push(
            MemInsn(
                is_store=True,
                memory_type=MemId.OUT,
                sram_base=sram_base,
                dram_base=self._dram_base(MemId.OUT, buffer, elem_offset, x_size, y_size, x_stride),
                y_size=y_size,
                x_size=x_size,
                x_stride=x_stride,
            )
        )

    # -- compute --------------------------------------------------------------------------------

    def gemm(self, kernel: UopKernel, *, reset: bool = False) -> None:
        """acc[dst] += inp[src] · wgt[wgt]ᵀ for every uop in the loops (or acc[dst] = 0)."""
        outer, inner = kernel.outer_inner
        self._push(
            GemmInsn(
                reset=reset,
                wgt_factor_out=outer.wgt_factor,
                wgt_factor_in=inner.wgt_factor,
                **self._loop_fields(kernel),
            )
        )

    def alu(self, kernel: UopKernel, op: AluOp, imm: int | None = None) -> None:
        """acc[dst] = op(acc[dst], imm) when ``imm`` is given, else op(acc[dst], acc[src])."""
        self._push(
            AluInsn(
                alu_opcode=op,
                use_imm=imm is not None,
                imm=0 if imm is None else imm,
                **self._loop_fields(kernel),
            )
        )

    def _loop_fields(self, kernel: UopKernel) -> dict[str, Any]:
        """The fields GEMM and ALU share: the kernel's micro-op range (staged into the uop SRAM
        first), the loop extents and the dst/src factors."""
        bgn = self._stage_uops(kernel)
        outer, inner = kernel.outer_inner
        return {
            "uop_bgn": bgn,
            "uop_end": bgn + len(kernel.uops),
            "iter_out": outer.extent,
            "iter_in": inner.extent,
            "dst_factor_out": outer.dst_factor,
            "dst_factor_in": inner.dst_factor,
            "src_factor_out": outer.src_factor,
            "src_factor_in": inner.src_factor,
        }

    def _stage_uops(self, kernel: UopKernel) -> int:
        """The kernel's position in the uop SRAM, loading it there first when it is not resident.

        Kernels are placed one after another and the buffer starts over from 0 when full; that
        is safe because micro-op loads run in the compute queue, in order with GEMM and ALU.
        """
        if kernel in self._resident:
            return self._resident[kernel]
        n = len(kernel.uops)
        if n > self.config.uop_depth:
            raise VtaError(
                f"a kernel of {n} micro-ops does not fit the {self.config.uop_depth}-entry "
                "micro-op buffer"
            )
        if self._uop_top + n > self.config.uop_depth:
            self._uop_top = 0
            self._resident.clear()
        if kernel not in self._uop_offsets:
            self._uop_offsets[kernel] = len(self._uops)
            self._uops.extend(kernel.uops)
        self._uop_loads.append(len(self._insns))
        self._push(
            MemInsn(
                memory_type=MemId.UOP,
                sram_base=self._uop_top,
                dram_base=self._uop_offsets[kernel],
                y_size=1,
                x_size=n,
                x_stride=n,
            )
        )
        self._resident[kernel] = self._uop_top
        self._uop_top += n
        return self._resident[kernel]

    # -- dependencies -----------------------------------------------------------------------------

    def dep_pop(self, src: Stage, dst: Stage) -> None:
        """The next ``dst`` instruction waits for a token from ``src``."""
        self._check_pair(src, dst)
        prev, nxt = self._pending[dst]
        if (src < dst and prev) or (src > dst and nxt):
            self._commit_pending(dst)
            prev, nxt = self._pending[dst]
        self._pending[dst] = (prev or src < dst, nxt or src > dst)

    def dep_push(self, src: Stage, dst: Stage) -> None:
        """``src`` sends ``dst`` a token once the instructions issued so far in ``src`` ran."""
        self._check_pair(src, dst)
        self._commit_pending(src)
        flag: dict[str, Any] = {"push_next" if src < dst else "push_prev": True}
        last = self._insns[-1] if self._insns else None
        if last is not None and last.stage == src and not any(getattr(last, f) for f in flag):
            self._insns[-1] = dataclasses.replace(last, **flag)
            return
        self._insns.append(dataclasses.replace(_noop(src), **flag))

    @staticmethod
    def _check_pair(src: Stage, dst: Stage) -> None:
        if abs(src - dst) != 1:
            raise VtaError(
                f"no dependency queue runs from {src.name} to {dst.name}: tokens pass only "
                "between neighbouring stages (load<->compute, compute<->store)"
            )

    def _commit_pending(self, stage: Stage) -> None:
        if any(self._pending[stage]):
            self._push(_noop(stage))

    def _push(self, insn: Insn) -> None:
        prev, nxt = self._pending[insn.stage]
        if prev or nxt:
            insn = dataclasses.replace(insn, pop_prev=prev, pop_next=nxt)
            self._pending[insn.stage] = (False, False)
        self._insns.append(insn)

    # -- finishing --------------------------------------------------------------------------------

    @property
    def uops(self) -> tuple[Uop, ...]:
        """The micro-op image the stream loads from; it must sit in DRAM at ``build``'s base."""
        return tuple(self._uops)

    def build(self, uop_base: int) -> list[Insn]:
        """End the stream with FINISH after every load and store, and start a new one.

        ``uop_base`` is where the micro-op image (``uops``, read it first) lies in DRAM, in
        micro-op elements; every micro-op load is resolved against it.
        """
        self.dep_push(Stage.STORE, Stage.COMPUTE)
        self.dep_push(Stage.LOAD, Stage.COMPUTE)
        self.dep_pop(Stage.STORE, Stage.COMPUTE)
        self.dep_pop(Stage.LOAD, Stage.COMPUTE)
        self._commit_pending(Stage.COMPUTE)
        self._insns.append(FinishInsn())
        insns = self._insns
        for i in self._uop_loads:
            insn = insns[i]
            assert isinstance(insn, MemInsn)
            insns[i] = dataclasses.replace(insn, dram_base=uop_base + insn.dram_base)
        self._reset()
        return insns


class CommandQueue(ProgramBuilder):
    """Builds one instruction stream at a time for a driver's device and runs it."""

    def __init__(self, driver: Driver) -> None:
        super().__init__(driver.config)
        self.driver = driver

    def alloc(self, nbytes: int, mem: MemId) -> DeviceBuffer:
        """Device memory for ``mem`` elements, aligned to the element size as DMA needs."""
        return self.driver.alloc(nbytes, self.config.elem_bytes(mem))

    def synchronize(self, timeout_s: float = 30.0) -> list[Insn]:
        """Finish the stream (``build``), run it, and start a new one.

        Returns the instructions that ran (with micro-op addresses resolved).
        """
        driver, buffers = self.driver, []
        try:
            uops = self.uops
            uop_base = 0
            if uops:
                uop_buffer = self.alloc(len(uops) * isa.UOP_BYTES, MemId.UOP)
                buffers.append(uop_buffer)
                driver.copy_in(uop_buffer, isa.encode_uops(uops, self.config))
                uop_base = uop_buffer.addr // isa.UOP_BYTES
            insns = self.build(uop_base)
            stream = isa.encode_program(insns, self.config)
            program = driver.alloc(len(stream), isa.INSN_BYTES)
            buffers.append(program)
            driver.copy_in(program, stream)
            driver.run(program, len(insns), timeout_s)
            return insns
        finally:
            for buffer in buffers:
                driver.free(buffer)
            self._reset()


def _noop(stage: Stage) -> MemInsn:
    """A zero-sized transfer on ``stage``: it moves dependency tokens and nothing else."""
    memory = {Stage.LOAD: MemId.INP, Stage.COMPUTE: MemId.UOP, Stage.STORE: MemId.OUT}[stage]
    return MemInsn(
        is_store=stage == Stage.STORE,
        memory_type=memory,
        sram_base=0,
        dram_base=0,
        y_size=0,
        x_size=0,
        x_stride=0,
    )
