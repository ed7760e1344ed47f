"""A slow, obviously-correct VTA interpreter, written apart from ``vta.sim`` to check it.

Plain Python integers and loops, one multiply-accumulate at a time, straight from VTA-ISA.md
section 3. It shares only the decoded instruction objects with the package (their encoding is
pinned by the published test vectors) and the scheduling rule the simulator documents: the load
queue runs as far as its tokens allow, then compute, then store, round after round.
"""

from __future__ import annotations

from vta.config import VtaConfig
from vta.isa import AluInsn, AluOp, FinishInsn, GemmInsn, Insn, MemId, MemInsn, Stage

COUNTERS = (
    "inp_load_nbytes",
    "wgt_load_nbytes",
    "acc_load_nbytes",
    "uop_load_nbytes",
    "out_store_nbytes",
    "gemm_counter",
    "alu_counter",
)


def wrap32(v: int) -> int:
    return ((v + (1 << 31)) % (1 << 32)) - (1 << 31)


def signed(v: int, bits: int) -> int:
    return v - (1 << bits) if v >= 1 << (bits - 1) else v


def get_value(data: bytes | bytearray, index: int, bits: int) -> int:
    """The index-th ``bits``-wide two's complement value packed from bit 0 upwards."""
    bit = index * bits  # values of 2, 4 or 8 bits never straddle a byte
    return signed((data[bit // 8] >> (bit % 8)) & ((1 << bits) - 1), bits)


def put_value(data: bytearray, index: int, bits: int, value: int) -> None:
    bit = index * bits
    mask = (1 << bits) - 1
    data[bit // 8] = (data[bit // 8] & ~(mask << (bit % 8)) & 0xFF) | ((value & mask) << (bit % 8))


class Reference:
    def __init__(self, cfg: VtaConfig, dram: bytearray) -> None:
        self.cfg = cfg
        self.dram = dram
        lanes = cfg.batch * cfg.block
        self.inp = [[0] * lanes for _ in range(cfg.inp_depth)]
        self.wgt = [[0] * (cfg.block * cfg.block) for _ in range(cfg.wgt_depth)]
        self.acc = [[0] * lanes for _ in range(cfg.acc_depth)]
        self.uop = [0] * cfg.uop_depth  # raw 32-bit words
        self.counters = dict.fromkeys(COUNTERS, 0)

    def run(self, insns: list[Insn]) -> dict[str, int]:
        queues: dict[Stage, list[Insn]] = {s: [i for i in insns if i.stage == s] for s in Stage}
        l2g = g2l = g2s = s2g = 0
        while True:
            moved = False
            for stage in (Stage.LOAD, Stage.COMPUTE, Stage.STORE):
                while queues[stage]:
                    insn = queues[stage][0]
                    if stage == Stage.LOAD:
                        if insn.pop_next and g2l == 0:
                            break
                        g2l -= insn.pop_next
                    elif stage == Stage.COMPUTE:
                        if (insn.pop_prev and l2g == 0) or (insn.pop_next and s2g == 0):
                            break
                        l2g -= insn.pop_prev
                        s2g -= insn.pop_next
                    else:
                        if insn.pop_prev and g2s == 0:
                            break
                        g2s -= insn.pop_prev
                    queues[stage].pop(0)
                    moved = True
                    if isinstance(insn, FinishInsn):
                        assert not any(queues.values()), "FINISH with work left"
                        return self.counters
                    self.execute(insn)
                    if stage == Stage.LOAD:
                        l2g += insn.push_next
                    elif stage == Stage.COMPUTE:
                        g2l += insn.push_prev
                        g2s += insn.push_next
                    else:
                        s2g += insn.push_prev
            if not moved:
                raise AssertionError("deadlock")

    def execute(self, insn: Insn) -> None:
        if isinstance(insn, MemInsn):
            if insn.x_size == 0:
                return
            if insn.is_store:
                self.store(insn)
            else:
                self.load(insn)
        elif isinstance(insn, GemmInsn):
            self.gemm(insn)
        elif isinstance(insn, AluInsn):
            self.alu(insn)

    def load(self, op: MemInsn) -> None:
        cfg = self.cfg
        lanes = cfg.batch * cfg.block
        xtotal = op.x_pad_0 + op.x_size + op.x_pad_1
        ytotal = op.y_pad_0 + op.y_size + op.y_pad_1
        mem = op.memory_type
        for y in range(ytotal):
            for x in range(xtotal):
                entry = op.sram_base + y * xtotal + x
                inside = (
                    op.y_pad_0 <= y < op.y_pad_0 + op.y_size
                    and op.x_pad_0 <= x < op.x_pad_0 + op.x_size
                )
                element = op.dram_base + (y - op.y_pad_0) * op.x_stride + (x - op.x_pad_0)
                if mem == MemId.UOP:
                    start = element * 4
                    self.uop[entry] = (
                        int.from_bytes(self.dram[start : start + 4], "little") if inside else 0
                    )
                elif mem == MemId.INP:
                    eb = lanes * cfg.inp_width // 8
                    data = self.dram[element * eb : element * eb + eb]
                    self.inp[entry] = [
                        get_value(data, k, cfg.inp_width) if inside else 0 for k in range(lanes)
                    ]
                elif mem == MemId.WGT:
                    n = cfg.block * cfg.block
                    eb = n * cfg.wgt_width // 8
                    data = self.dram[element * eb : element * eb + eb]
                    self.wgt[entry] = [
                        get_value(data, k, cfg.wgt_width) if inside else 0 for k in range(n)
                    ]
                elif mem == MemId.ACC:
                    data = self.dram[element * lanes * 4 : (element + 1) * lanes * 4]
                    self.acc[entry] = [
                        signed(int.from_bytes(data[4 * k : 4 * k + 4], "little"), 32)
                        if inside
                        else 0
                        for k in range(lanes)
                    ]
                elif mem == MemId.ACC_8BIT:
                    data = self.dram[element * lanes : (element + 1) * lanes]
                    self.acc[entry] = [signed(data[k], 8) if inside else 0 for k in range(lanes)]
        size = op.x_size * op.y_size
        key = {
            MemId.UOP: ("uop_load_nbytes", 4),
            MemId.INP: ("inp_load_nbytes", lanes * cfg.inp_width // 8),
            MemId.WGT: ("wgt_load_nbytes", cfg.block * cfg.block * cfg.wgt_width // 8),
            MemId.ACC: ("acc_load_nbytes", lanes * 4),
            MemId.ACC_8BIT: ("acc_load_nbytes", lanes * 4),
        }[mem]
        self.counters[key[0]] += size * key[1]

    def store(self, op: MemInsn) -> None:
        cfg = self.cfg
        lanes = cfg.batch * cfg.block
        for y in range(op.y_size):
            for x in range(op.x_size):
                element = op.dram_base + y * op.x_stride + x
                for k in range(lanes):
                    put_value(
                        self.dram,
                        element * lanes + k,
                        cfg.out_width,
                        self.acc[op.sram_base + y * op.x_size + x][k],
                    )
        self.counters["out_store_nbytes"] += op.x_size * op.y_size * lanes * cfg.out_width // 8

    def uop_fields(self, u: int) -> tuple[int, int, int]:
        cfg = self.cfg
        word = self.uop[u]
        dst = word & ((1 << cfg.log_acc_depth) - 1)
        src = (word >> cfg.log_acc_depth) & ((1 << cfg.log_inp_depth) - 1)
        wgt = (word >> (cfg.log_acc_depth + cfg.log_inp_depth)) & ((1 << cfg.log_wgt_depth) - 1)
        return dst, src, wgt

    def gemm(self, op: GemmInsn) -> None:
        cfg = self.cfg
        for i_out in range(op.iter_out):
            for i_in in range(op.iter_in):
                for u in range(op.uop_bgn, op.uop_end):
                    dst, src, wgt = self.uop_fields(u)
                    d = dst + i_out * op.dst_factor_out + i_in * op.dst_factor_in
                    s = src + i_out * op.src_factor_out + i_in * op.src_factor_in
                    w = wgt + i_out * op.wgt_factor_out + i_in * op.wgt_factor_in
                    if op.reset:
                        self.acc[d] = [0] * len(self.acc[d])
                        continue
                    self.counters["gemm_counter"] += 1
                    for b in range(cfg.batch):
                        for oc in range(cfg.block):
                            total = self.acc[d][b * cfg.block + oc]
                            for ic in range(cfg.block):
                                total += (
                                    self.inp[s][b * cfg.block + ic]
                                    * self.wgt[w][oc * cfg.block + ic]
                                )
                            self.acc[d][b * cfg.block + oc] = wrap32(total)

    def alu(self, op: AluInsn) -> None:
        for i_out in range(op.iter_out):
            for i_in in range(op.iter_in):
                for u in range(op.uop_bgn, op.uop_end):
                    dst, src, _ = self.uop_fields(u)
                    d = dst + i_out * op.dst_factor_out + i_in * op.dst_factor_in
                    s = src + i_out * op.src_factor_out + i_in * op.src_factor_in
                    self.counters["alu_counter"] += 1
                    for k in range(len(self.acc[d])):
                        x = self.acc[d][k]
                        y = op.imm if op.use_imm else self.acc[s][k]
                        if op.alu_opcode == AluOp.MIN:
                            r = min(x, y)
                        elif op.alu_opcode == AluOp.MAX:
                            r = max(x, y)
                        elif op.alu_opcode == AluOp.ADD:
                            r = x + y
                        elif op.alu_opcode == AluOp.MUL:
                            r = x * y
                        else:  # left shifts past 32 leave 0; cap them before Python grows x
                            r = x >> y if y >= 0 else x << min(-y, 32)
                        self.acc[d][k] = wrap32(r)
