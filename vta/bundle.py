"""The VTA part of an artifact: every lowered layer of one model, in two files.

``vta.json`` names the design, the build id the compiled library calls the layers by, and each
layer's shape, tiling and arena map; ``vta.bin`` holds the programs (raw 128-bit instructions, as
``python -m vta disasm`` reads them) and the constant images, at the offsets the JSON gives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vta import isa
from vta.config import VtaConfig
from vta.errors import VtaError
from vta.lower import ConvSpec, LoweredLayer, Region, Tiling

INDEX = "vta.json"
BLOB = "vta.bin"
FORMAT = 1


@dataclass(frozen=True)
class Bundle:
    build_id: str
    config: VtaConfig
    layers: tuple[LoweredLayer, ...]

    @property
    def design(self) -> str:
        return self.config.bitstream_id

    def key(self, index: int) -> str:
        """What the compiled library passes to ``boost.vta.layer`` for layer ``index``."""
        return f"{self.build_id}/{index}"

    def save(self, directory: Path) -> tuple[Path, Path]:
        blob = bytearray()

        def put(data: bytes) -> list[int]:
            span = [len(blob), len(data)]
            blob.extend(data)
            return span

        layers = []
        for layer in self.layers:
            layers.append(
                {
                    "spec": layer.spec.to_dict(),
                    "tiling": vars(layer.tiling),
                    "arena_bytes": layer.arena_bytes,
                    "input": vars(layer.input),
                    "residual": None if layer.residual is None else vars(layer.residual),
                    "output": vars(layer.output),
                    "constants": vars(layer.constants),
                    "uop_count": layer.uop_count,
                    "program": put(isa.encode_program(layer.insns, self.config)),
                    "image": put(layer.image),
                    "counts": layer.counts(),
                }
            )
        index = {
            "format": FORMAT,
            "design": self.design,
            "config": self.config.to_dict(),
            "build_id": self.build_id,
            "layers": layers,
        }
        (directory / INDEX).write_text(json.dumps(index, indent=1) + "\n")
        (directory / BLOB).write_bytes(bytes(blob))
        return directory / INDEX, directory / BLOB

    @classmethod
    def load(cls, directory: Path) -> Bundle:
        try:
            index = json.loads((directory / INDEX).read_text())
            blob = (directory / BLOB).read_bytes()
        except (OSError, ValueError) as err:
            raise VtaError(f"{directory}: cannot read the VTA layers: {err}") from err
        try:
            if index["format"] != FORMAT:
                raise VtaError(
                    f"{directory / INDEX}: format {index['format']} (this reader knows {FORMAT})"
                )
            config = VtaConfig.from_dict(index["config"], str(directory / INDEX))
            return cls(
                build_id=index["build_id"],
                config=config,
                layers=tuple(_layer(raw, blob, config) for raw in index["layers"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise VtaError(f"{directory / INDEX}: malformed VTA layer index ({err!r})") from err


def _slice(blob: bytes, span: list[int]) -> bytes:
    start, size = span
    if start < 0 or size < 0 or start + size > len(blob):
        raise VtaError(f"a layer names bytes {start}..{start + size} of a {len(blob)}-byte blob")
    return blob[start : start + size]


def _layer(raw: dict[str, Any], blob: bytes, config: VtaConfig) -> LoweredLayer:
    return LoweredLayer(
        spec=ConvSpec.from_dict(raw["spec"]),
        tiling=Tiling(**raw["tiling"]),
        insns=tuple(isa.decode_program(_slice(blob, raw["program"]), config)),
        constants=Region(**raw["constants"]),
        image=_slice(blob, raw["image"]),
        arena_bytes=raw["arena_bytes"],
        input=Region(**raw["input"]),
        residual=None if raw["residual"] is None else Region(**raw["residual"]),
        output=Region(**raw["output"]),
        uop_count=raw["uop_count"],
    )
