"""The ISA tables: published encodings, round trips for every kind and design, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import REPO, run_cli
from tests.support.vta_random import CONFIGS
from vta import isa
from vta.config import VtaConfig
from vta.errors import EncodingError
from vta.isa import AluInsn, AluOp, FinishInsn, GemmInsn, Insn, MemId, MemInsn, Uop
from vta.sim import Dram, Simulator

DEFAULT = VtaConfig()

VECTORS = [
    (
        MemInsn(memory_type=MemId.INP, sram_base=16, dram_base=0x12345, y_size=4, x_size=4,
                x_stride=16, y_pad_0=1, y_pad_1=1, x_pad_0=1, x_pad_1=1, push_next=True),
        0x0000048D14004140, 0x1111001000040004,
    ),
    (
        MemInsn(is_store=True, memory_type=MemId.OUT, sram_base=0, dram_base=0x100, y_size=2,
                x_size=7, x_stride=14, pop_prev=True, push_prev=True),
        0x0000000400000229, 0x0000000E00070002,
    ),
    (
        GemmInsn(uop_bgn=0, uop_end=3, iter_out=7, iter_in=14, dst_factor_out=14,
                 dst_factor_in=1, src_factor_out=16, src_factor_in=1, pop_prev=True,
                 push_prev=True),
        0x001C00380060002A, 0x000000020400080E,
    ),
    (
        AluInsn(alu_opcode=AluOp.SHR, use_imm=True, imm=-2, uop_bgn=3, uop_end=4, iter_out=1,
                iter_in=98, dst_factor_out=0, dst_factor_in=1, src_factor_out=0, src_factor_in=1),
        0x00C4000800800304, 0xFFFEB00200000800,
    ),
    (
        AluInsn(alu_opcode=AluOp.MAX, use_imm=True, imm=-127, uop_bgn=0, uop_end=1, iter_out=1,
                iter_in=1, dst_factor_out=0, dst_factor_in=0, src_factor_out=0, src_factor_in=0),
        0x0002000800200004, 0xFF81900000000000,
    ),
    (FinishInsn(), 0x0000000000000003, 0x0000000000000000),
]  # fmt: skip


@pytest.mark.parametrize(("insn", "lo", "hi"), VECTORS, ids=lambda v: getattr(v, "opcode", ""))
def test_published_vectors(insn: Insn, lo: int, hi: int) -> None:
    word = isa.encode(insn, DEFAULT)
    assert (word & (1 << 64) - 1, word >> 64) == (lo, hi)
    assert isa.decode(word, DEFAULT) == insn


def test_published_uop_vector() -> None:
    assert isa.encode_uop(Uop(dst=5, src=17, wgt=3), DEFAULT) == 0x00C08805
    assert isa.decode_uop(0x00C08805, DEFAULT) == Uop(5, 17, 3)


def test_default_gemm_layout_matches_the_straddle_rule() -> None:
    fields = {f.name: (f.hi, f.lo) for f in isa.layouts(DEFAULT)["GEMM"].fields}
    assert fields["iter_in"] == (62, 49)
    assert fields["dst_factor_out"] == (74, 64)  # 11 bits would straddle bit 64
    assert fields["wgt_factor_in"] == (127, 118)


def _fields(cfg: VtaConfig, kind: str) -> st.SearchStrategy[dict[str, int]]:
    fixed = {"opcode", "memory_type", "alu_opcode"}
    return st.fixed_dictionaries(
        {
            f.name: st.integers(-(1 << (f.width - 1)), (1 << (f.width - 1)) - 1)
            if f.signed
            else st.integers(0, (1 << f.width) - 1)
            for f in isa.layouts(cfg)[kind].fields
            if f.name not in fixed
        }
    )


def _instructions(cfg: VtaConfig) -> st.SearchStrategy[Insn]:
    flags = ("pop_prev", "pop_next", "push_prev", "push_next", "reset", "use_imm")

    def build(kind: str, values: dict[str, int], extra: int, store: bool) -> Insn:
        values = {k: bool(v) if k in flags else v for k, v in values.items()}
        if kind == "MEM":
            return MemInsn(is_store=store, memory_type=MemId(extra % 6), **values)
        if kind == "GEMM":
            return GemmInsn(**values)
        if kind == "ALU":
            return AluInsn(alu_opcode=AluOp(extra % 5), **values)
        return FinishInsn(**values)

    return st.one_of(
        *[
            st.builds(build, st.just(kind), _fields(cfg, kind), st.integers(0, 29), st.booleans())
            for kind in ("MEM", "GEMM", "ALU", "FINISH")
        ]
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_instruction_round_trips(name: str) -> None:
    cfg = CONFIGS[name]

    @settings(max_examples=300, deadline=None)
    @given(_instructions(cfg))
    def round_trip(insn: Insn) -> None:
        word = isa.encode(insn, cfg)
        assert 0 <= word < 1 << 128
        assert isa.decode(word, cfg) == insn
        assert isa.decode_program(isa.encode_program([insn], cfg), cfg) == [insn]

    round_trip()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_uop_round_trips(name: str) -> None:
    cfg = CONFIGS[name]

    @settings(max_examples=200, deadline=None)
    @given(_fields(cfg, "UOP"))
    def round_trip(values: dict[str, int]) -> None:
        uop = Uop(**values)
        word = isa.encode_uop(uop, cfg)
        assert 0 <= word < 1 << 32
        assert isa.decode_uop(word, cfg) == uop

    round_trip()


def test_a_value_too_wide_for_its_field_names_it() -> None:
    insn = GemmInsn(uop_bgn=0, uop_end=1, iter_out=1 << 14, iter_in=1, dst_factor_out=0,
                    dst_factor_in=0, src_factor_out=0, src_factor_in=0)  # fmt: skip
    with pytest.raises(EncodingError) as err:
        isa.encode(insn, DEFAULT)
    assert str(err.value) == "GemmInsn: iter_out = 16384 does not fit its 14-bit field (0..16383)"


def test_undecodable_words() -> None:
    with pytest.raises(EncodingError, match=r"instruction 1: unknown opcode 7 \(expected 0..4\)"):
        isa.decode_program(bytes(16) + b"\x07" + bytes(15), DEFAULT)
    with pytest.raises(EncodingError, match="got 20 bytes"):
        isa.decode_program(bytes(20), DEFAULT)


def _tiny_program() -> list[Insn]:
    return [
        MemInsn(memory_type=MemId.UOP, sram_base=0, dram_base=0x40, y_size=1, x_size=2,
                x_stride=2),
        MemInsn(memory_type=MemId.WGT, sram_base=0, dram_base=0x10, y_size=1, x_size=1,
                x_stride=1),
        MemInsn(memory_type=MemId.INP, sram_base=0, dram_base=0x180, y_size=2, x_size=3,
                x_stride=4, x_pad_0=1, push_next=True),
        GemmInsn(uop_bgn=0, uop_end=2, iter_out=2, iter_in=1, dst_factor_out=2, dst_factor_in=0,
                 src_factor_out=1, src_factor_in=0, pop_prev=True),
        AluInsn(alu_opcode=AluOp.SHR, use_imm=True, imm=-3, uop_bgn=0, uop_end=2, iter_out=2,
                iter_in=1, dst_factor_out=2, dst_factor_in=0, src_factor_out=0, src_factor_in=0,
                push_next=True),
        MemInsn(is_store=True, memory_type=MemId.OUT, sram_base=0, dram_base=0x200, y_size=1,
                x_size=4, x_stride=4, pop_prev=True, push_prev=True),
        MemInsn(memory_type=MemId.UOP, sram_base=0, dram_base=0, y_size=0, x_size=0,
                x_stride=0, pop_next=True),
        FinishInsn(),
    ]  # fmt: skip


def test_disassembly_golden() -> None:
    lines = isa.disassemble_program(_tiny_program(), DEFAULT)
    golden = (REPO / "tests" / "golden" / "vta_tiny_program.txt").read_text().splitlines()
    assert lines == golden


def test_cli_disasm_and_sim(tmp_path: Path) -> None:
    cfg = DEFAULT
    program = tmp_path / "program.bin"
    program.write_bytes(isa.encode_program(_tiny_program(), cfg))
    disasm = run_cli("vta", "disasm", str(program), cwd=tmp_path)
    assert disasm.returncode == 0, disasm.stderr
    assert disasm.stdout.splitlines()[1:] == isa.disassemble_program(_tiny_program(), cfg)

    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, 0x3000, dtype=np.uint8)
    uops = isa.encode_uops([Uop(0, 0, 0), Uop(1, 1, 0)], cfg)
    image[0x40 * 4 : 0x40 * 4 + len(uops)] = np.frombuffer(uops, np.uint8)
    dram = tmp_path / "dram.bin"
    dram.write_bytes(image.tobytes())
    out = tmp_path / "out.bin"
    sim = run_cli("vta", "sim", str(program), "--dram", str(dram), "-o", str(out), cwd=tmp_path)
    assert sim.returncode == 0, sim.stderr
    counters = json.loads(sim.stdout)
    assert counters["gemm_counter"] == 4 and counters["alu_counter"] == 4
    assert counters["out_store_nbytes"] == 4 * 16

    # The same program in this process (the simulator is checked against the scalar reference
    # elsewhere): the command line must read, run and write exactly that.
    expected = image.copy()
    Simulator(cfg, Dram(expected)).run(program.read_bytes())
    result = np.frombuffer(out.read_bytes(), np.uint8)
    assert np.array_equal(result, expected)
    assert not np.array_equal(result[0x2000 : 0x2000 + 64], image[0x2000 : 0x2000 + 64])


def test_cli_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    program = tmp_path / "odd.bin"
    program.write_bytes(bytes(17))
    result = run_cli("vta", "disasm", str(program), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "python -m vta: error: a program is a sequence of 16-byte instructions; got 17 bytes "
        "(1 left over)"
    )
    config = tmp_path / "vta.json"
    config.write_text('{"LOG_BLOCK": 9}')
    result = run_cli("vta", "--config", str(config), "disasm", str(program), cwd=tmp_path)
    assert result.returncode == 1
    assert (
        result.stderr.strip() == f"python -m vta: error: {config}: LOG_BLOCK: expected 1..6, got 9"
    )
