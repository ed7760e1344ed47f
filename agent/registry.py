"""The device's models: the persisted state, both cache tiers and the runtime, behind one lock.

``load`` is the only way a module gets into memory: the cache entry is re-verified (signature and
every file's sha256) and loaded with the runtime-only loader, so nothing partially written or
altered on disk is ever run. An entry that fails the check is quarantined (``DamagedError``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.artifact import MANIFEST, Manifest, VerifiedArtifact, load_public_key, verify_unpacked
from agent.cache import DiskCache, Eviction, LfuAging, ModuleCache, Source
from agent.config import AgentConfig
from agent.engines import CPU_ENGINE, TIMING_BUDGET_S, Measured, Ranking, median_ms
from agent.errors import ArtifactError, BoostError
from agent.fpga import Fpga
from agent.fsutil import remove_stale_tmp
from agent.runtime import GoldenReport, LoadedModel, TvmRuntime, golden_check, golden_inputs
from agent.state import DeviceState, ModelSlot
from vta.errors import VtaError

if TYPE_CHECKING:
    from vta.drivers.base import Driver
    from vta.engine import VtaEngine

log = logging.getLogger(__name__)


class Accelerators:
    """The accelerators ``probe_accelerators`` found, the VTA engine behind ``boost.vta.layer``
    that drives one of them, and the board's FPGA when it has one the agent can program."""

    def __init__(self, found: list[dict[str, Any]], config: AgentConfig) -> None:
        from vta.drivers.pynq import BOARDS

        self.found = found
        self.config = config
        self.fpga: Fpga | None = None
        self._fpga_entry: dict[str, Any] = {}
        for accelerator in found:
            if accelerator["kind"] == "vta-fpga" and accelerator["board"] in BOARDS:
                self.fpga = Fpga(config.state_dir, accelerator["board"], config.fpga_root)
                self._fpga_entry = accelerator
                break
        self.current: dict[str, Any] | None = None

    def advertised(self) -> list[dict[str, Any]]:
        """What the capability document lists: the accelerator the engine drives (one VTA
        accelerator serves every VTA build) and those without a design."""
        return [a for a in self.found if not a.get("design") or a is self.current]

    def open_engine(self) -> VtaEngine | None:
        """A VTA engine on the first accelerator (in ``backends`` order) whose driver opens,
        registered as the handler of ``boost.vta.layer``; None when none opens."""
        from vta.engine import VtaEngine, register

        if self.fpga is not None:
            self.fpga.describe(self._fpga_entry)
        self.current = None
        for accelerator in self.found:
            try:
                driver = _driver(accelerator, self.config)
            except VtaError as err:
                log.warning("cannot use %s: %s", accelerator["kind"], err)
                continue
            if driver is None:
                continue
            engine = VtaEngine(driver)
            register(engine)
            self.current = accelerator
            log.info("VTA layers run on %s (design %s)", accelerator["kind"], engine.design)
            return engine
        return None


def _driver(accelerator: dict[str, Any], config: AgentConfig) -> Driver | None:
    kind = accelerator["kind"]
    if kind == "vta-fpga":
        from vta.config import from_design_id
        from vta.drivers.pynq import BOARDS, PynqDriver

        design, board = accelerator.get("design"), BOARDS.get(accelerator["board"])
        if not design or board is None:
            return None
        return PynqDriver(from_design_id(design), board)
    if kind == "vta-serial":
        from vta.drivers.serial import SerialDriver

        return SerialDriver(accelerator["port"], baudrate=config.serial_baud)
    if kind == "vta-sim":
        from vta.config import VtaConfig
        from vta.drivers.sim import SimDriver

        return SimDriver(VtaConfig(), hls=True)
    return None


class UnknownModelError(BoostError):
    """No active model of that name on this device."""


class DamagedError(BoostError):
    """A cache entry failed its check when loaded and was quarantined; ``source`` says where to
    download it again."""

    def __init__(self, digest: str, source: Source | None, reason: str) -> None:
        self.digest = digest
        self.source = source
        again = "it is downloaded again" if source else "deploy it again (its source is unknown)"
        super().__init__(f"cached build {digest[:12]} is damaged ({reason}); {again}")


@dataclass(frozen=True)
class Loaded:
    model: LoadedModel
    artifact: VerifiedArtifact
    digest: str
    load_seconds: float

    def smoke_test(self) -> GoldenReport:
        """The artifact's golden test on the loaded module."""
        golden = self.artifact.manifest.golden
        return golden_check(self.model, self.artifact.path(golden.file), golden.rtol, golden.atol)


class Registry:
    def __init__(
        self,
        config: AgentConfig,
        on_evict: Callable[[Eviction], None],
        vta: VtaEngine | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.on_evict = on_evict
        self.vta = vta
        self._vta_builds: dict[str, str] = {}  # digest -> build id of the layers on the device
        self._mapped: set[str] = set()  # digests whose library this process has loaded
        self.lock = threading.RLock()
        self.state = DeviceState.load(config.state_dir / "state.json")
        policy = LfuAging(config.cache.half_life_s)
        self.disk = DiskCache(config.state_dir / "cache", config.cache.max_bytes, policy, clock)
        self.ram: ModuleCache[Loaded] = ModuleCache(config.cache.ram_max_bytes, policy, clock)
        self.trusted = [load_public_key(path) for path in config.trusted_keys]
        self._runtime: TvmRuntime | None = None
        self.rankings: dict[str, Ranking] = {}  # model name -> its builds in serving order

    def open(self) -> None:
        """Open the disk cache."""
        with self.lock:
            remove_stale_tmp(self.config.state_dir)
            self.disk.open()

    def load_active(self) -> list[DamagedError]:
        """Load every active model again (a restart restores them); returns the damaged ones,
        which were quarantined."""
        damaged = []
        with self.lock:
            for name, slot in list(self.state.models.items()):
                for digest in slot.builds():
                    if digest not in self.disk.entries:
                        log.error("model %s: active build %s is gone from the cache", name, digest)
                        continue
                    try:
                        self.load(digest)
                    except DamagedError as err:
                        damaged.append(err)
                    except BoostError as err:
                        log.error("model %s: cannot load build %s again: %s", name, digest, err)
                self.rank(name)
        return damaged

    @property
    def runtime(self) -> TvmRuntime:
        if self._runtime is None:
            self._runtime = TvmRuntime()
        return self._runtime

    def load(self, digest: str) -> Loaded:
        """The loaded module of a cached artifact (from the RAM tier, or verified and loaded).

        Verification and loading run outside the lock, so inference on other models goes on."""
        with self.lock:
            cached = self.ram.get(digest)
            root = self.disk.path(digest)
        if cached is not None:
            return cached
        start = time.monotonic()
        try:
            verified = verify_unpacked(root, self.trusted)
        except ArtifactError as err:
            with self.lock:
                if digest not in self.disk.entries:
                    raise
                eviction, source = self.disk.quarantine(digest, str(err))
            self.on_evict(eviction)
            raise DamagedError(digest, source, str(err)) from err
        manifest = verified.manifest
        resident = {manifest.library}
        if manifest.target.accelerator:
            resident |= self._upload_vta(digest, verified)
        try:
            model = self.runtime.load(
                verified.path(manifest.library), manifest.inputs, manifest.outputs
            )
        except BoostError:
            self._release(digest)
            raise
        with self.lock:
            self._mapped.add(digest)
        loaded = Loaded(model, verified, digest, time.monotonic() - start)
        size = sum(f.size for f in manifest.files if f.path in resident)
        with self.lock:
            evictions = self.ram.put(digest, loaded, size, self.state.protected())
        for eviction in evictions:
            self._release(eviction.digest)
            self.on_evict(eviction)
        return loaded

    def _upload_vta(self, digest: str, verified: VerifiedArtifact) -> set[str]:
        """Put the artifact's VTA layers on the device; returns the files they came from."""
        from vta.bundle import BLOB, INDEX, Bundle

        needed = verified.manifest.target.accelerator
        if self.vta is None or needed != f"vta:{self.vta.design}":
            have = f"vta:{self.vta.design}" if self.vta is not None else "none enabled"
            raise BoostError(f"the build needs accelerator {needed}; this agent has {have}")
        bundle = Bundle.load(verified.path(INDEX).parent)
        self.vta.add(bundle)
        with self.lock:
            self._vta_builds[digest] = bundle.build_id
        return {INDEX, BLOB}

    def replace_vta(self, reopen: Callable[[], VtaEngine | None]) -> None:
        """Close the VTA engine (every module with layers on it leaves memory; each is loaded
        again, onto the new engine, when next used) and put ``reopen()`` in its place."""
        with self.lock:
            for digest in list(self._vta_builds):
                self.unload(digest)
            if self.vta is not None:
                self.vta.close()
            self.vta = None
            self.vta = reopen()

    def unload(self, digest: str) -> None:
        """Take a module out of memory (it stays in the disk cache)."""
        with self.lock:
            self.ram.drop(digest)
        self._release(digest)

    def _release(self, digest: str) -> None:
        """Free the device memory of a module that left the RAM tier."""
        with self.lock:
            build_id = self._vta_builds.pop(digest, None)
        if build_id is not None and self.vta is not None:
            self.vta.remove(build_id)

    def manifest(self, digest: str) -> Manifest | None:
        """The manifest of a cached build (None when it is not in the cache or unreadable)."""
        path = self.disk.path(digest) / MANIFEST
        try:
            return Manifest.from_json(path.read_bytes(), str(path))
        except (OSError, BoostError):
            return None

    def engine(self, manifest: Manifest) -> str:
        """The engine a build runs on here: the CPU, or the VTA accelerator the agent drives."""
        if not manifest.target.accelerator:
            return CPU_ENGINE
        return f"vta-{self.vta.driver.name}" if self.vta is not None else "vta"

    def rank(self, name: str) -> Ranking | None:
        """Load, golden-test and time every build of model ``name``; the ranking decides which
        build serves it. A deployment calls it without the lock, so other models are served
        meanwhile."""
        with self.lock:
            slot = self.state.models.get(name)
        if slot is None:
            return None
        timed = len(slot.builds()) > 1  # a single build has nothing to be compared with
        measured = [self._measure(digest, timed) for digest in slot.builds()]
        ranking = Ranking(measured, self.config.prefer)
        with self.lock:
            self.rankings[name] = ranking
        log.info("model %s: %s", name, ranking.describe())
        return ranking

    def _measure(self, digest: str, timed: bool) -> Measured:
        manifest = self.manifest(digest)
        if manifest is None:
            return Measured(digest, "?", error="not in the cache")
        engine = self.engine(manifest)
        try:
            loaded = self.load(digest)
            if not timed:
                return Measured(digest, engine)
            report = loaded.smoke_test()
            if not report.passed:
                return Measured(digest, engine, error=report.describe())
            feeds = golden_inputs(loaded.artifact.path(manifest.golden.file))
            latency = median_ms(lambda: loaded.model.run(feeds), budget_s=TIMING_BUDGET_S)
        except Exception as err:  # a driver or runtime failure: this build cannot serve
            return Measured(digest, engine, error=f"{type(err).__name__}: {err}")
        return Measured(digest, engine, latency)

    def active(self, name: str) -> Loaded:
        """The build that serves model ``name``: the first working one of its ranking."""
        with self.lock:
            slot = self.state.models.get(name)
            if slot is None:
                known = ", ".join(sorted(self.state.models)) or "none"
                raise UnknownModelError(
                    f"no active model {name!r} on this device (active: {known})"
                )
            ranking = self.rankings.get(name)
            digest = slot.active
            if ranking is not None:
                serving = ranking.serving()
                if serving is None:
                    raise BoostError(f"model {name}: no build works ({ranking.describe()})")
                digest = serving.digest
            self.disk.lookup(digest)
        return self.load(digest)

    def engine_failed(self, name: str, digest: str, reason: str) -> Measured | None:
        """Take a failing build of ``name`` out of service; returns the build serving instead."""
        with self.lock:
            ranking = self.rankings.get(name)
            if ranking is None:
                return None
            return ranking.fail(digest, reason)

    def make_room(self, need: int, keep: str) -> None:
        """Evict until ``need`` more bytes fit in the cache budget."""
        with self.lock:
            self._evicted(self.disk.make_room(need, self.state.protected() | {keep}))

    def free_disk(self, need: int, keep: str) -> None:
        """Evict until ``need`` bytes are released on a filesystem that is fuller than the budget
        foresaw (when evicting can release that much). The TVM runtime never unmaps a library it
        loaded, so the files of a build loaded since the agent started keep their space until it
        restarts: evicting them would release nothing."""
        with self.lock:
            keep_all = self.state.protected() | {keep} | self._mapped
            self._evicted(self.disk.free_disk(need, keep_all))

    def _evicted(self, evictions: list[Eviction]) -> None:
        for eviction in evictions:
            self.unload(eviction.digest)
            self.on_evict(eviction)

    def evict(self, digest: str) -> Eviction:
        with self.lock:
            if digest in self.state.protected():
                raise BoostError(
                    f"{digest[:12]} is pinned, active or last-good; unpin or undeploy it first"
                )
            if digest not in self.disk.entries:
                raise BoostError(f"{digest[:12]} is not in the cache")
            self.unload(digest)
            eviction = self.disk.remove(digest, "requested")
            self.on_evict(eviction)
            return eviction

    def _describe(self, name: str, slot: ModelSlot) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": slot.version,
            "digest": slot.active,
            "last_good": slot.last_good,
            "loaded": slot.active in self.ram,
            "variants": slot.variants,
        }
        ranking = self.rankings.get(name)
        if ranking is not None:
            out.update(ranking.to_json())
        loaded = self.ram.peek(slot.active)
        if loaded is not None:
            for kind, specs in (("inputs", loaded.model.inputs), ("outputs", loaded.model.outputs)):
                out[kind] = [
                    {"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in specs
                ]
        return out

    def summary(self) -> dict[str, Any]:
        """The retained ``models`` document: active models and the cache."""
        with self.lock:
            return {
                "models": {
                    name: self._describe(name, slot)
                    for name, slot in sorted(self.state.models.items())
                },
                "cache": {
                    "used_bytes": self.disk.used(),
                    "budget_bytes": self.disk.budget,
                    "ram_used_bytes": self.ram.used(),
                    "ram_budget_bytes": self.ram.budget,
                    "entries": [
                        {
                            "digest": e.digest,
                            "model": e.model,
                            "version": e.version,
                            "size": e.size,
                            "pinned": e.digest in self.state.pins,
                        }
                        for e in sorted(self.disk.entries.values(), key=lambda e: e.digest)
                    ],
                },
            }
