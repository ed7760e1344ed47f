"""``python -m vta disasm|sim|header``: read programs, run them, generate the firmware's C header.

``disasm PROGRAM|ARTIFACT`` prints a program; ``sim PROGRAM --dram IMAGE -o OUT`` runs one;
``header -o vta_hw.h [--check]`` writes (or checks) the firmware's ISA header.

A program file is raw little-endian 128-bit instructions; a DRAM image is a raw byte file whose
byte offset is the physical address. Both commands take ``--config VTA_CONFIG.json`` (default:
the published ``1x16_i8w8a32_15_15_18_17`` design). ``disasm`` also reads a ``.boost`` artifact
built ``--target vta`` and prints the program of every layer (or of ``--layer N``), in the
design the artifact names, with arena-relative DRAM addresses.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vta import cheader, isa
from vta import config as vta_config
from vta.bundle import BLOB, INDEX, Bundle
from vta.errors import VtaError
from vta.sim import Dram, Simulator


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise VtaError(f"{path}: cannot read the {what}: {err.strerror}") from err


def cmd_disasm(args: argparse.Namespace) -> int:
    if tarfile.is_tarfile(args.program):
        return _disasm_artifact(args.program, args.layer)
    cfg = vta_config.load(args.config)
    insns = isa.decode_program(_read(args.program, "program"), cfg)
    print(f"# {len(insns)} instructions, design {cfg.bitstream_id}")
    for line in isa.disassemble_program(insns, cfg):
        print(line)
    return 0


def _disasm_artifact(path: Path, only: int | None) -> int:
    with tempfile.TemporaryDirectory(prefix="vta-disasm-") as tmp:
        try:
            with tarfile.open(path) as tar:
                for name in (INDEX, BLOB):
                    member = tar.extractfile(name)
                    if member is None:
                        raise KeyError(name)
                    (Path(tmp) / name).write_bytes(member.read())
        except KeyError as err:
            raise VtaError(f"{path}: no {err.args[0]}: not an artifact built --target vta") from err
        except (OSError, tarfile.TarError) as err:
            raise VtaError(f"{path}: cannot read the artifact: {err}") from err
        bundle = Bundle.load(Path(tmp))
    layers = list(enumerate(bundle.layers))
    if only is not None:
        if not 0 <= only < len(layers):
            raise VtaError(f"--layer {only}: the artifact has layers 0..{len(layers) - 1}")
        layers = [layers[only]]
    for index, layer in layers:
        spec, t = layer.spec, layer.tiling
        kind = "dense" if (spec.height, spec.width, spec.kernel) == (1, 1, (1, 1)) else "conv2d"
        print(
            f"# layer {index}: {kind} {spec.in_channels}->{spec.out_channels} "
            f"{spec.height}x{spec.width} kernel {spec.kernel[0]}x{spec.kernel[1]} stride "
            f"{spec.stride[0]}, tiles of {t.oc_blocks} oc x {t.ic_blocks} ic blocks x "
            f"{t.rows}x{t.cols}, {len(layer.insns)} instructions, {layer.uop_count} micro-ops, "
            f"design {bundle.design}"
        )
        for line in isa.disassemble_program(layer.insns, bundle.config):
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


def cmd_header(args: argparse.Namespace) -> int:
    text = cheader.render(vta_config.load(args.config))
    if args.check:
        try:
            current = args.output.read_text()
        except OSError as err:
            raise VtaError(f"{args.output}: cannot read the header: {err.strerror}") from err
        if current != text:
            raise VtaError(
                f"{args.output} is stale: it does not match vta/isa.py and the configuration; "
                f"regenerate it with `python -m vta header -o {args.output}`"
            )
        return 0
    try:
        args.output.write_text(text)
    except OSError as err:
        raise VtaError(f"{args.output}: cannot write the header: {err.strerror}") from err
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vta", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", type=Path, default=None, help="VTA configuration JSON (default: 1x16 design)"
    )
    sub = parser.add_subparsers(metavar="COMMAND")
    disasm = sub.add_parser("disasm", help="print a program readably, one instruction a line")
    disasm.add_argument("program", type=Path, help="raw program, or a .boost artifact")
    disasm.add_argument("--layer", type=int, help="with an artifact: only this layer")
    disasm.set_defaults(handler=cmd_disasm)
    sim = sub.add_parser("sim", help="run a program against a DRAM image, write the result")
    sim.add_argument("program", type=Path)
    sim.add_argument("--dram", type=Path, required=True, help="DRAM image to start from")
    sim.add_argument("-o", "--output", type=Path, required=True, help="DRAM image to write")
    sim.add_argument("--hls", action="store_true", help="reject what the FPGA design cannot run")
    sim.set_defaults(handler=cmd_sim)
    header = sub.add_parser("header", help="write the firmware's C header of the ISA")
    header.add_argument("-o", "--output", type=Path, required=True, help="header file")
    header.add_argument("--check", action="store_true", help="fail if the file is not current")
    header.set_defaults(handler=cmd_header)
    for command in (disasm, sim, header):
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
