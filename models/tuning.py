"""The tuning database: MetaSchedule records keyed by (model digest, exact target, TVM version).

MetaSchedule's JSON records do not say which target they were measured on, so each key gets a
directory of its own; ``key.json`` in it says what the key is. A later compile with the same key
applies the records without tuning again.

``models/tuning_records/`` ships records made the same way for the zoo models on the CPU classes
their ``key.json`` names. A compile whose key has no records in the user's database starts from
the shipped ones (copied in, so tuning further adds to them).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.tvm_backend import RECORDS_FILE, WORKLOADS_FILE

SHIPPED = Path(__file__).parent / "tuning_records"


@dataclass(frozen=True)
class TuningKey:
    model_sha256: str
    target: dict[str, Any]
    tvm_version: str

    def as_json(self) -> str:
        return json.dumps(
            {
                "model_sha256": self.model_sha256,
                "target": self.target,
                "tvm_version": self.tvm_version,
            },
            sort_keys=True,
        )

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.as_json().encode()).hexdigest()[:24]


class TuningDatabase:
    def __init__(self, root: Path, shipped: Path = SHIPPED) -> None:
        self.root = root
        self.shipped = shipped

    def directory(self, key: TuningKey) -> Path:
        return self.root / key.digest

    def record_count(self, key: TuningKey) -> int:
        """Records for ``key``: the user's, else the shipped ones."""
        return _count(self.directory(key)) or _count(self.shipped / key.digest)

    def prepare(self, key: TuningKey) -> Path:
        """The directory MetaSchedule tunes into, created with its ``key.json`` and, when it has
        no records yet, the shipped records of the key."""
        directory = self.directory(key)
        directory.mkdir(parents=True, exist_ok=True)
        shipped = self.shipped / key.digest
        if not _count(directory) and _count(shipped):
            for name in (WORKLOADS_FILE, RECORDS_FILE):
                shutil.copyfile(shipped / name, directory / name)
        (directory / "key.json").write_text(key.as_json() + "\n")
        return directory


def _count(directory: Path) -> int:
    path = directory / RECORDS_FILE
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())
