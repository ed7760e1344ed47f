"""What the device has been told to do, kept across restarts in ``<state_dir>/state.json``:
the active builds (one per engine) and last-good version of every model, pins, the outcome of
recent deployments (so a repeated ``deploy_id`` is answered, not redone) and the birth/death
sequence number."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.fsutil import atomic_write_json

log = logging.getLogger(__name__)

STATE_VERSION = 1
KEEP_DEPLOYS = 256


@dataclass
class ModelSlot:
    active: str
    version: str
    last_good: str | None = None
    #: The other builds of this version kept beside ``active``, one per engine (``agent/engines``).
    variants: list[str] = field(default_factory=list)

    def builds(self) -> list[str]:
        """Every build of the active version: ``active`` first, then the variants."""
        return [self.active, *self.variants]


@dataclass
class DeviceState:
    path: Path
    models: dict[str, ModelSlot] = field(default_factory=dict)
    pins: set[str] = field(default_factory=set)
    deploys: dict[str, dict[str, Any]] = field(default_factory=dict)
    bdseq: int = 0

    @classmethod
    def load(cls, path: Path, repair: bool = True) -> DeviceState:
        """The saved state. With ``repair``, a damaged file is kept aside as
        ``state.json.damaged`` and the device starts with no active models (the cache still holds
        every artifact); without it, the damage is raised as ``ValueError``."""
        try:
            raw = json.loads(path.read_text())
            if raw["version"] != STATE_VERSION:
                raise ValueError(f"state version {raw['version']!r}")
            return cls(
                path,
                models={name: ModelSlot(**slot) for name, slot in raw["models"].items()},
                pins=set(raw["pins"]),
                deploys=dict(raw["deploys"]),
                bdseq=int(raw["bdseq"]),
            )
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            if not repair:
                raise ValueError(f"{path}: damaged ({err})") from err
            damaged = path.with_name(path.name + ".damaged")
            log.error("%s is damaged (%s); kept as %s, starting empty", path, err, damaged)
            path.replace(damaged)
            return cls(path)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.path,
            {
                "version": STATE_VERSION,
                "models": {name: asdict(slot) for name, slot in self.models.items()},
                "pins": sorted(self.pins),
                "deploys": self.deploys,
                "bdseq": self.bdseq,
            },
        )

    def protected(self) -> set[str]:
        """Digests no cache tier may evict: pins, and every model's builds and last-good."""
        out = set(self.pins)
        for slot in self.models.values():
            out.update(slot.builds())
            if slot.last_good:
                out.add(slot.last_good)
        return out

    def record_deploy(self, deploy_id: str, outcome: dict[str, Any]) -> None:
        self.deploys[deploy_id] = outcome
        while len(self.deploys) > KEEP_DEPLOYS:
            del self.deploys[next(iter(self.deploys))]
        self.save()
