"""The on-demand builds this device asked the build workers for (``models/worker.py``).

Kept in ``<state_dir>/builds.json`` so that the deploy command answering a request is recognised
after a restart too: a deploy command naming a ``build_request`` is taken only when this device
made that request, which stops a device from pushing a model onto another one by asking for a build
in its name. Each request goes through ``requested → building → built → active`` (or ends
``failed`` with the worker's or the deployment's error).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from agent.fsutil import atomic_write_json

log = logging.getLogger(__name__)

#: States in which a request still waits for its build.
WAITING = frozenset({"requested", "building", "built"})
#: Records kept (the oldest finished ones go first).
KEPT = 256


@dataclass(frozen=True)
class BuildRecord:
    request_id: str
    sha256: str
    name: str
    state: str
    detail: str
    ts: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class BuildRequests:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._records: dict[str, BuildRecord] = {}
        try:
            raw = json.loads(path.read_text())
            self._records = {r["request_id"]: BuildRecord(**r) for r in raw}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError) as err:
            log.error("%s is damaged (%s); on-demand build requests start afresh", path, err)

    def waiting_for(self, sha256: str) -> BuildRecord | None:
        """The request still waiting for a build of the model ``sha256``, if any."""
        with self._lock:
            for record in self._records.values():
                if record.sha256 == sha256 and record.state in WAITING:
                    return record
        return None

    def latest(self, sha256: str) -> BuildRecord | None:
        with self._lock:
            matching = [r for r in self._records.values() if r.sha256 == sha256]
        return max(matching, key=lambda r: r.ts, default=None)

    def expects(self, request_id: str) -> bool:
        """Whether a deploy command naming ``request_id`` answers a request of this device."""
        with self._lock:
            record = self._records.get(request_id)
        return record is not None and record.state in WAITING

    def add(self, request_id: str, sha256: str, name: str) -> BuildRecord:
        record = BuildRecord(request_id, sha256, name, "requested", "", time.time())
        with self._lock:
            self._records[request_id] = record
            for old in sorted(self._records.values(), key=lambda r: r.ts)[:-KEPT]:
                del self._records[old.request_id]
            self._save()
        return record

    def update(self, request_id: str, state: str, detail: str = "") -> None:
        with self._lock:
            record = self._records.get(request_id)
            if record is None or record.state not in WAITING:
                return  # a late progress message after the outcome
            self._records[request_id] = replace(record, state=state, detail=detail, ts=time.time())
            self._save()
        log.info("build request %s: %s %s", request_id, state, detail)

    def _save(self) -> None:
        atomic_write_json(self.path, [r.to_json() for r in self._records.values()])
