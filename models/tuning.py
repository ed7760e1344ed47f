"""The tuning database: MetaSchedule records keyed by (model digest, exact target, TVM version,
revision of our search spaces).

MetaSchedule's JSON records do not say which target they were measured on, so each key gets a
directory of its own; ``key.json`` in it says what the key is. A later compile with the same key
applies the records without tuning again.

``models/tuning_records/`` ships records made the same way for the zoo models on the CPU classes
their ``key.json`` names: the best record of each workload, gzipped. A compile adds those its key
has to the user's database (so tuning further adds to them); MetaSchedule applies the fastest
record of each workload. The shipped records of the same model and target on other CPUs are
candidates (``CANDIDATES_DIR`` of the key's directory): tuning times them on this machine first
(``tvm_backend``). ``python -m models.tuning ship MODEL.onnx`` puts the user's best record of each
kernel the model compiles to now, for this machine's x86_64 target, there.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import BoostError
from models.tvm_backend import CANDIDATES_DIR, RECORDS_FILE, SPACES, WORKLOADS_FILE

SHIPPED = Path(__file__).parent / "tuning_records"


@dataclass(frozen=True)
class TuningKey:
    model_sha256: str
    target: dict[str, Any]
    tvm_version: str
    spaces: int = SPACES
    """The revision of our search spaces the records were made in (``tvm_backend.SPACES``)."""

    def as_json(self) -> str:
        return json.dumps(
            {
                "model_sha256": self.model_sha256,
                "target": self.target,
                "tvm_version": self.tvm_version,
                "spaces": self.spaces,
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
        """Records for ``key``: the user's, and the shipped ones the user's lack."""
        directory = self.directory(key)
        return len(_lines(directory / RECORDS_FILE)) + len(_new(directory, [self._shipped(key)])[1])

    def prepare(self, key: TuningKey) -> Path:
        """The directory MetaSchedule tunes into, created with its ``key.json`` and given the
        shipped records it lacks: MetaSchedule applies the fastest record of each workload, and
        tuning further adds to them. Its ``CANDIDATES_DIR`` holds the shipped records of the
        same model and target made on other CPUs (none: no such directory)."""
        directory = self.directory(key)
        directory.mkdir(parents=True, exist_ok=True)
        _append(directory, _new(directory, [self._shipped(key)]))
        candidates = directory / CANDIDATES_DIR
        shutil.rmtree(candidates, ignore_errors=True)
        others = [self._shipped(other) for other in self._other_cpus(key)]
        if others:
            candidates.mkdir()
            _append(candidates, _new(candidates, others))
        (directory / "key.json").write_text(key.as_json() + "\n")
        return directory

    def _shipped(self, key: TuningKey) -> tuple[list[bytes], list[bytes]]:
        """The shipped workloads and records of ``key``."""
        return (
            _lines(self.shipped / key.digest / f"{WORKLOADS_FILE}.gz"),
            _lines(self.shipped / key.digest / f"{RECORDS_FILE}.gz"),
        )

    def _other_cpus(self, key: TuningKey) -> list[TuningKey]:
        """The shipped keys of ``key``'s model, TVM version, search spaces and target on
        another CPU (another ``mcpu``, features or core count)."""

        def but_cpu(key: TuningKey) -> tuple[str, str, int, dict[str, Any]]:
            return key.model_sha256, key.tvm_version, key.spaces, _without_cpu(key.target)

        shipped = [TuningKey(**json.loads(p.read_text())) for p in self.shipped.glob("*/key.json")]
        return sorted(
            (other for other in shipped if but_cpu(other) == but_cpu(key) and other != key),
            key=lambda other: other.digest,
        )

    def ship(self, key: TuningKey, used: set[str]) -> Path:
        """Put the best record of each workload in ``used`` (structural hashes: the kernels the
        model compiles to now) among the shipped records of ``key``."""
        directory = self.directory(key)
        records = _lines(directory / RECORDS_FILE)
        if not records:
            raise BoostError(
                f"no tuning records for {key.as_json()} in {self.root}: tune first "
                "(boost-build compile MODEL --tune-trials N)"
            )
        lines = _lines(directory / WORKLOADS_FILE)
        hashes = [_workload_hash(line) for line in lines]
        best: dict[int, tuple[float, list[Any]]] = {}
        for line in records:
            workload, record = json.loads(line)
            run_secs = record[1]
            seconds = sum(run_secs) / len(run_secs) if run_secs else float("inf")
            if hashes[workload] in used and (workload not in best or seconds < best[workload][0]):
                best[workload] = (seconds, record)
        order = sorted(best, key=lambda workload: best[workload][0])
        kept_workloads = b"".join(lines[workload] + b"\n" for workload in order)
        kept = b"".join(
            json.dumps([n, best[workload][1]]).encode() + b"\n" for n, workload in enumerate(order)
        )
        out = self.shipped / key.digest
        out.mkdir(parents=True, exist_ok=True)
        for name, data in ((RECORDS_FILE, kept), (WORKLOADS_FILE, kept_workloads)):
            (out / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
        (out / "key.json").write_text(key.as_json() + "\n")
        return out


#: What a target says of its CPU; the rest (kind, triple, accelerator) must match for records
#: made on one CPU to be candidates on another.
CPU_FIELDS = ("mcpu", "mattr", "num-cores")


def _without_cpu(target: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in target.items() if name not in CPU_FIELDS}


def _new(
    directory: Path, sources: list[tuple[list[bytes], list[bytes]]]
) -> tuple[list[bytes], list[bytes]]:
    """The workloads and records of ``sources`` (each a workload file's and a record file's
    lines) that ``directory``'s records lack, numbered after its workloads."""
    hashes = [_workload_hash(line) for line in _lines(directory / WORKLOADS_FILE)]
    present = set()
    for line in _lines(directory / RECORDS_FILE):
        n, record = json.loads(line)
        present.add((hashes[n], json.dumps(record, sort_keys=True)))
    number = {workload: n for n, workload in enumerate(hashes)}
    workloads: list[bytes] = []
    records: list[bytes] = []
    for source_workloads, source_records in sources:
        for line in source_records:
            n, record = json.loads(line)
            workload = _workload_hash(source_workloads[n])
            entry = (workload, json.dumps(record, sort_keys=True))
            if entry in present:
                continue
            present.add(entry)
            if workload not in number:
                number[workload] = len(hashes) + len(workloads)
                workloads.append(source_workloads[n])
            records.append(json.dumps([number[workload], record]).encode())
    return workloads, records


def _append(directory: Path, lines: tuple[list[bytes], list[bytes]]) -> None:
    for name, new in zip((WORKLOADS_FILE, RECORDS_FILE), lines, strict=True):
        if new:
            with (directory / name).open("ab") as out:
                out.write(b"".join(line + b"\n" for line in new))


def _read(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def _workload_hash(line: bytes) -> str:
    """A workload's structural hash, the first field of its line, which MetaSchedule matches."""
    return str(json.loads(line)[0])


def _lines(path: Path) -> list[bytes]:
    if not path.is_file():
        return []
    return [line for line in _read(path).splitlines() if line.strip()]


def main(argv: list[str]) -> int:
    """``ship MODEL.onnx [TUNING_DB]``: ship the records of MODEL's kernels for this machine's
    x86_64."""
    from models import targets, tvm_backend
    from models.compiler import load_onnx

    if len(argv) not in (2, 3) or argv[0] != "ship":
        print(main.__doc__, file=sys.stderr)
        return 2
    root = Path(argv[2]) if len(argv) == 3 else Path(".boost/tuning")
    try:
        model, digest = load_onnx(Path(argv[1]))
        target = targets.resolve("x86_64").tvm_dict()
        key = TuningKey(digest, target, tvm_backend.version())
        used = tvm_backend.workload_hashes(tvm_backend.import_onnx(model, argv[1]), target)
        out = TuningDatabase(root).ship(key, used)
    except BoostError as err:
        print(f"models.tuning: error: {err}", file=sys.stderr)
        return 1
    print(f"{out}: {len(_lines(out / (RECORDS_FILE + '.gz')))} records")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
