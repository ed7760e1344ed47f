"""VtaConfig: derived values of the published design and others, and errors for humans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.vta_random import CONFIGS
from vta.config import VtaConfig
from vta.errors import VtaConfigError
from vta.isa import MemId


def test_default_is_the_published_design() -> None:
    cfg = VtaConfig()
    assert cfg.bitstream_id == "1x16_i8w8a32_15_15_18_17"
    assert (cfg.uop_depth, cfg.inp_depth, cfg.wgt_depth, cfg.acc_depth) == (8192, 2048, 1024, 2048)
    assert [cfg.elem_bytes(m) for m in (MemId.UOP, MemId.INP, MemId.WGT, MemId.ACC, MemId.OUT)] == [
        4, 16, 256, 64, 16,
    ]  # fmt: skip
    assert (cfg.batch, cfg.block, cfg.inp_width, cfg.wgt_width, cfg.acc_width) == (1, 16, 8, 8, 32)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bitstream_id_names_the_design(name: str) -> None:
    assert CONFIGS[name].bitstream_id == name


def test_sub_byte_design_derives_its_sizes() -> None:
    cfg = CONFIGS["2x8_i2w4a32_10_10_12_12"]
    assert (cfg.batch, cfg.block, cfg.inp_width, cfg.wgt_width, cfg.out_width) == (2, 8, 2, 4, 2)
    assert cfg.elem_bytes(MemId.INP) == 4  # 2 x 8 lanes x 2 bits
    assert cfg.elem_bytes(MemId.WGT) == 32  # 8 x 8 x 4 bits
    assert cfg.elem_bytes(MemId.ACC) == 64
    assert (cfg.inp_depth, cfg.wgt_depth, cfg.acc_depth) == (256, 128, 64)


def test_json_round_trip(tmp_path: Path) -> None:
    cfg = CONFIGS["1x4_i8w8a32_10_10_12_12"]
    path = tmp_path / "vta_config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    loaded = VtaConfig.from_json(path)
    assert loaded == cfg
    assert loaded.source == str(path)


def test_unknown_key_suggests_the_right_one() -> None:
    with pytest.raises(VtaConfigError) as err:
        VtaConfig.from_dict({"LOG_BLOK": 4}, "my.json")
    assert str(err.value) == "my.json: unknown key 'LOG_BLOK' (did you mean LOG_BLOCK?)"


def test_wrong_type_names_the_key() -> None:
    with pytest.raises(VtaConfigError) as err:
        VtaConfig.from_dict({"LOG_BATCH": "1"}, "my.json")
    assert str(err.value) == "my.json: LOG_BATCH: expected an integer (a log2 size), got '1'"


def test_three_bit_values_are_refused() -> None:
    with pytest.raises(VtaConfigError, match="LOG_INP_WIDTH: expected 1, 2 or 3"):
        VtaConfig.from_dict({"LOG_INP_WIDTH": 0}, "my.json")


def test_a_design_whose_micro_op_does_not_fit_is_refused() -> None:
    # A 1x4 block with the published buffer sizes needs 13 + 13 + 14 = 40 micro-op bits.
    with pytest.raises(VtaConfigError) as err:
        VtaConfig.from_dict({"LOG_BLOCK": 2}, "my.json")
    assert str(err.value) == (
        "my.json: the GEMM fields need 144 bits (at most 128), the ALU fields need 136 bits "
        "(at most 128), the UOP fields need 40 bits (at most 32): make the SRAM buffers smaller"
    )


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(VtaConfigError, match="cannot read"):
        VtaConfig.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(VtaConfigError, match="not JSON"):
        VtaConfig.from_json(bad)
