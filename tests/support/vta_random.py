"""Random valid VTA programs: every index in range, every token popped after it was pushed.

A pop is only emitted when the program order already pushed an unconsumed token of that FIFO, so
executing in program order is a valid schedule and no schedule can deadlock. The epilogue drains
every token, so FINISH runs last.
"""

from __future__ import annotations

import random
from dataclasses import replace

from vta import isa
from vta.config import VtaConfig
from vta.isa import AluInsn, AluOp, FinishInsn, GemmInsn, Insn, MemId, MemInsn, Stage, Uop

DRAM_BYTES = 1 << 16
UOP_COUNT = 64
UOP_REGION = DRAM_BYTES // 4 - UOP_COUNT  # valid micro-op words end the image (4-byte elements)
MAX_INDEX = 16  # micro-op fields; with factors <= 3 and iterations <= 3 indices stay < 32

# Token FIFOs a stage may pop / push, by flag.
_POPS = {
    Stage.LOAD: {"pop_next": "g2l"},
    Stage.COMPUTE: {"pop_prev": "l2g", "pop_next": "s2g"},
    Stage.STORE: {"pop_prev": "g2s"},
}
_PUSHES = {
    Stage.LOAD: {"push_next": "l2g"},
    Stage.COMPUTE: {"push_prev": "g2l", "push_next": "g2s"},
    Stage.STORE: {"push_prev": "s2g"},
}


def dram_image(cfg: VtaConfig, rng: random.Random) -> bytearray:
    data = bytearray(rng.randbytes(DRAM_BYTES))
    uops = [
        Uop(rng.randrange(MAX_INDEX), rng.randrange(MAX_INDEX), rng.randrange(MAX_INDEX))
        for _ in range(UOP_COUNT)
    ]
    data[UOP_REGION * 4 : (UOP_REGION + UOP_COUNT) * 4] = isa.encode_uops(uops, cfg)
    return data


def _mem(cfg: VtaConfig, rng: random.Random, mem: MemId) -> MemInsn:
    store = mem == MemId.OUT
    x_size = rng.choice([0, 1, 2, 3, 4])
    y_size = rng.randint(1, 3)
    x_stride = max(1, x_size + rng.randint(-1, 3))
    pads = (0, 0, 0, 0) if store else tuple(rng.randint(0, 2) for _ in range(4))
    total = (pads[0] + y_size + pads[1]) * (pads[2] + x_size + pads[3])
    sram_base = rng.randrange(0, 32 - total + 1) if total <= 32 else 0
    if mem == MemId.UOP:
        dram_base = UOP_REGION + rng.randrange(0, UOP_COUNT - (y_size - 1) * x_stride - x_size + 1)
    else:
        # Data lives below the micro-op words, so stores never overwrite them.
        elements = UOP_REGION * 4 // cfg.elem_bytes(mem)
        dram_base = rng.randrange(0, elements - (y_size - 1) * x_stride - x_size + 1)
    return MemInsn(
        is_store=store, memory_type=mem, sram_base=sram_base, dram_base=dram_base,
        y_size=y_size, x_size=x_size, x_stride=x_stride,
        y_pad_0=pads[0], y_pad_1=pads[1], x_pad_0=pads[2], x_pad_1=pads[3],
    )  # fmt: skip


def _loop_fields(rng: random.Random) -> dict[str, int]:
    bgn = rng.randrange(0, 8)
    return {
        "uop_bgn": bgn,
        "uop_end": bgn + rng.randint(0, 4),
        "iter_out": rng.randint(1, 3),
        "iter_in": rng.randint(1, 3),
        "dst_factor_out": rng.randint(0, 3),
        "dst_factor_in": rng.randint(0, 3),
        "src_factor_out": rng.randint(0, 3),
        "src_factor_in": rng.randint(0, 3),
    }


def _compute(cfg: VtaConfig, rng: random.Random) -> Insn:
    kind = rng.random()
    if kind < 0.15:
        return _mem(cfg, rng, rng.choice([MemId.ACC, MemId.UOP, MemId.ACC_8BIT]))
    if kind < 0.55:
        return GemmInsn(
            reset=rng.random() < 0.2,
            wgt_factor_out=rng.randint(0, 3),
            wgt_factor_in=rng.randint(0, 3),
            **_loop_fields(rng),
        )
    use_imm = rng.random() < 0.5
    return AluInsn(
        alu_opcode=rng.choice(list(AluOp)),
        use_imm=use_imm,
        imm=rng.choice([rng.randint(-40, 40), rng.randint(-(1 << 15), (1 << 15) - 1)]),
        **_loop_fields(rng),
    )


def program(cfg: VtaConfig, rng: random.Random, length: int) -> list[Insn]:
    insns: list[Insn] = []
    tokens = {"l2g": 0, "g2l": 0, "g2s": 0, "s2g": 0}

    def add(insn: Insn) -> None:
        flags = {}
        for flag, fifo in _POPS[insn.stage].items():
            if tokens[fifo] and rng.random() < 0.5:
                tokens[fifo] -= 1
                flags[flag] = True
        for flag, fifo in _PUSHES[insn.stage].items():
            if rng.random() < 0.3:
                tokens[fifo] += 1
                flags[flag] = True
        insns.append(replace(insn, **flags))

    for _ in range(length):
        stage = rng.choice(list(Stage))
        if stage == Stage.LOAD:
            add(_mem(cfg, rng, rng.choice([MemId.INP, MemId.WGT])))
        elif stage == Stage.STORE:
            add(_mem(cfg, rng, MemId.OUT))
        else:
            add(_compute(cfg, rng))
    noop = {
        Stage.LOAD: MemInsn(memory_type=MemId.INP, sram_base=0, dram_base=0, y_size=0,
                            x_size=0, x_stride=0),
        Stage.COMPUTE: MemInsn(memory_type=MemId.UOP, sram_base=0, dram_base=0, y_size=0,
                               x_size=0, x_stride=0),
        Stage.STORE: MemInsn(is_store=True, memory_type=MemId.OUT, sram_base=0, dram_base=0,
                             y_size=0, x_size=0, x_stride=0),
    }  # fmt: skip
    for _ in range(tokens["g2l"]):
        insns.append(replace(noop[Stage.LOAD], pop_next=True))
    for _ in range(tokens["g2s"]):
        insns.append(replace(noop[Stage.STORE], pop_prev=True))
    insns.append(replace(noop[Stage.LOAD], push_next=True))
    insns.append(replace(noop[Stage.STORE], push_prev=True))
    for _ in range(tokens["l2g"] + 1):
        insns.append(replace(noop[Stage.COMPUTE], pop_prev=True))
    for _ in range(tokens["s2g"] + 1):
        insns.append(replace(noop[Stage.COMPUTE], pop_next=True))
    insns.append(FinishInsn())
    return insns


#: The designs the VTA tests run on: the published one, a small 1x4 int8 design, and a 2x8 design
#: with 2-bit inputs and 4-bit weights.
SMALL_BUFFERS = {
    "LOG_UOP_BUFF_SIZE": 10,
    "LOG_INP_BUFF_SIZE": 10,
    "LOG_WGT_BUFF_SIZE": 12,
    "LOG_ACC_BUFF_SIZE": 12,
}
CONFIGS = {
    "1x16_i8w8a32_15_15_18_17": VtaConfig(),
    "1x4_i8w8a32_10_10_12_12": VtaConfig.from_dict(
        {"LOG_BLOCK": 2, **SMALL_BUFFERS}, "1x4 test design"
    ),
    "2x8_i2w4a32_10_10_12_12": VtaConfig.from_dict(
        {"LOG_BATCH": 1, "LOG_BLOCK": 3, "LOG_INP_WIDTH": 1, "LOG_WGT_WIDTH": 2, **SMALL_BUFFERS},
        "2x8 test design",
    ),
}
