"""The two cache tiers: unpacked artifacts on disk, loaded modules in memory.

Both evict by **LFU with aging**, size aware: every use adds one to an entry's count, and the count
halves every ``half_life_s`` seconds, so yesterday's favourite does not squat forever. The victim
is the unprotected entry with the lowest decayed count per byte. Pinned entries and the active and
last-good version of every model are protected: the caller passes them in.

On disk, ``<root>/sha256/<digest>/`` holds one verified artifact (``manifest.json``,
``manifest.sig`` and its payload files). ``<root>/index.json`` keeps the usage counts; it is
written atomically and, when it is missing or damaged, rebuilt from the entry directories (the
counts start again from zero, nothing else is lost). Half-built entries (``.<digest>.tmp``) are
removed when the cache opens. ``source.json`` in each entry says where the artifact came from, so
an entry found damaged when it is loaded is moved to ``<root>/quarantine/`` and downloaded again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Generic, TypeVar

from agent.artifact import MANIFEST, SIGNATURE, Manifest
from agent.errors import ArtifactError, BoostError
from agent.fsutil import atomic_write_json, fsync_dir, remove_stale_tmp

log = logging.getLogger(__name__)

INDEX_VERSION = 1
SOURCE = "source.json"
#: Damaged entries kept for inspection; older ones are deleted.
QUARANTINE_KEEP = 4
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
K = TypeVar("K")
V = TypeVar("V")
Clock = Callable[[], float]


class CacheFullError(BoostError):
    """The budget cannot hold an entry even after evicting everything that may be evicted."""


@dataclass
class Usage:
    size: int
    count: float = 0.0
    stamp: float = 0.0


@dataclass(frozen=True)
class Eviction:
    digest: str
    tier: str
    size: int
    reason: str

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class LfuAging:
    """The eviction policy of both tiers (module docstring)."""

    def __init__(self, half_life_s: float) -> None:
        self.half_life_s = half_life_s

    def decayed(self, usage: Usage, now: float) -> float:
        return usage.count * math.pow(0.5, max(0.0, now - usage.stamp) / self.half_life_s)

    def touch(self, usage: Usage, now: float) -> None:
        usage.count = self.decayed(usage, now) + 1.0
        usage.stamp = now

    def score(self, usage: Usage, now: float) -> float:
        return self.decayed(usage, now) / max(usage.size, 1)

    def victims(
        self,
        usages: Mapping[K, Usage],
        need: int,
        free: int,
        protected: Collection[K],
        now: float,
    ) -> list[K] | None:
        """The entries to evict, lowest score first, so that ``need`` bytes fit in ``free`` plus
        what they release; None when even evicting every unprotected entry is not enough."""
        chosen: list[K] = []
        candidates = sorted(
            (k for k in usages if k not in protected), key=lambda k: self.score(usages[k], now)
        )
        for key in candidates:
            if need <= free:
                break
            chosen.append(key)
            free += usages[key].size
        return chosen if need <= free else None


@dataclass(frozen=True)
class Source:
    """The deploy command that brought an artifact: where it was downloaded from, the size of
    the ``.boost``, and the signed manifest (base64), so a damaged entry can be deployed again."""

    url: str
    size: int
    manifest: str
    signature: str


@dataclass
class CacheEntry:
    digest: str
    model: str
    version: str
    size: int
    installed: float
    usage: Usage
    source: Source | None = None


class DiskCache:
    """Verified, unpacked artifacts under a byte budget."""

    def __init__(self, root: Path, budget: int, policy: LfuAging, clock: Clock = time.time) -> None:
        self.root = root
        self.budget = budget
        self.policy = policy
        self.clock = clock
        self.entries: dict[str, CacheEntry] = {}
        self.hits = 0
        self.misses = 0
        self.evictions: list[Eviction] = []

    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    def path(self, digest: str) -> Path:
        return self.root / "sha256" / digest

    def used(self) -> int:
        return sum(e.size for e in self.entries.values())

    def open(self) -> str:
        """Load the index (or rebuild it) and drop half-built entries; returns what happened."""
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)
        for stale in (self.root / "sha256").glob(".*.tmp"):
            log.info("cache: removing the half-built entry %s", stale.name)
            shutil.rmtree(stale)
        remove_stale_tmp(self.root)
        on_disk = {p.name for p in (self.root / "sha256").iterdir() if _DIGEST.match(p.name)}
        try:
            self.entries = self.read_index()
        except (OSError, ValueError, KeyError, TypeError) as err:
            reason = "missing" if isinstance(err, FileNotFoundError) else f"damaged ({err})"
            self.entries = {}
            outcome = f"index {reason}: rebuilt from {len(on_disk)} entries on disk"
        else:
            outcome = f"index loaded: {len(self.entries)} entries"
        for digest in sorted(set(self.entries) - on_disk):
            log.warning("cache: %s is in the index but not on disk; dropped", digest[:12])
            del self.entries[digest]
        for digest in sorted(on_disk - set(self.entries)):
            self._adopt(digest)
        self.save()
        log.info("cache: %s, %d bytes of %d", outcome, self.used(), self.budget)
        return outcome

    def read_index(self) -> dict[str, CacheEntry]:
        raw = json.loads(self.index_path.read_text())
        if raw["version"] != INDEX_VERSION:
            raise ValueError(f"index version {raw['version']!r}")
        entries = {}
        for digest, e in raw["entries"].items():
            usage = Usage(**e.pop("usage"))
            source = e.pop("source", None)
            entries[digest] = CacheEntry(
                digest=digest, usage=usage, source=Source(**source) if source else None, **e
            )
        return entries

    def _adopt(self, digest: str) -> None:
        """Add an entry found on disk; one whose manifest cannot be read is removed."""
        path = self.path(digest)
        try:
            manifest = Manifest.from_json((path / MANIFEST).read_bytes(), str(path))
        except (OSError, ArtifactError) as err:
            log.warning("cache: removing %s, its manifest is unreadable: %s", digest[:12], err)
            shutil.rmtree(path)
            return
        size = _tree_size(path)
        self.entries[digest] = CacheEntry(
            digest,
            manifest.model_name,
            manifest.model_version,
            size,
            self.clock(),
            Usage(size),
            _read_source(path),
        )

    def save(self) -> None:
        entries = {}
        for digest, e in self.entries.items():
            raw = asdict(e)
            del raw["digest"]
            entries[digest] = raw
        atomic_write_json(self.index_path, {"version": INDEX_VERSION, "entries": entries})

    def lookup(self, digest: str) -> CacheEntry | None:
        entry = self.entries.get(digest)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
            self.policy.touch(entry.usage, self.clock())
        return entry

    def make_room(self, need: int, protected: Collection[str]) -> list[Eviction]:
        """Evict until ``need`` more bytes fit in the budget; raises ``CacheFullError``."""
        chosen = self.policy.victims(
            {d: e.usage for d, e in self.entries.items()},
            need,
            self.budget - self.used(),
            protected,
            self.clock(),
        )
        if chosen is None:
            kept = sorted(d[:12] for d in protected if d in self.entries)
            raise CacheFullError(
                f"the cache budget ([agent.cache] max_bytes = {self.budget}) cannot hold "
                f"{need} more bytes even after evicting every unprotected entry (protected: "
                f"{', '.join(kept) or 'none'}); raise the budget or unpin/undeploy models"
            )
        now = self.clock()
        return [
            self.remove(
                d,
                f"lfu: {self.policy.decayed(self.entries[d].usage, now):.2f} uses per "
                f"{self.entries[d].size} bytes, room for {need} bytes",
            )
            for d in chosen
        ]

    def staging_path(self, digest: str) -> Path:
        return self.root / "sha256" / f".{digest}.tmp"

    def staging(self, digest: str) -> Path:
        """An empty directory to unpack into; ``install`` moves it into place."""
        path = self.staging_path(digest)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def install(
        self, digest: str, staged: Path, manifest: bytes, signature: bytes, source: Source
    ) -> CacheEntry:
        (staged / MANIFEST).write_bytes(manifest)
        (staged / SIGNATURE).write_bytes(signature)
        (staged / SOURCE).write_text(json.dumps(asdict(source)))
        for f in staged.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        staged.rename(self.path(digest))
        fsync_dir(self.path(digest).parent)
        parsed = Manifest.from_json(manifest)
        size = _tree_size(self.path(digest))
        entry = CacheEntry(
            digest, parsed.model_name, parsed.model_version, size, self.clock(), Usage(size), source
        )
        self.policy.touch(entry.usage, self.clock())
        self.entries[digest] = entry
        self.save()
        return entry

    def free_disk(self, need: int, protected: Collection[str]) -> list[Eviction]:
        """Evict until ``need`` bytes are released on the filesystem (whatever the budget says);
        evicts nothing when even every unprotected entry would not be enough."""
        chosen = self.policy.victims(
            {d: e.usage for d, e in self.entries.items()}, need, 0, protected, self.clock()
        )
        return [self.remove(d, f"disk full: room for {need} bytes") for d in chosen or []]

    def remove(self, digest: str, reason: str) -> Eviction:
        entry = self.entries.pop(digest)
        shutil.rmtree(self.path(digest), ignore_errors=True)
        eviction = Eviction(digest, "disk", entry.size, reason)
        self.evictions.append(eviction)
        log.info("cache: evicted %s (%d bytes): %s", digest[:12], entry.size, reason)
        self.save()
        return eviction

    def quarantine(self, digest: str, reason: str) -> tuple[Eviction, Source | None]:
        """Move a damaged entry out of the cache, keeping it under ``quarantine/`` for a look;
        returns the eviction and where the entry came from."""
        entry = self.entries.pop(digest)
        jail = self.root / "quarantine"
        jail.mkdir(exist_ok=True)
        kept = jail / f"{digest}-{int(self.clock())}"
        shutil.rmtree(kept, ignore_errors=True)
        self.path(digest).rename(kept)
        for old in sorted(jail.iterdir(), key=lambda p: p.stat().st_mtime)[:-QUARANTINE_KEEP]:
            shutil.rmtree(old, ignore_errors=True)
        eviction = Eviction(digest, "disk", entry.size, f"damaged, moved to {kept}: {reason}")
        self.evictions.append(eviction)
        log.error("cache: %s is damaged (%s); moved to %s", digest[:12], reason, kept)
        self.save()
        return eviction, entry.source


def _tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _read_source(path: Path) -> Source | None:
    try:
        return Source(**json.loads((path / SOURCE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


class ModuleCache(Generic[V]):
    """Loaded modules under a RAM budget, with the same policy as the disk tier."""

    def __init__(self, budget: int, policy: LfuAging, clock: Clock = time.time) -> None:
        self.budget = budget
        self.policy = policy
        self.clock = clock
        self._items: dict[str, tuple[V, Usage]] = {}
        self.hits = 0
        self.misses = 0

    def __contains__(self, digest: str) -> bool:
        return digest in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def used(self) -> int:
        return sum(u.size for _, u in self._items.values())

    def get(self, digest: str) -> V | None:
        item = self._items.get(digest)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self.policy.touch(item[1], self.clock())
        return item[0]

    def peek(self, digest: str) -> V | None:
        """The value without counting a use."""
        item = self._items.get(digest)
        return None if item is None else item[0]

    def put(self, digest: str, value: V, size: int, protected: Collection[str]) -> list[Eviction]:
        """Keep ``value`` and evict what the budget needs. The new entry is kept even when the
        protected ones leave no room for it: a model being activated must stay loaded."""
        now = self.clock()
        chosen = self.policy.victims(
            {d: u for d, (_, u) in self._items.items()},
            size,
            self.budget - self.used(),
            set(protected) | {digest},
            now,
        )
        if chosen is None:
            chosen = [d for d in self._items if d not in protected and d != digest]
        evictions = []
        for d in chosen:
            _, usage = self._items.pop(d)
            evictions.append(Eviction(d, "ram", usage.size, f"ram budget: room for {size} bytes"))
        usage = Usage(size)
        self.policy.touch(usage, now)
        self._items[digest] = (value, usage)
        return evictions

    def drop(self, digest: str) -> None:
        self._items.pop(digest, None)
