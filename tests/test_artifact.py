from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.artifact import (
    MANIFEST,
    SIGNATURE,
    generate_keypair,
    load_private_key,
    load_public_key,
    open_artifact,
    sign_manifest,
)
from agent.errors import ArtifactError, BoostError, SignatureError
from tests.conftest import run_cli
from tests.support.fleet import flip_last_byte, rewrite


@pytest.fixture(scope="module")
def artifact(build: Callable[..., Path]) -> Path:
    return build("tiny_cnn")


def test_verify_accepts_the_untouched_artifact(
    artifact: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    verified = open_artifact(artifact, [load_public_key(keys[1])], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["golden.npz", "model.so"]
    assert verified.manifest.target.name == "x86_64"
    result = run_cli("models.cli", "verify", str(artifact), "--key", str(keys[1]), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "signature ok" in result.stdout and "2 files match their sha256" in result.stdout


def test_tampered_manifest_is_rejected(
    artifact: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    def change(name: str, data: bytes) -> bytes:
        if name != MANIFEST:
            return data
        return data.replace(b'"model_version": "1"', b'"model_version": "2"')

    bad = rewrite(artifact, tmp_path / "bad.boost", change)
    with pytest.raises(SignatureError, match=r"signature does not match manifest.json"):
        open_artifact(bad, [load_public_key(keys[1])], tmp_path / "out")
    result = run_cli("models.cli", "verify", str(bad), "--key", str(keys[1]), cwd=tmp_path)
    assert result.returncode == 1
    assert "was altered after signing" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_tampered_payload_is_rejected(
    artifact: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    bad = rewrite(
        artifact,
        tmp_path / "bad.boost",
        lambda name, data: flip_last_byte(data) if name == "model.so" else data,
    )
    with pytest.raises(ArtifactError, match=r"model.so: sha256 .* does not match the manifest"):
        open_artifact(bad, [load_public_key(keys[1])], tmp_path / "out")
    assert not (tmp_path / "out" / "model.so").exists()
    result = run_cli("models.cli", "verify", str(bad), "--key", str(keys[1]), cwd=tmp_path)
    assert result.returncode == 1 and "corrupt or was tampered with" in result.stderr


def test_wrong_key_is_rejected(artifact: Path, tmp_path: Path) -> None:
    other = generate_keypair(tmp_path / "other.key")
    with pytest.raises(SignatureError, match=r"which is not trusted"):
        open_artifact(artifact, [load_public_key(other)], tmp_path / "out")
    result = run_cli("models.cli", "verify", str(artifact), "--key", str(other), cwd=tmp_path)
    assert result.returncode == 1
    assert "not trusted" in result.stderr and "trusted_keys" in result.stderr


def test_resigned_by_untrusted_key_is_rejected(
    artifact: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    other = load_private_key(generate_keypair(tmp_path / "evil.key").with_suffix(".key"))
    manifest = rewrite(artifact, tmp_path / "a.boost", lambda n, d: d)
    with tarfile.open(manifest) as tar:
        manifest_bytes = tar.extractfile(MANIFEST).read()  # type: ignore[union-attr]
    bad = rewrite(
        artifact,
        tmp_path / "bad.boost",
        lambda n, d: sign_manifest(manifest_bytes, other) if n == SIGNATURE else d,
    )
    with pytest.raises(SignatureError, match=r"not trusted"):
        open_artifact(bad, [load_public_key(keys[1])], tmp_path / "out")


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("../escape", tarfile.REGTYPE, "unsafe member name '../escape'"),
        ("/etc/passwd", tarfile.REGTYPE, "unsafe member name '/etc/passwd'"),
        ("extra.bin", tarfile.REGTYPE, "member 'extra.bin' is not listed in the manifest"),
        ("model.so", tarfile.REGTYPE, "member 'model.so' appears twice"),
    ],
)
def test_hostile_members_are_rejected(
    artifact: Path, keys: tuple[Path, Path], tmp_path: Path, name: str, kind: bytes, message: str
) -> None:
    with tarfile.open(artifact) as tar:
        payload = tar.extractfile("model.so").read()  # type: ignore[union-attr]
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(payload)
    bad = rewrite(artifact, tmp_path / "bad.boost", lambda n, d: d, extra=[(info, payload)])
    with pytest.raises(ArtifactError, match=message.replace("(", r"\(")):
        open_artifact(bad, [load_public_key(keys[1])], tmp_path / "out")
    assert not (tmp_path / "escape").exists()


def test_symlink_member_is_rejected(
    artifact: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    def drop_golden(name: str, data: bytes) -> bytes | None:
        return None if name == "golden.npz" else data

    link = tarfile.TarInfo("golden.npz")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    bad = rewrite(artifact, tmp_path / "bad.boost", drop_golden, extra=[(link, b"")])
    with pytest.raises(ArtifactError, match=r"'golden.npz' is not a regular file"):
        open_artifact(bad, [load_public_key(keys[1])], tmp_path / "out")


def test_missing_payload_and_not_an_artifact(
    artifact: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    bad = rewrite(artifact, tmp_path / "bad.boost", lambda n, d: None if n == "golden.npz" else d)
    with pytest.raises(ArtifactError, match=r"listed in the manifest are missing: golden.npz"):
        open_artifact(bad, [load_public_key(keys[1])], tmp_path / "out")
    junk = tmp_path / "junk.boost"
    junk.write_bytes(b"hello")
    with pytest.raises(ArtifactError, match=r"not a .boost artifact"):
        open_artifact(junk, [load_public_key(keys[1])], tmp_path / "out")


def test_inspect_prints_the_manifest(artifact: Path, tmp_path: Path) -> None:
    result = run_cli("models.cli", "inspect", str(artifact), cwd=tmp_path)
    manifest = json.loads(result.stdout)
    assert manifest["model_name"] == "tiny_cnn"
    assert manifest["target"]["tvm_target"]["mcpu"] not in ("", "generic")
    # This build host has AVX2 (the CI machines do too); the manifest requires it of devices.
    assert "avx2" in manifest["target"]["cpu_features"]
    assert {f["path"] for f in manifest["files"]} == {"model.so", "golden.npz"}


def test_keys_are_checked(tmp_path: Path) -> None:
    private = tmp_path / "k.key"
    generate_keypair(private)
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(BoostError, match=r"already exists"):
        generate_keypair(private)
    (tmp_path / "bad.pub").write_text("ssh-ed25519 AAAA")
    with pytest.raises(BoostError, match=r"not a boost public key"):
        load_public_key(tmp_path / "bad.pub")
    with pytest.raises(
        BoostError, match=r"signing key not found; create one with 'boost-build keygen'"
    ):
        load_private_key(tmp_path / "none.key")
