"""Malicious artifacts sent to a running agent through the real broker and store.

The signature covers the manifest, not the deploy command's url, sha256 and size, nor what the
store serves: an attacker who can publish a command or bytes but has no signing key gets the
real, properly signed manifest paired with a hostile tar or a lying command. Each attack below
must be refused before anything from it is loaded, while the model already active keeps serving
and the cache stays consistent. Prints the count the closing note quotes.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.artifact import (
    generate_keypair,
    load_private_key,
    read_manifest,
    sha256_file,
    sign_manifest,
)
from agent.protocol import decode_tensor, infer_command
from models.fleet import Fleet
from tests.support.fleet import (
    AgentProcess,
    CountingStore,
    Watcher,
    assert_cache_consistent,
    deploy,
    flip_last_byte,
    golden,
    online,
    resign,
    rewrite,
)

Keys = tuple[Path, Path]
Member = tuple[tarfile.TarInfo, bytes]


@dataclass(frozen=True)
class Attack:
    name: str
    code: str  # the error code the deployment must end with
    served: Path  # the artifact the store serves at the command's url
    manifest: bytes
    signature: bytes
    sha256: str | None = None  # what the command announces; the served file's by default
    size: int | None = None
    downloads: bool = True  # False: refused before any HTTP request


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def attacks(good: Path, keys: Keys, tmp: Path) -> list[Attack]:
    manifest, signature = read_manifest(good)
    with tarfile.open(good) as tar:
        library = tar.extractfile("model.so").read()  # type: ignore[union-attr]

    def hostile(
        name: str,
        change: Callable[[str, bytes], bytes | None] = lambda n, d: d,
        extra: Sequence[Member] = (),
    ) -> Attack:
        served = rewrite(good, tmp / f"{name}.boost", change, extra)
        return Attack(name, "artifact", served, manifest, signature)

    def without_golden(name: str, data: bytes) -> bytes | None:
        return None if name == "golden.npz" else data

    def resized_library(data: bytes) -> Callable[[str, bytes], bytes]:
        return lambda name, old: data if name == "model.so" else old

    trusted = load_private_key(keys[0])
    untrusted = load_private_key(generate_keypair(tmp / "untrusted.key").with_suffix(".key"))
    other_version = resign(good, tmp / "v9.boost", keys[0], keys[1], version="9")
    other_manifest, other_signature = read_manifest(other_version)
    declared = json.loads(other_manifest)
    declared["files"][0]["size"] = 10**13
    huge = json.dumps(declared).encode()
    tampered = hostile("digest-mismatch", resized_library(flip_last_byte(library)))
    return [
        hostile("path-traversal", extra=[member("../../escaped", library)]),
        hostile("absolute-name", extra=[member(str(tmp / "escaped"), library)]),
        hostile(
            "symlink",
            without_golden,
            [member("golden.npz", kind=tarfile.SYMTYPE, link="/etc/passwd")],
        ),
        hostile(
            "hardlink",
            without_golden,
            [member("golden.npz", kind=tarfile.LNKTYPE, link="model.so")],
        ),
        hostile("duplicate-name", extra=[member("model.so", flip_last_byte(library))]),
        hostile("unlisted-member", extra=[member("extra.so", library)]),
        hostile("oversized-member", resized_library(library + bytes(8 << 20))),
        tampered,
        Attack("other-manifest-inside", "artifact", other_version, manifest, signature),
        Attack(
            "store-serves-other-bytes",
            "download",
            tampered.served,
            manifest,
            signature,
            sha256=hashlib.sha256(b"what the command announces").hexdigest(),
        ),
        Attack(
            "server-sends-more-than-announced",
            "download",
            other_version,
            other_manifest,
            other_signature,
            size=other_version.stat().st_size // 2,
        ),
        Attack(
            "manifest-paired-with-a-cached-build",
            "artifact",
            good,
            other_manifest,
            other_signature,
            downloads=False,
        ),
        Attack(
            "untrusted-signature",
            "untrusted",
            good,
            manifest,
            sign_manifest(manifest, untrusted),
            downloads=False,
        ),
        Attack(
            "declares-a-huge-file",
            "cache-full",
            other_version,
            huge,
            sign_manifest(huge, trusted),
            downloads=False,
        ),
    ]


def test_malicious_artifacts_are_refused_before_anything_loads(
    agents: Callable[..., AgentProcess],
    watcher: Watcher,
    fleet: Fleet,
    store: CountingStore,
    build: Callable[..., Path],
    keys: Keys,
    tmp_path: Path,
) -> None:
    agent = agents()
    online(watcher, agent)
    good = build("tiny_cnn")
    assert [o.state for o in deploy(fleet, store, good)] == ["active"]
    inputs, outputs = golden(good, tmp_path / "golden", keys[1])
    refused = 0
    for attack in attacks(good, keys, tmp_path / "attacks"):
        url, digest, size = store.publish(attack.served)
        requests = store.requests
        (outcome,) = fleet.deploy(
            attack.manifest,
            attack.signature,
            url,
            attack.sha256 or digest,
            attack.size or size,
            fleet.select("dev1"),
            lambda device, event: None,
            120,
        )
        final = outcome.events[-1]
        phases = [e["state"] for e in outcome.events]
        assert outcome.state in ("rejected", "rolled-back"), (attack.name, outcome)
        assert final["error"]["code"] == attack.code, (attack.name, final)
        assert not {"loading", "smoke-testing", "active"} & set(phases), (attack.name, phases)
        if not attack.downloads:
            assert store.requests == requests and "downloading" not in phases, attack.name
        assert assert_cache_consistent(agent.state_dir, keys[1]) == 1, attack.name
        refused += 1
        print(f"{attack.name}: {outcome.state} [{final['error']['code']}] {outcome.detail}")
    assert not list(tmp_path.rglob("escaped")), "a member was written outside the cache"
    ask = infer_command("tiny_cnn", inputs)
    mark = watcher.mark()
    watcher.send("dev1", "infer", ask)
    reply = watcher.answer(ask["request_id"], mark)
    assert reply["ok"] and reply["digest"] == sha256_file(good), reply
    ((name, raw),) = reply["outputs"].items()
    np.testing.assert_allclose(decode_tensor(name, raw), outputs[0], rtol=1e-5, atol=1e-6)
    assert "Traceback" not in agent.log_text()
    print(f"\nmalicious artifacts refused: {refused} of {refused}, 0 loaded, 0 corrupted caches")
