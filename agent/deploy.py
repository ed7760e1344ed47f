"""Deployments: one explicit transition table, and the pipeline that walks it.

::

    accepted ──> rejected                       (signature, compatibility, URL, space: no download)
        │  └───> active                         (this build is already active: nothing to do)
        │  └───> loading                        (the build is in the cache: re-verified on load)
        v
    downloading > verifying > installing > loading > smoke-testing > active
        └────────────┴────────────┴───────────┴────────────┴──> rolled-back | failed

A failure after acceptance ends in ``rolled-back`` when the model has an active version (it keeps
serving) and in ``failed`` when it has none. Every transition is published as an event carrying the
request id, the deploy id and a sequence number that rises by one per event of the deployment.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from agent.artifact import Manifest, open_artifact, read_manifest, verify_signature
from agent.cache import CacheFullError
from agent.capabilities import incompatibilities
from agent.config import AgentConfig
from agent.download import DownloadError, DownloadPolicy, download, url_allowed
from agent.errors import ArtifactError, BoostError, SignatureError
from agent.protocol import Command, ProtocolError, check_name, now
from agent.registry import Registry
from agent.runtime import golden_check
from agent.state import ModelSlot

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
    LOADING = "loading"
    SMOKE_TESTING = "smoke-testing"
    ACTIVE = "active"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"


_FAILURE = frozenset({Phase.ROLLED_BACK, Phase.FAILED})
TRANSITIONS: Mapping[Phase, frozenset[Phase]] = {
    Phase.ACCEPTED: frozenset({Phase.REJECTED, Phase.ACTIVE, Phase.LOADING, Phase.DOWNLOADING})
    | _FAILURE,
    Phase.DOWNLOADING: frozenset({Phase.VERIFYING}) | _FAILURE,
    Phase.VERIFYING: frozenset({Phase.INSTALLING}) | _FAILURE,
    Phase.INSTALLING: frozenset({Phase.LOADING}) | _FAILURE,
    Phase.LOADING: frozenset({Phase.SMOKE_TESTING}) | _FAILURE,
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


class Deployment:
    """The events of one deployment; refuses any transition the table does not have."""

    def __init__(self, request_id: str, deploy_id: str, emit: Emit) -> None:
        self.request_id = request_id
        self.deploy_id = deploy_id
        self.emit = emit
        self.phase: Phase | None = None
        self.seq = 0
        self.about: dict[str, Any] = {}

    def enter(self, phase: Phase, detail: str = "", **extra: Any) -> dict[str, Any]:
        allowed = TRANSITIONS[self.phase] if self.phase else frozenset({Phase.ACCEPTED})
        if phase not in allowed:
            raise AssertionError(f"deployment cannot go from {self.phase} to {phase}")
        self.phase = phase
        return self.publish(detail, **extra)

    def publish(self, detail: str = "", **extra: Any) -> dict[str, Any]:
        assert self.phase is not None
        self.seq += 1
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
        self.emit(event, self.phase in TERMINAL)
        return event


@dataclass(frozen=True)
class Plan:
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    url: str
    sha256: str
    size: int
    pin: bool


class Deployer:
    def __init__(
        self,
        registry: Registry,
        config: AgentConfig,
        capabilities: Callable[[], dict[str, Any]],
        policy: DownloadPolicy | None = None,
    ) -> None:
        self.registry = registry
        self.config = config
        self.capabilities = capabilities
        self.policy = policy or DownloadPolicy()
        self.downloads = config.state_dir / "downloads"

    def run(self, command: Command, emit: Emit) -> dict[str, Any]:
        """Carry out one deploy command; returns its final event."""
        deploy_id = command.body.get("deploy_id", command.request_id)
        if not isinstance(deploy_id, str) or not deploy_id:
            deploy_id = command.request_id
        with self.registry.lock:
            done = self.registry.state.deploys.get(deploy_id)
        if done is not None:
            replay = {**done, "request_id": command.request_id, "duplicate": True, "ts": now()}
            emit(replay, True)
            return replay
        deployment = Deployment(command.request_id, deploy_id, emit)
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
        if slot is not None and slot.active == plan.sha256:
            self._pin(plan)
            final = deployment.enter(Phase.ACTIVE, "already active")
            self._record(deployment, final)
            return final
        try:
            self._fetch(deployment, plan)
            deployment.enter(Phase.LOADING)
            loaded = self.registry.load(plan.sha256)
            deployment.enter(Phase.SMOKE_TESTING, load_ms=round(loaded.load_seconds * 1e3, 2))
            golden = manifest.golden
            report = golden_check(
                loaded.model, loaded.artifact.path(golden.file), golden.rtol, golden.atol
            )
            if not report.passed:
                raise DeployError("smoke-test", report.describe())
            self._activate(plan)
            final = deployment.enter(Phase.ACTIVE, report.describe())
            self._record(deployment, final)
            return final
        except DeployError as failure:
            outcome = Phase.ROLLED_BACK if slot is not None else Phase.FAILED
            return self._finish(deployment, outcome, failure)
        except BoostError as err:
            outcome = Phase.ROLLED_BACK if slot is not None else Phase.FAILED
            code = "artifact" if isinstance(err, ArtifactError) else "load"
            return self._finish(deployment, outcome, DeployError(code, str(err)))

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
        if sha256 not in self.registry.disk.entries:
            unpacked = sum(f.size for f in manifest.files) + 2 * len(manifest_bytes)
            self._check_space(sha256, size, unpacked)
        return Plan(manifest, manifest_bytes, signature, url, sha256, size, pin)

    def _check_space(self, sha256: str, size: int, unpacked: int) -> None:
        self.downloads.mkdir(parents=True, exist_ok=True)
        partial = self.downloads / f"{sha256}.boost.partial"
        have = partial.stat().st_size if partial.exists() else 0
        try:
            self.registry.make_room(unpacked, keep=sha256)
        except CacheFullError as err:
            raise DeployError("cache-full", str(err)) from err
        free = shutil.disk_usage(self.downloads).free
        needed = size - have + unpacked + DISK_MARGIN
        if free < needed:
            raise DeployError(
                "disk-space",
                f"{needed} bytes needed on {self.downloads} (artifact, unpacked copy and a "
                f"{DISK_MARGIN} byte margin), {free} free; free space or lower the cache budget",
            )

    def _fetch(self, deployment: Deployment, plan: Plan) -> None:
        """Download, verify and install the artifact unless the cache has it."""
        if plan.sha256 in self.registry.disk.entries:
            return
        target = self.downloads / f"{plan.sha256}.boost"
        deployment.enter(Phase.DOWNLOADING, plan.url, total=plan.size)
        last = [0.0]

        def progress(have: int, total: int) -> None:
            if time.monotonic() - last[0] >= 0.25 or have == total:
                last[0] = time.monotonic()
                deployment.publish(plan.url, bytes=have, total=total)

        try:
            transferred = download(plan.url, target, plan.sha256, plan.size, progress, self.policy)
        except DownloadError as err:
            raise DeployError("download", str(err)) from err
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
            with self.registry.lock:
                self.registry.disk.install(plan.sha256, staged, plan.manifest_bytes, plan.signature)
        finally:
            target.unlink(missing_ok=True)

    def _activate(self, plan: Plan) -> None:
        name = plan.manifest.model_name
        with self.registry.lock:
            state = self.registry.state
            previous = state.models.get(name)
            state.models[name] = ModelSlot(
                plan.sha256, plan.manifest.model_version, previous.active if previous else None
            )
            if plan.pin:
                state.pins.add(plan.sha256)
            state.save()
        log.info("model %s: version %s active", name, plan.manifest.model_version)

    def _pin(self, plan: Plan) -> None:
        if plan.pin:
            with self.registry.lock:
                self.registry.state.pins.add(plan.sha256)
                self.registry.state.save()

    def _finish(self, deployment: Deployment, phase: Phase, failure: DeployError) -> dict[str, Any]:
        log.warning("deploy %s: %s (%s)", deployment.deploy_id, phase.value, failure.message)
        digest = deployment.about.get("digest")
        if digest is not None:
            with self.registry.lock:
                if digest not in self.registry.state.protected():
                    self.registry.unload(digest)
        final = deployment.enter(
            phase, failure.message, error={"code": failure.code, "message": failure.message}
        )
        self._record(deployment, final)
        return final

    def _record(self, deployment: Deployment, final: dict[str, Any]) -> None:
        with self.registry.lock:
            self.registry.state.record_deploy(deployment.deploy_id, final)
