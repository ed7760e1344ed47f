"""The artifact contract: a ``.boost`` tar with a signed manifest (see DESIGN.md, "Artifact").

Both sides use this module: the build host writes artifacts with ``write_artifact``; the device
checks the signature and every file digest with ``open_artifact`` before it loads anything.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import tarfile
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import ArtifactError, BoostError, SignatureError
from vta.bitstreams import BitstreamError, BitstreamRef

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
PUBLIC_KEY_TAG = "boost-ed25519"
MAX_MEMBER_BYTES = 1 << 31


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not self.name or any(not isinstance(d, int) or d < 0 for d in self.shape):
            raise ValueError(f"invalid tensor spec {self.name!r} {self.shape}")


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class TargetInfo:
    name: str
    triple: str
    tvm_target: dict[str, Any]
    cpu_features: tuple[str, ...] = ()
    accelerator: str | None = None


@dataclass(frozen=True)
class GoldenInfo:
    file: str
    rtol: float
    atol: float


@dataclass(frozen=True)
class Manifest:
    model_name: str
    model_version: str
    source_sha256: str
    target: TargetInfo
    tvm_version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    library: str
    golden: GoldenInfo
    files: tuple[FileEntry, ...]
    builder: dict[str, str] = field(default_factory=dict)
    tuning: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    #: The FPGA bitstream the build needs, for boards that can be programmed to its design.
    bitstream: BitstreamRef | None = None
    schema: int = SCHEMA_VERSION

    @property
    def file_name(self) -> str:
        return f"{self.model_name}-{self.model_version}-{self.target.name}.boost"

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, origin: str = MANIFEST) -> Manifest:
        try:
            raw = json.loads(data)
            if raw.get("schema") != SCHEMA_VERSION:
                raise ArtifactError(
                    origin,
                    f"manifest schema {raw.get('schema')!r} is not supported (this agent reads "
                    f"schema {SCHEMA_VERSION}); upgrade the agent or rebuild the artifact",
                )
            manifest = cls(
                model_name=raw["model_name"],
                model_version=raw["model_version"],
                source_sha256=raw["source_sha256"],
                target=TargetInfo(
                    **{**raw["target"], "cpu_features": tuple(raw["target"]["cpu_features"])}
                ),
                tvm_version=raw["tvm_version"],
                inputs=tuple(_tensor(t) for t in raw["inputs"]),
                outputs=tuple(_tensor(t) for t in raw["outputs"]),
                library=raw["library"],
                golden=GoldenInfo(**raw["golden"]),
                files=tuple(FileEntry(**f) for f in raw["files"]),
                builder=raw["builder"],
                tuning=raw["tuning"],
                quantization=raw["quantization"],
                bitstream=None
                if raw["bitstream"] is None
                else BitstreamRef.from_json(raw["bitstream"], origin),
            )
            _check_types(manifest, Manifest, "manifest", origin)
            return manifest
        except ArtifactError:
            raise
        except BitstreamError as err:
            raise ArtifactError(origin, str(err)) from err
        except KeyError as err:
            raise ArtifactError(origin, f"malformed manifest: no field {err.args[0]!r}") from err
        except (ValueError, TypeError, AttributeError) as err:
            raise ArtifactError(origin, f"malformed manifest: {err}") from err


def _check_types(value: Any, tp: Any, where: str, origin: str) -> None:
    """``value`` has the type the dataclass annotations say (every field, recursively)."""
    if tp is Any or tp is BitstreamRef:  # a bitstream reference checks itself
        return
    args = typing.get_args(tp)
    kind = typing.get_origin(tp)
    if kind in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        (tp,) = [a for a in args if a is not type(None)]
        _check_types(value, tp, where, origin)
        return
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        for f in dataclasses.fields(tp):
            _check_types(getattr(value, f.name), hints[f.name], f"{where}.{f.name}", origin)
        return
    expected = kind or tp
    ok = isinstance(value, expected) and not (isinstance(value, bool) and expected in (int, float))
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ArtifactError(
            origin, f"malformed manifest: {where} must be {getattr(expected, '__name__', expected)}"
        )
    if kind is tuple:
        for i, item in enumerate(value):
            _check_types(item, args[0], f"{where}[{i}]", origin)
    elif kind is dict:
        for key, item in value.items():
            _check_types(key, args[0], f"{where} key", origin)
            _check_types(item, args[1], f"{where}[{key!r}]", origin)


def _tensor(raw: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(name=raw["name"], shape=tuple(raw["shape"]), dtype=raw["dtype"])


# --- keys and signatures -------------------------------------------------------------------------


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path) -> Path:
    """Write a new private key (PEM, mode 0600) and its public key next to it (``.pub``)."""
    public_path = private_path.with_suffix(".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise BoostError(f"{path}: already exists; remove it first or choose another path")
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public_path.write_text(public_key_text(key.public_key()) + "\n")
    return public_path


def public_key_text(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"{PUBLIC_KEY_TAG} {base64.b64encode(raw).decode()} {key_id(public)}"


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError as err:
        raise BoostError(
            f"{path}: signing key not found; create one with 'boost-build keygen' "
            "or set [build] signing_key"
        ) from err
    except ValueError as err:
        raise BoostError(f"{path}: not a PEM Ed25519 private key ({err})") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise BoostError(f"{path}: expected an Ed25519 private key, found {type(key).__name__}")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        parts = path.read_text().split()
    except FileNotFoundError as err:
        raise BoostError(
            f"{path}: public key not found; copy the build host's .pub file there "
            "or fix [agent] trusted_keys"
        ) from err
    try:
        if len(parts) < 2 or parts[0] != PUBLIC_KEY_TAG:
            raise ValueError(f"expected '{PUBLIC_KEY_TAG} <base64>'")
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(parts[1], validate=True))
    except ValueError as err:
        raise BoostError(f"{path}: not a boost public key: {err}") from err


def sign_manifest(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    signature = {
        "alg": "ed25519",
        "key_id": key_id(key.public_key()),
        "sig": base64.b64encode(key.sign(manifest_bytes)).decode(),
    }
    return (json.dumps(signature, sort_keys=True) + "\n").encode()


def verify_signature(
    manifest_bytes: bytes, signature_bytes: bytes, trusted: Iterable[Ed25519PublicKey], origin: str
) -> str:
    """Check the manifest's signature against the trusted keys; returns the signing key id."""
    try:
        sig = json.loads(signature_bytes)
        claimed, raw_sig = str(sig["key_id"]), base64.b64decode(sig["sig"], validate=True)
        if sig.get("alg") != "ed25519":
            raise ValueError(f"algorithm {sig.get('alg')!r}")
    except (ValueError, KeyError, TypeError) as err:
        raise SignatureError(origin, "", f"malformed {SIGNATURE}: {err}") from err
    keys = {key_id(k): k for k in trusted}
    if claimed not in keys:
        raise SignatureError(
            origin,
            claimed,
            f"signed by key {claimed}, which is not trusted (trusted: "
            f"{', '.join(sorted(keys)) or 'none'}); add the build host's public key to "
            "[agent] trusted_keys",
        )
    try:
        keys[claimed].verify(raw_sig, manifest_bytes)
    except InvalidSignature as err:
        raise SignatureError(
            origin,
            claimed,
            f"signature does not match {MANIFEST} (key {claimed}): the manifest "
            "was altered after signing or signed by another key; do not use this artifact",
        ) from err
    return claimed


# --- writing and reading -------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_artifact(
    out: Path, manifest: Manifest, payload: Mapping[str, Path], key: Ed25519PrivateKey
) -> None:
    """Write the signed artifact atomically: readers see the whole file or nothing."""
    manifest_bytes = manifest.to_json()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with (
            open(tmp, "wb") as raw,
            tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for name, data in (
                (MANIFEST, manifest_bytes),
                (SIGNATURE, sign_manifest(manifest_bytes, key)),
            ):
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
            for name in sorted(payload):
                info = tar.gettarinfo(str(payload[name]), arcname=name)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                with open(payload[name], "rb") as f:
                    tar.addfile(info, f)
            tar.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class VerifiedArtifact:
    """An artifact whose signature and file digests were checked, unpacked into ``root``."""

    manifest: Manifest
    key_id: str
    root: Path

    def path(self, name: str) -> Path:
        return self.root / name


def read_manifest(artifact: Path) -> tuple[bytes, bytes]:
    """The raw manifest and signature bytes of an artifact (nothing else is read)."""
    with _open_tar(artifact) as tar:
        return _member_bytes(tar, artifact, MANIFEST), _member_bytes(tar, artifact, SIGNATURE)


def open_artifact(
    artifact: Path, trusted: Iterable[Ed25519PublicKey], dest: Path
) -> VerifiedArtifact:
    """Verify the signature, then unpack every payload file into ``dest`` checking its digest.

    Nothing is written outside ``dest``; members that the manifest does not list, links, devices,
    absolute or parent-relative names are rejected.
    """
    origin = str(artifact)
    manifest_bytes, signature = read_manifest(artifact)
    signer = verify_signature(manifest_bytes, signature, trusted, origin)
    manifest = Manifest.from_json(manifest_bytes, origin)
    expected = {f.path: f for f in manifest.files}
    for name in expected:
        _check_name(name, origin)
    dest.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    with _open_tar(artifact) as tar:
        for member in tar:
            if member.name in (MANIFEST, SIGNATURE):
                continue
            _check_name(member.name, origin)
            entry = expected.get(member.name)
            if entry is None:
                raise ArtifactError(origin, f"member {member.name!r} is not listed in the manifest")
            if member.name in seen:
                raise ArtifactError(origin, f"member {member.name!r} appears twice")
            if not member.isreg():
                raise ArtifactError(origin, f"member {member.name!r} is not a regular file")
            if member.size != entry.size:
                raise ArtifactError(
                    origin,
                    f"{member.name}: size {member.size} does not match the manifest ({entry.size})",
                )
            seen.add(member.name)
            src = tar.extractfile(member)
            assert src is not None
            target = dest / member.name
            digest = hashlib.sha256()
            with open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != entry.sha256:
                target.unlink()
                raise ArtifactError(
                    origin,
                    f"{member.name}: sha256 {digest.hexdigest()} does not match the "
                    f"manifest ({entry.sha256}); the artifact is corrupt or was tampered with",
                )
    missing = sorted(set(expected) - seen)
    if missing:
        raise ArtifactError(
            origin, f"files listed in the manifest are missing: {', '.join(missing)}"
        )
    return VerifiedArtifact(manifest, signer, dest)


def signed_manifest(root: Path, trusted: Iterable[Ed25519PublicKey]) -> tuple[Manifest, str]:
    """The manifest of an unpacked artifact and the id of the trusted key that signed it (its
    files are not checked)."""
    origin = str(root)
    try:
        manifest_bytes, signature = (root / MANIFEST).read_bytes(), (root / SIGNATURE).read_bytes()
    except OSError as err:
        raise ArtifactError(origin, f"cannot read the manifest: {err}") from err
    signer = verify_signature(manifest_bytes, signature, trusted, origin)
    return Manifest.from_json(manifest_bytes, origin), signer


def verify_unpacked(root: Path, trusted: Iterable[Ed25519PublicKey]) -> VerifiedArtifact:
    """Re-check an unpacked artifact (a cache entry) before it is loaded: the signature of its
    ``manifest.json`` and the size and sha256 of every listed file."""
    origin = str(root)
    manifest, signer = signed_manifest(root, trusted)
    for entry in manifest.files:
        _check_name(entry.path, origin)
        path = root / entry.path
        if not path.is_file() or path.stat().st_size != entry.size:
            raise ArtifactError(origin, f"{entry.path}: missing or not {entry.size} bytes")
        if sha256_file(path) != entry.sha256:
            raise ArtifactError(origin, f"{entry.path}: sha256 does not match the manifest")
    return VerifiedArtifact(manifest, signer, root)


def _check_name(name: str, origin: str) -> None:
    parts = Path(name).parts
    if not name or name.startswith("/") or ".." in parts or len(parts) != 1:
        raise ArtifactError(
            origin, f"unsafe member name {name!r}: artifacts hold plain file names only"
        )


def _open_tar(artifact: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(artifact, mode="r:")
    except FileNotFoundError as err:
        raise ArtifactError(str(artifact), "no such file") from err
    except (tarfile.TarError, OSError) as err:
        raise ArtifactError(
            str(artifact), f"not a .boost artifact (not a tar file: {err})"
        ) from err


def _member_bytes(tar: tarfile.TarFile, artifact: Path, name: str) -> bytes:
    try:
        member = tar.getmember(name)
    except KeyError as err:
        raise ArtifactError(str(artifact), f"{name} is missing; not a .boost artifact") from err
    if not member.isreg() or member.size > MAX_MEMBER_BYTES:
        raise ArtifactError(str(artifact), f"{name} is not a regular file of sane size")
    data = tar.extractfile(member)
    assert data is not None
    return data.read()
