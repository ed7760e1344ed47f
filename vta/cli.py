"""``python -m vta disasm PROGRAM`` and ``python -m vta sim PROGRAM --dram IMAGE -o OUT``.

A program file is raw little-endian 128-bit instructions; a DRAM image is a raw byte file whose
byte offset is the physical address. Both commands take ``--config VTA_CONFIG.json`` (default:
the published ``1x16_i8w8a32_15_15_18_17`` design).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vta import config as vta_config
from vta import isa
from vta.errors import VtaError
from vta.sim import Dram, Simulator


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise VtaError(f"{path}: cannot read the {what}: {err.strerror}") from err


def cmd_disasm(args: argparse.Namespace) -> int:
    cfg = vta_config.load(args.config)
    insns = isa.decode_program(_read(args.program, "program"), cfg)
    print(f"# {len(insns)} instructions, design {cfg.bitstream_id}")
    for line in isa.disassemble_program(insns, cfg):
        print(line)
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    cfg = vta_config.load(args.config)
    program = _read(args.program, "program")
    image = np.frombuffer(_read(args.dram, "DRAM image"), dtype=np.uint8).copy()
    simulator = Simulator(cfg, Dram(image), hls=args.hls)
    counters = simulator.run(program)
    try:
        args.output.write_bytes(image.tobytes())
    except OSError as err:
        raise VtaError(f"{args.output}: cannot write the DRAM image: {err.strerror}") from err
    print(json.dumps(counters.as_dict(), indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vta", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", type=Path, default=None, help="VTA configuration JSON (default: 1x16 design)"
    )
    sub = parser.add_subparsers(metavar="COMMAND")
    disasm = sub.add_parser("disasm", help="print a program readably, one instruction a line")
    disasm.add_argument("program", type=Path)
    disasm.set_defaults(handler=cmd_disasm)
    sim = sub.add_parser("sim", help="run a program against a DRAM image, write the result")
    sim.add_argument("program", type=Path)
    sim.add_argument("--dram", type=Path, required=True, help="DRAM image to start from")
    sim.add_argument("-o", "--output", type=Path, required=True, help="DRAM image to write")
    sim.add_argument("--hls", action="store_true", help="reject what the FPGA design cannot run")
    sim.set_defaults(handler=cmd_sim)
    for command in (disasm, sim):
        command.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.handler(args))
    except VtaError as err:
        print(f"python -m vta: error: {err}", file=sys.stderr)
        return 1
