"""Deployments: one explicit transition table, and the pipeline that walks it.

::

    accepted ──> rejected                       (signature, compatibility, URL, space: no download)
        │  └───> active                         (this build is already active: nothing to do)
        │  └───> loading | programming          (the build is in the cache: re-verified on load)
        v
    downloading > verifying > installing > [programming] > loading > smoke-testing > active
        ^                                                     │
        └─────────────────────────────────────────────────────┘ (the cached copy was damaged)
    any phase ─> rolled-back | failed

``programming`` happens when the build carries a bitstream for this board's FPGA and the FPGA
does not hold its design: the bitstream is downloaded (unless the device keeps it), loaded and
checked; if that or the build's smoke test fails, the FPGA goes back to the bitstream it held.

A failure after acceptance ends in ``rolled-back`` when the model has an active version (it keeps
serving) and in ``failed`` when it has none. Every transition is published as an event carrying the
request id, the deploy id and a sequence number that rises by one per event of the deployment.

A deploy command is written to ``<state_dir>/pending/`` before the broker learns it arrived and
removed once its outcome is recorded, so a deployment cut short by a crash or a power loss runs
again after the restart (``PendingDeploys``). A step that makes no progress for ``[agent]
step_timeout_s`` is abandoned: the deployment ends with a ``timeout`` error and the next one runs.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.artifact import (
    MANIFEST,
    Manifest,
    open_artifact,
    read_manifest,
    signed_manifest,
    verify_signature,
)
from agent.cache import CacheFullError, Source
from agent.capabilities import incompatibilities
from agent.config import AgentConfig
from agent.download import DiskFullError, DownloadError, DownloadPolicy, download, url_allowed
from agent.errors import ArtifactError, BoostError, SignatureError
from agent.fpga import FpgaError
from agent.fsutil import atomic_write_json
from agent.protocol import Command, ProtocolError, check_name, new_request_id, now
from agent.registry import Accelerators, DamagedError, Loaded, Registry
from agent.state import ModelSlot

if TYPE_CHECKING:
    from vta.bitstreams import BitstreamRef
    from vta.engine import VtaEngine

log = logging.getLogger(__name__)

# Bytes kept free on the state directory's filesystem beyond what a deployment needs.
DISK_MARGIN = 16 * 1024**2
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Phase(str, Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    PROGRAMMING = "programming"
    LOADING = "loading"
    SMOKE_TESTING = "smoke-testing"
    ACTIVE = "active"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"


_FAILURE = frozenset({Phase.ROLLED_BACK, Phase.FAILED})
TRANSITIONS: Mapping[Phase, frozenset[Phase]] = {
    Phase.ACCEPTED: frozenset(
        {Phase.REJECTED, Phase.ACTIVE, Phase.LOADING, Phase.PROGRAMMING, Phase.DOWNLOADING}
    )
    | _FAILURE,
    Phase.DOWNLOADING: frozenset({Phase.VERIFYING}) | _FAILURE,
    Phase.VERIFYING: frozenset({Phase.INSTALLING}) | _FAILURE,
    Phase.INSTALLING: frozenset({Phase.PROGRAMMING, Phase.LOADING}) | _FAILURE,
    Phase.PROGRAMMING: frozenset({Phase.LOADING}) | _FAILURE,
    Phase.LOADING: frozenset({Phase.SMOKE_TESTING, Phase.DOWNLOADING}) | _FAILURE,
    Phase.SMOKE_TESTING: frozenset({Phase.ACTIVE}) | _FAILURE,
    Phase.REJECTED: frozenset(),
    Phase.ACTIVE: frozenset(),
    Phase.ROLLED_BACK: frozenset(),
    Phase.FAILED: frozenset(),
}
TERMINAL = frozenset(phase for phase, after in TRANSITIONS.items() if not after)

Emit = Callable[[dict[str, Any], bool], None]
"""Publishes one event; the flag says it is the deployment's final one."""


class DeployError(BoostError):
    """Why a deployment stops; ``code`` goes into the final event's error."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


class Abandoned(Exception):  # noqa: N818 - a signal to the abandoned thread, not an error
    """Raised in a deployment's thread once the deployment was given up (no progress)."""


def deploy_id_of(command: Command) -> str:
    deploy_id = command.body.get("deploy_id")
    if isinstance(deploy_id, str) and 0 < len(deploy_id) <= 128:
        return deploy_id
    return command.request_id


class Deployment:
    """The events of one deployment; refuses any transition the table does not have.

    ``last_event`` (monotonic seconds) tells the watchdog whether it still makes progress; once
    ``cancelled`` every further event raises ``Abandoned`` in the thread that carries it out."""

    def __init__(self, request_id: str, deploy_id: str, emit: Emit) -> None:
        self.request_id = request_id
        self.deploy_id = deploy_id
        self.emit = emit
        self.phase: Phase | None = None
        self.seq = 0
        self.about: dict[str, Any] = {}
        self.had_active = False
        self.cancelled = False
        self.committed = False
        self.last_event = time.monotonic()
        self.last: dict[str, Any] = {}
        self._lock = threading.Lock()

    def enter(
        self, phase: Phase, detail: str = "", abandoning: bool = False, **extra: Any
    ) -> dict[str, Any]:
        with self._lock:
            if self.cancelled and not abandoning:
                raise Abandoned(self.deploy_id)
            allowed = TRANSITIONS[self.phase] if self.phase else frozenset({Phase.ACCEPTED})
            if phase not in allowed:
                raise AssertionError(f"deployment cannot go from {self.phase} to {phase}")
            self.phase = phase
            return self._publish(detail, extra)

    def publish(self, detail: str = "", **extra: Any) -> dict[str, Any]:
        with self._lock:
            if self.cancelled:
                raise Abandoned(self.deploy_id)
            return self._publish(detail, extra)

    def _publish(self, detail: str, extra: dict[str, Any]) -> dict[str, Any]:
        assert self.phase is not None
        self.seq += 1
        self.last_event = time.monotonic()
        event = {
            "request_id": self.request_id,
            "deploy_id": self.deploy_id,
            "seq": self.seq,
            "state": self.phase.value,
            "detail": detail,
            "ts": now(),
            **self.about,
            **extra,
        }
        self.last = event
        self.emit(event, self.phase in TERMINAL)
        return event


class PendingDeploys:
    """Deploy commands received and not yet finished, one file each under ``directory``."""

    #: A deployment the agent died in this many times is given up (a crash loop must end).
    MAX_ATTEMPTS = 3

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, command: Command) -> Path:
        name = hashlib.sha256(deploy_id_of(command).encode()).hexdigest()
        return self.directory / f"{name}.json"

    def add(self, command: Command, attempts: int = 0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {
            "request_id": command.request_id,
            "reply_to": command.reply_to,
            "body": dict(command.body),
            "attempts": attempts,
        }
        atomic_write_json(self._path(command), record)

    def done(self, command: Command) -> None:
        self._path(command).unlink(missing_ok=True)

    def resume(self) -> list[tuple[Command, int]]:
        """The unfinished commands, oldest first, with how often the agent already started each
        (the count is raised on disk now)."""
        if not self.directory.is_dir():
            return []
        out = []
        for path in sorted(self.directory.glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                raw = json.loads(path.read_text())
                command = Command("deploy", raw["request_id"], raw["reply_to"], raw["body"])
                attempts = int(raw["attempts"]) + 1
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.error("%s is damaged (%s); removed", path, err)
                path.unlink(missing_ok=True)
                continue
            self.add(command, attempts)
            out.append((command, attempts))
        return out


@dataclass(frozen=True)
class Plan:
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    url: str
    sha256: str
    size: int
    pin: bool
    #: The bitstream to program first, and where to get it when the device does not keep it.
    program: bool = False
    bitstream_url: str | None = None


class Deployer:
    def __init__(
        self,
        registry: Registry,
        config: AgentConfig,
        capabilities: Callable[[], dict[str, Any]],
        accelerators: Accelerators | None = None,
        policy: DownloadPolicy | None = None,
    ) -> None:
        self.registry = registry
        self.config = config
        self.capabilities = capabilities
        self.accelerators = accelerators
        self.policy = policy or DownloadPolicy()
        self.downloads = config.state_dir / "downloads"
        #: Digests an abandoned deployment's thread may still be writing.
        self._busy: set[str] = set()

    def run(self, command: Command, emit: Emit, step_timeout_s: float) -> dict[str, Any]:
        """Carry out one deploy command on a thread of its own; returns its final event. The
        deployment is abandoned when no event comes for ``step_timeout_s``."""
        deploy_id = deploy_id_of(command)
        with self.registry.lock:
            done = self.registry.state.deploys.get(deploy_id)
        if done is not None:
            replay = {**done, "request_id": command.request_id, "duplicate": True, "ts": now()}
            emit(replay, True)
            return replay
        deployment = Deployment(command.request_id, deploy_id, emit)
        result: list[dict[str, Any]] = []

        def carry_out() -> None:
            try:
                result.append(self._run(command, deployment))
            except Abandoned:
                log.warning("deploy %s: the abandoned step ended", deploy_id)
            finally:
                if deployment.cancelled:
                    self._busy.discard(deployment.about.get("digest", ""))

        worker = threading.Thread(target=carry_out, name=f"deploy-{deploy_id[:8]}", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(min(1.0, step_timeout_s / 4))
            if worker.is_alive() and time.monotonic() - deployment.last_event > step_timeout_s:
                final = self._abandon(deployment, step_timeout_s)
                if final is not None:
                    return final
        return result[0]

    def fail(self, command: Command, emit: Emit, code: str, message: str) -> dict[str, Any]:
        """End a deployment that cannot be carried out with ``failed``."""
        deployment = Deployment(command.request_id, deploy_id_of(command), emit)
        deployment.enter(Phase.ACCEPTED)
        return self._finish(deployment, Phase.FAILED, DeployError(code, message))

    def _abandon(self, deployment: Deployment, step_timeout_s: float) -> dict[str, Any] | None:
        """Give up a deployment stuck in a step; None when it already activated its build (its
        final event is on the way)."""
        with self.registry.lock:
            if deployment.committed:
                return None
            deployment.cancelled = True
            if "digest" in deployment.about:
                self._busy.add(deployment.about["digest"])
        assert deployment.phase is not None
        failure = DeployError(
            "timeout",
            f"{deployment.phase.value}: no progress for {step_timeout_s:g} s; the step was "
            "abandoned (see [agent] step_timeout_s)",
        )
        outcome = Phase.ROLLED_BACK if deployment.had_active else Phase.FAILED
        return self._finish(deployment, outcome, failure, abandoning=True)

    def _run(self, command: Command, deployment: Deployment) -> dict[str, Any]:
        try:
            return self._pipeline(command, deployment)
        except Abandoned:
            raise
        except Exception:  # a bug must not leave the build host waiting: report it
            log.exception("deploy %s crashed", deployment.deploy_id)
            if deployment.phase in TERMINAL:
                return deployment.last
            if deployment.phase is None:
                deployment.enter(Phase.ACCEPTED)
            internal = DeployError("internal", "the deployment crashed; see the agent's log")
            return self._finish(deployment, Phase.FAILED, internal)

    def _pipeline(self, command: Command, deployment: Deployment) -> dict[str, Any]:
        deployment.enter(Phase.ACCEPTED)
        try:
            plan = self._check(command)
        except DeployError as failure:
            return self._finish(deployment, Phase.REJECTED, failure)
        manifest = plan.manifest
        deployment.about = {
            "model": manifest.model_name,
            "version": manifest.model_version,
            "digest": plan.sha256,
        }
        with self.registry.lock:
            slot = self.registry.state.models.get(manifest.model_name)
            cached = plan.sha256 in self.registry.disk.entries
        deployment.had_active = slot is not None
        if slot is not None and slot.active == plan.sha256 and cached:
            self._pin(plan)
            final = deployment.enter(Phase.ACTIVE, "already active")
            self._record(deployment, final)
            return final
        programmed = False
        try:
            self._fetch(deployment, plan)
            if plan.program:
                self._program(deployment, plan)
                programmed = True
            loaded = self._load(deployment, plan)
            deployment.enter(Phase.SMOKE_TESTING, load_ms=round(loaded.load_seconds * 1e3, 2))
            report = loaded.smoke_test()
            if not report.passed:
                raise DeployError("smoke-test", report.describe())
            self._activate(deployment, plan)
            ranking = self.registry.rank(manifest.model_name)
            engines = ranking.to_json() if ranking is not None else {}
            final = deployment.enter(Phase.ACTIVE, report.describe(), **engines)
            self._record(deployment, final)
            return final
        except (BoostError, OSError) as err:
            stop = _stop_reason(err)
            if programmed:
                stop.message += f"; {self._revert_fpga()}"
            outcome = Phase.ROLLED_BACK if slot is not None else Phase.FAILED
            return self._finish(deployment, outcome, stop)

    def _load(self, deployment: Deployment, plan: Plan) -> Loaded:
        """Load the installed build; a cached copy found damaged (and quarantined) is
        downloaded again, once."""
        deployment.enter(Phase.LOADING)
        try:
            return self.registry.load(plan.sha256)
        except DamagedError as err:
            log.warning("deploy %s: %s", deployment.deploy_id, err)
            self._check_space(plan.sha256, plan.size, _unpacked_size(plan))
            self._fetch(deployment, plan)
            deployment.enter(Phase.LOADING)
            return self.registry.load(plan.sha256)

    def _check(self, command: Command) -> Plan:
        """Everything that can be decided before a byte is downloaded."""
        try:
            manifest_bytes, signature = command.blob("manifest"), command.blob("signature")
            url, sha256, size = command.text("url"), command.text("sha256"), command.integer("size")
        except ProtocolError as err:
            raise DeployError(err.code, err.message) from err
        pin = command.body.get("pin", False) is True
        if not _SHA256.match(sha256):
            raise DeployError("bad-request", f"sha256 {sha256!r} is not 64 lowercase hex digits")
        if sha256 in self._busy:
            raise DeployError(
                "busy",
                f"an abandoned deployment of {sha256[:12]} is still stuck in a step; try later",
            )
        try:
            verify_signature(manifest_bytes, signature, self.registry.trusted, "deploy command")
            manifest = Manifest.from_json(manifest_bytes, "deploy command")
            check_name("model name", manifest.model_name)
        except SignatureError as err:
            raise DeployError("untrusted", str(err)) from err
        except (ArtifactError, ProtocolError) as err:
            raise DeployError("bad-manifest", str(err)) from err
        if not url_allowed(url, self.config.allowed_hosts):
            raise DeployError(
                "url-not-allowed",
                f"{url} is not under an allowed build host "
                f"({', '.join(self.config.allowed_hosts) or 'none'}); see [agent] allowed_hosts",
            )
        problems = incompatibilities(manifest, self.capabilities())
        if problems:
            raise DeployError("incompatible", "; ".join(problems))
        program, bitstream_url = self._check_bitstream(command, manifest)
        plan = Plan(
            manifest, manifest_bytes, signature, url, sha256, size, pin, program, bitstream_url
        )
        if sha256 not in self.registry.disk.entries:
            self._check_space(sha256, size, _unpacked_size(plan))
        elif self._cached_manifest(sha256) not in (None, manifest_bytes):
            raise DeployError(
                "artifact",
                f"the deploy command's manifest is not the one of the cached build {sha256[:12]}; "
                "a manifest must come with the digest of its own artifact",
            )
        return plan

    def _cached_manifest(self, sha256: str) -> bytes | None:
        """The manifest a cached build was installed with (None when unreadable: loading it
        will find the entry damaged and download it again, checking the manifest then)."""
        try:
            return (self.registry.disk.path(sha256) / MANIFEST).read_bytes()
        except OSError:
            return None

    def _check_bitstream(self, command: Command, manifest: Manifest) -> tuple[bool, str | None]:
        """Whether the FPGA must be programmed for this build, and the URL to download the
        bitstream from when the device does not keep it."""
        ref = manifest.bitstream
        fpga = self.accelerators.fpga if self.accelerators is not None else None
        if ref is None or fpga is None or ref.board != fpga.board.name:
            return False, None
        loaded = fpga.loaded
        if loaded is not None and loaded.design == ref.design:
            return False, None
        if fpga.has(ref):
            return True, None
        url = command.body.get("bitstream_url")
        if not isinstance(url, str) or not url:
            raise DeployError(
                "bitstream",
                f"the build needs the {ref.board} bitstream of design {ref.design}, which this "
                "device does not have, and the deploy command has no bitstream_url",
            )
        if not url_allowed(url, self.config.allowed_hosts):
            raise DeployError(
                "url-not-allowed",
                f"bitstream {url} is not under an allowed build host; see [agent] allowed_hosts",
            )
        return True, url

    def _program(self, deployment: Deployment, plan: Plan) -> None:
        """Download the build's bitstream if needed and program the FPGA with it; on failure the
        FPGA goes back to what it held."""
        assert self.accelerators is not None and self.accelerators.fpga is not None
        ref = plan.manifest.bitstream
        assert ref is not None
        fpga = self.accelerators.fpga
        deployment.enter(Phase.PROGRAMMING, f"{ref.board} {ref.design} ({ref.sha256[:12]})")
        if not fpga.has(ref):
            assert plan.bitstream_url is not None
            fpga.bitstreams.mkdir(parents=True, exist_ok=True)

            def progress(have: int, total: int) -> None:
                if have == total:
                    deployment.publish(plan.bitstream_url or "", bytes=have, total=total)

            try:
                download(plan.bitstream_url, fpga.path(ref), ref.sha256, ref.size, progress,
                         self.policy)  # fmt: skip
            except DownloadError as err:
                raise DeployError(_download_code(err), f"bitstream: {err}") from err
        failure = self._program_or_revert(ref)
        if failure is not None:
            raise DeployError("fpga", f"{failure}; {self._fpga_now()}")

    def _program_or_revert(self, ref: BitstreamRef) -> FpgaError | None:
        """Program ``ref`` with the VTA engine closed around it, going back to the bitstream
        before when that fails; returns the failure."""
        assert self.accelerators is not None and self.accelerators.fpga is not None
        fpga, accelerators = self.accelerators.fpga, self.accelerators
        failure: list[FpgaError] = []

        def reprogram() -> VtaEngine | None:
            try:
                fpga.program(ref)
            except FpgaError as err:
                failure.append(err)
                fpga.revert()
            return accelerators.open_engine()

        self.registry.replace_vta(reprogram)
        return failure[0] if failure else None

    def restore_fpga(self) -> None:
        """After a reboot the FPGA holds none of the agent's designs: program the bitstream of
        the first active model that needs one and whose bitstream the device keeps."""
        fpga = self.accelerators.fpga if self.accelerators is not None else None
        if fpga is None or fpga.loaded is not None:
            return
        with self.registry.lock:
            active = [slot.active for slot in self.registry.state.models.values()]
        for digest in active:
            # The signed manifest vouches for the bitstream, which ``program`` checks against it;
            # the model's own files are checked when it loads.
            try:
                manifest, _ = signed_manifest(
                    self.registry.disk.path(digest), self.registry.trusted
                )
            except BoostError as err:
                log.warning("cannot check %s for a bitstream: %s", digest[:12], err)
                continue
            ref = manifest.bitstream
            if ref is None or ref.board != fpga.board.name or not fpga.has(ref):
                continue
            log.info("FPGA: programming %s again for model %s", ref.design, manifest.model_name)
            failure = self._program_or_revert(ref)
            if failure is None:
                return
            log.error("FPGA: %s", failure)

    def _revert_fpga(self) -> str:
        """Put the FPGA back to the bitstream it held before this deployment programmed it."""
        assert self.accelerators is not None and self.accelerators.fpga is not None
        fpga, accelerators = self.accelerators.fpga, self.accelerators

        def revert() -> VtaEngine | None:
            fpga.revert()
            return accelerators.open_engine()

        self.registry.replace_vta(revert)
        return self._fpga_now()

    def _fpga_now(self) -> str:
        assert self.accelerators is not None and self.accelerators.fpga is not None
        loaded = self.accelerators.fpga.loaded
        return (
            f"the FPGA holds {loaded.design} ({loaded.sha256[:12]}) again"
            if loaded
            else "the FPGA's design is unknown"
        )

    def _check_space(self, sha256: str, size: int, unpacked: int) -> None:
        self.downloads.mkdir(parents=True, exist_ok=True)
        partial = self.downloads / f"{sha256}.boost.partial"
        have = partial.stat().st_size if partial.exists() else 0
        try:
            self.registry.make_room(unpacked, keep=sha256)
        except CacheFullError as err:
            raise DeployError("cache-full", str(err)) from err
        needed = size - have + unpacked + DISK_MARGIN
        free = shutil.disk_usage(self.downloads).free
        if free < needed:
            self.registry.free_disk(needed - free, keep=sha256)
            free = shutil.disk_usage(self.downloads).free
        if free < needed:
            raise DeployError(
                "disk-space",
                f"{needed} bytes needed on {self.downloads} (artifact, unpacked copy and a "
                f"{DISK_MARGIN} byte margin), {free} free after evicting what may be evicted; "
                "free space or lower the cache budget",
            )

    def _fetch(self, deployment: Deployment, plan: Plan) -> None:
        """Download, verify and install the artifact unless the cache has it."""
        target = self.downloads / f"{plan.sha256}.boost"
        if plan.sha256 in self.registry.disk.entries:
            target.unlink(missing_ok=True)  # installed before the agent was stopped
            return
        deployment.enter(Phase.DOWNLOADING, plan.url, total=plan.size)
        last = [0.0]

        def progress(have: int, total: int) -> None:
            if time.monotonic() - last[0] >= 0.25 or have == total:
                last[0] = time.monotonic()
                deployment.publish(plan.url, bytes=have, total=total)

        try:
            transferred = download(plan.url, target, plan.sha256, plan.size, progress, self.policy)
        except DownloadError as err:
            raise DeployError(_download_code(err), str(err)) from err
        deployment.enter(Phase.VERIFYING, f"{transferred} bytes transferred")
        try:
            if read_manifest(target) != (plan.manifest_bytes, plan.signature):
                raise DeployError(
                    "artifact",
                    "the downloaded artifact's manifest differs from the deploy command's",
                )
            deployment.enter(Phase.INSTALLING)
            staged = self.registry.disk.staging(plan.sha256)
            open_artifact(target, self.registry.trusted, staged)
            source = Source(
                plan.url,
                plan.size,
                base64.b64encode(plan.manifest_bytes).decode(),
                base64.b64encode(plan.signature).decode(),
            )
            with self.registry.lock:
                self.registry.disk.install(
                    plan.sha256, staged, plan.manifest_bytes, plan.signature, source
                )
        finally:
            target.unlink(missing_ok=True)
            shutil.rmtree(self.registry.disk.staging_path(plan.sha256), ignore_errors=True)

    def _activate(self, deployment: Deployment, plan: Plan) -> None:
        name = plan.manifest.model_name
        with self.registry.lock:
            if deployment.cancelled:
                raise Abandoned(deployment.deploy_id)
            deployment.committed = True
            state = self.registry.state
            previous = state.models.get(name)
            state.models[name] = self._slot(previous, plan)
            pinned = plan.sha256 in state.pins
            if plan.pin:
                state.pins.add(plan.sha256)
            try:
                state.save()
            except OSError:  # the state on disk did not change: neither may the one in memory
                if previous is None:
                    del state.models[name]
                else:
                    state.models[name] = previous
                if not pinned:
                    state.pins.discard(plan.sha256)
                deployment.committed = False
                raise
        log.info("model %s: version %s active", name, plan.manifest.model_version)

    def _slot(self, previous: ModelSlot | None, plan: Plan) -> ModelSlot:
        """The model's slot with ``plan`` active. A build of the version already active joins
        the builds for other engines and replaces the one for its own; a build of another version
        replaces them all. A build replaced becomes last-good."""
        version = plan.manifest.model_version
        if previous is None:
            return ModelSlot(plan.sha256, version)
        if previous.version != version:
            return ModelSlot(plan.sha256, version, previous.active)
        engine = self.registry.engine(plan.manifest)
        others, replaced = [], []
        for digest in previous.builds():
            if digest == plan.sha256:  # the same build again (a damaged copy)
                continue
            manifest = self.registry.manifest(digest)
            if manifest is not None and self.registry.engine(manifest) != engine:
                others.append(digest)
            else:
                replaced.append(digest)
        return ModelSlot(
            plan.sha256, version, replaced[0] if replaced else previous.last_good, others
        )

    def _pin(self, plan: Plan) -> None:
        if plan.pin:
            with self.registry.lock:
                self.registry.state.pins.add(plan.sha256)
                self.registry.state.save()

    def _finish(
        self, deployment: Deployment, phase: Phase, failure: DeployError, abandoning: bool = False
    ) -> dict[str, Any]:
        log.warning("deploy %s: %s (%s)", deployment.deploy_id, phase.value, failure.message)
        digest = deployment.about.get("digest")
        if digest is not None and not abandoning:
            with self.registry.lock:
                if digest not in self.registry.state.protected():
                    self.registry.unload(digest)
        final = deployment.enter(
            phase,
            failure.message,
            abandoning,
            error={"code": failure.code, "message": failure.message},
        )
        self._record(deployment, final)
        return final

    def _record(self, deployment: Deployment, final: dict[str, Any]) -> None:
        """Keep the outcome for repeated deploy ids; when the disk is too full to keep it, a
        repeat after a restart carries the deployment out again."""
        with self.registry.lock:
            try:
                self.registry.state.record_deploy(deployment.deploy_id, final)
            except OSError as err:
                log.error("deploy %s: cannot record the outcome: %s", deployment.deploy_id, err)


def _unpacked_size(plan: Plan) -> int:
    """Bytes the build takes in the cache (and its bitstream, when it must be downloaded)."""
    unpacked = sum(f.size for f in plan.manifest.files) + 4 * len(plan.manifest_bytes)
    if plan.bitstream_url is not None and plan.manifest.bitstream is not None:
        unpacked += plan.manifest.bitstream.size
    return unpacked


def _stop_reason(err: BoostError | OSError) -> DeployError:
    if isinstance(err, DeployError):
        return err
    if isinstance(err, OSError):
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        return DeployError("disk-full" if full else "io", f"{err}")
    return DeployError("artifact" if isinstance(err, ArtifactError) else "load", str(err))


def _download_code(err: DownloadError) -> str:
    return "disk-full" if isinstance(err, DiskFullError) else "download"


def repair_command(damaged: DamagedError) -> Command | None:
    """The deploy command that brings a quarantined build back (None when its source is not
    known): the command that brought it, under a new id."""
    source = damaged.source
    if source is None:
        return None
    request_id = f"repair-{new_request_id()}"
    body = {
        "request_id": request_id,
        "manifest": source.manifest,
        "signature": source.signature,
        "url": source.url,
        "sha256": damaged.digest,
        "size": source.size,
    }
    return Command("deploy", request_id, None, body)
