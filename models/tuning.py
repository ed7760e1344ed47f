"""The tuning database: MetaSchedule records keyed by (model digest, exact target, TVM version).

MetaSchedule's JSON records do not say which target they were measured on, so each key gets a
directory of its own; ``key.json`` in it says what the key is. A later compile with the same key
applies the records without tuning again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.tvm_backend import RECORDS_FILE


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
    def __init__(self, root: Path) -> None:
        self.root = root

    def directory(self, key: TuningKey) -> Path:
        return self.root / key.digest

    def record_count(self, key: TuningKey) -> int:
        path = self.directory(key) / RECORDS_FILE
        if not path.is_file():
            return 0
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())

    def prepare(self, key: TuningKey) -> Path:
        """The directory MetaSchedule tunes into, created with its ``key.json``."""
        directory = self.directory(key)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "key.json").write_text(key.as_json() + "\n")
        return directory
