"""The agent's parts one at a time: cache policy and tiers, the deployment table, protocol
payloads, capability probing and compatibility, resumable downloads."""

from __future__ import annotations

import base64
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.artifact import Manifest, read_manifest
from agent.cache import SOURCE, DiskCache, LfuAging, ModuleCache, Source, Usage
from agent.capabilities import cpu_features, incompatibilities, probe, probe_accelerators
from agent.config import AgentConfig
from agent.deploy import TERMINAL, TRANSITIONS, Deployment, Phase
from agent.download import DownloadError, DownloadPolicy, download, url_allowed
from agent.protocol import ProtocolError, decode_tensor, encode_tensor, parse_command
from agent.runtime import physical_cores
from models.store import ArtifactStore, StoreServer
from tests.support.fleet import REPO

DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- LFU with aging ------------------------------------------------------------------------------


def test_a_formerly_hot_entry_ages_out() -> None:
    policy = LfuAging(half_life_s=DAY)
    hot, fresh = Usage(100), Usage(100)
    for _ in range(50):
        policy.touch(hot, 0.0)
    policy.touch(fresh, 0.0)
    usages = {"hot": hot, "fresh": fresh}
    assert policy.victims(usages, 100, 0, (), now=0.0) == ["fresh"]
    # A week later the hot entry is used no more; the fresh one a few times today.
    for _ in range(3):
        policy.touch(fresh, 7 * DAY)
    assert policy.decayed(hot, 7 * DAY) == pytest.approx(50 / 128)
    assert policy.victims(usages, 100, 0, (), now=7 * DAY) == ["hot"]


def test_size_aware_and_protected_entries_stay() -> None:
    policy = LfuAging(half_life_s=DAY)
    big, small = Usage(1000), Usage(10)
    for usage in (big, small):
        policy.touch(usage, 0.0)
    usages = {"big": big, "small": small}
    # Equal use: the big entry costs more bytes per use, so it goes first.
    assert policy.victims(usages, 500, 0, (), 0.0) == ["big"]
    assert policy.victims(usages, 500, 0, ("big",), 0.0) is None
    assert policy.victims(usages, 5, 10, (), 0.0) == []
    assert policy.victims(usages, 1005, 0, (), 0.0) == ["big", "small"]


def _entry(root: Path, digest: str, model: str, size: int) -> Path:
    staged = root / "staging" / digest
    staged.mkdir(parents=True)
    (staged / "model.so").write_bytes(b"x" * size)
    return staged


def _manifest(artifact: Path, **changes: str) -> bytes:
    manifest = Manifest.from_json(read_manifest(artifact)[0])
    return replace(manifest, **changes).to_json()  # type: ignore[arg-type]


def test_disk_cache_budget_index_rebuild_and_half_built_entries(
    tmp_path: Path, build: Callable[..., Path]
) -> None:
    clock = Clock()
    cache = DiskCache(tmp_path / "cache", 10_000, LfuAging(DAY), clock)
    assert cache.open() == "index missing: rebuilt from 0 entries on disk"
    base = build("tiny_cnn")
    for i, digest in enumerate(("a" * 64, "b" * 64)):
        manifest = _manifest(base, model_name=f"m{i}")
        source = Source(f"http://store/{digest}", 3100, "bWFuaWZlc3Q=", "c2ln")
        cache.install(digest, _entry(tmp_path, digest, f"m{i}", 3000), manifest, b"sig", source)
        clock.now += 1
    size = cache.entries["a" * 64].size
    source_bytes = (cache.path("a" * 64) / SOURCE).stat().st_size
    assert size == 3000 + len(_manifest(base, model_name="m0")) + 3 + source_bytes
    assert cache.used() == 2 * size <= cache.budget < 2 * size + 3000
    cache.lookup("b" * 64)  # b is used twice, a once
    evictions = cache.make_room(3000, protected=())
    assert [e.digest for e in evictions] == ["a" * 64]
    assert cache.used() + 3000 <= cache.budget
    assert not cache.path("a" * 64).exists()

    (cache.root / "sha256" / f".{'c' * 64}.tmp").mkdir()
    cache.index_path.write_text("[1, 2")
    reopened = DiskCache(tmp_path / "cache", 10_000, LfuAging(DAY), clock)
    assert reopened.open().startswith("index damaged")
    assert list(reopened.entries) == ["b" * 64]
    assert reopened.entries["b" * 64].model == "m1"
    assert reopened.entries["b" * 64].source == Source(
        f"http://store/{'b' * 64}", 3100, "bWFuaWZlc3Q=", "c2ln"
    )
    assert not (cache.root / "sha256" / f".{'c' * 64}.tmp").exists()
    assert DiskCache(tmp_path / "cache", 10_000, LfuAging(DAY), clock).open() == (
        "index loaded: 1 entries"
    )


def test_module_cache_keeps_protected_and_new_entries() -> None:
    clock = Clock()
    ram: ModuleCache[str] = ModuleCache(100, LfuAging(DAY), clock)
    assert ram.put("a", "A", 60, protected={"a"}) == []
    evictions = ram.put("b", "B", 60, protected={"a"})
    assert evictions == [] and ram.used() == 120  # over budget: both protected or new
    evictions = ram.put("c", "C", 30, protected={"a"})
    assert [e.digest for e in evictions] == ["b"] and "b" not in ram
    assert ram.get("a") == "A" and ram.get("b") is None
    assert (ram.hits, ram.misses) == (1, 1)


# --- the deployment table ------------------------------------------------------------------------


def test_transition_table_is_complete() -> None:
    assert set(TRANSITIONS) == set(Phase)
    reachable, frontier = {Phase.ACCEPTED}, [Phase.ACCEPTED]
    while frontier:
        for after in TRANSITIONS[frontier.pop()]:
            if after not in reachable:
                reachable.add(after)
                frontier.append(after)
    assert reachable == set(Phase)
    assert {Phase.REJECTED, Phase.ACTIVE, Phase.ROLLED_BACK, Phase.FAILED} == TERMINAL
    for phase in set(Phase) - TERMINAL - {Phase.ACCEPTED}:
        # Every step after acceptance can fail either way, and only acceptance can reject.
        assert {Phase.ROLLED_BACK, Phase.FAILED} <= TRANSITIONS[phase], phase
        assert Phase.REJECTED not in TRANSITIONS[phase], phase


def test_deployment_numbers_events_and_refuses_other_transitions() -> None:
    events: list[tuple[dict[str, object], bool]] = []
    deployment = Deployment("r1", "d1", lambda e, final: events.append((e, final)))
    with pytest.raises(AssertionError, match=r"cannot go from None to Phase\.LOADING"):
        deployment.enter(Phase.LOADING)
    deployment.enter(Phase.ACCEPTED)
    deployment.enter(Phase.DOWNLOADING)
    deployment.publish("url", bytes=10, total=20)
    with pytest.raises(AssertionError, match=r"cannot go from Phase\.DOWNLOADING to Phase\.ACTIVE"):
        deployment.enter(Phase.ACTIVE)
    deployment.enter(Phase.ROLLED_BACK, "no")
    assert [(e["seq"], e["state"], final) for e, final in events] == [
        (1, "accepted", False),
        (2, "downloading", False),
        (3, "downloading", False),
        (4, "rolled-back", True),
    ]
    assert all(e["request_id"] == "r1" and e["deploy_id"] == "d1" for e, _ in events)


# --- protocol payloads ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verb", "payload", "code", "message"),
    [
        ("reboot", b"{}", "unknown-verb", "unknown command 'reboot'"),
        ("ping", b"\xff", "bad-json", "ping: payload is not UTF-8 JSON"),
        ("ping", b"[1]", "bad-json", "ping: payload must be a JSON object"),
        ("ping", b"{}", "bad-request", "ping: 'request_id' must be a string of 1-128 chars"),
        ("ping", b'{"request_id": "r", "reply_to": "a/#"}', "bad-request", "'reply_to' must"),
    ],
)
def test_malformed_commands(verb: str, payload: bytes, code: str, message: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_command(verb, payload)
    assert err.value.code == code and message in err.value.message


def test_tensor_round_trip_and_errors() -> None:
    for array in (np.arange(12, dtype=np.float32).reshape(3, 4), np.array([[-1, 2]], np.int8)):
        encoded = json.loads(json.dumps(encode_tensor(array)))
        decoded = decode_tensor("t", encoded)
        assert decoded.dtype == array.dtype and np.array_equal(decoded, array)
    good = encode_tensor(np.zeros(2, np.float32))
    for raw, message in (
        ([1], "expected {shape, dtype, data}"),
        ({**good, "shape": [-1]}, "shape must be a list of at most 32 integers >= 0"),
        ({**good, "shape": [1] * 33}, "shape must be a list of at most 32 integers"),
        (
            {**good, "shape": [2**62, 2**62]},
            r"float32\[4611686018427387904, 4611686018427387904\] needs",
        ),
        (
            {**good, "shape": [2**62, 2**62, 0], "data": ""},
            r"shape \[4611686018427387904, 4611686018427387904, 0\] is too large an array",
        ),
        ({**good, "dtype": "object"}, "dtype 'object' is not one of"),
        ({**good, "data": "!!"}, "data is not base64"),
        ({**good, "data": base64.b64encode(b"123").decode()}, r"float32\[2\] needs 8 bytes, got 3"),
    ):
        with pytest.raises(ProtocolError, match="input 't': " + message.replace("{", r"\{")):
            decode_tensor("t", raw)


def test_url_allow_list() -> None:
    allowed = ["http://127.0.0.1:8750", "https://builds.example.com/fleet/"]
    assert url_allowed("http://127.0.0.1:8750/sha256/ab", allowed)
    assert url_allowed("https://builds.example.com/fleet/sha256/ab", allowed)
    for url in (
        "http://127.0.0.1:8751/sha256/ab",
        "http://127.0.0.1:8750.evil.com/sha256/ab",
        "http://user@127.0.0.1:8750/sha256/ab",
        "https://builds.example.com/fleetx/sha256/ab",
        "http://builds.example.com/fleet/sha256/ab",
        "file:///etc/passwd",
    ):
        assert not url_allowed(url, allowed), url


# --- capabilities --------------------------------------------------------------------------------

X86 = "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni amx_int8\n"
AARCH64 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp sve i8mm\n"
ARMV7 = "processor\t: 0\nFeatures\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4\n"


def test_cpu_features_from_cpuinfo() -> None:
    assert cpu_features(X86) == [
        "amx-int8",
        "avx",
        "avx2",
        "avx512f",
        "avx512vnni",
        "fma",
        "sse4.2",
    ]
    assert cpu_features(AARCH64) == ["dotprod", "i8mm", "neon", "sve"]
    assert cpu_features(ARMV7) == ["neon", "vfp3", "vfp4"]
    assert cpu_features("garbage") == []


def test_probe_never_raises_and_reports_this_machine(tmp_path: Path) -> None:
    backends = ("vta-sim", "vta-serial", "vta-fpga", "cpu")
    accelerators = probe_accelerators(AgentConfig(backends=backends))
    caps = probe("d", ["g"], backends, tmp_path / "missing", accelerators)
    assert caps["cpu"]["triple"] == "x86_64-linux-gnu" and caps["cpu"]["cores"] >= 1
    assert caps["tvm_runtime"]["abi"] == "0.27"
    assert caps["accelerators"] == [
        {"kind": "vta-sim", "design": "1x16_i8w8a32_15_15_18_17", "board": "sim"}
    ]
    assert caps["disk_free_bytes"] > 0 and caps["groups"] == ["g"]
    assert probe_accelerators(AgentConfig(backends=("cpu",))) == []


def test_incompatibilities_name_what_is_missing(build: Callable[..., Path], tmp_path: Path) -> None:
    manifest = Manifest.from_json(read_manifest(build("tiny_cnn"))[0])
    caps = probe("d", [], ["vta-sim"], tmp_path, probe_accelerators(AgentConfig()))
    assert incompatibilities(manifest, caps) == []
    arm = {**caps, "cpu": {**caps["cpu"], "triple": "aarch64-linux-gnu", "arch": "aarch64"}}
    assert incompatibilities(manifest, arm)[0] == (
        "built for x86_64-linux-gnu, the device is aarch64-linux-gnu (aarch64)"
    )
    old = {**caps, "tvm_runtime": {"version": "0.26.0", "abi": "0.26"}}
    assert "the device runs TVM 0.26.0" in incompatibilities(manifest, old)[0]
    vta = replace(manifest, target=replace(manifest.target, accelerator="vta:other"))
    assert incompatibilities(vta, caps) == [
        "needs accelerator vta:other, which the device does not have"
    ]


# --- downloads -----------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path, build: Callable[..., Path]) -> Iterator[tuple[str, str, bytes]]:
    published = ArtifactStore(tmp_path / "store").publish(build("tiny_cnn"))
    server = StoreServer(ArtifactStore(tmp_path / "store"), "127.0.0.1", 0)
    server.start_background()
    yield server.url + published.url_path, published.digest, published.path.read_bytes()
    server.shutdown()
    server.server_close()


def test_download_resumes_a_partial_file(served: tuple[str, str, bytes], tmp_path: Path) -> None:
    url, digest, data = served
    dest = tmp_path / "a.boost"
    (tmp_path / "a.boost.partial").write_bytes(data[:1000])
    seen: list[int] = []
    policy = DownloadPolicy(attempts=1)
    sent = download(url, dest, digest, len(data), lambda have, total: seen.append(have), policy)
    assert sent == len(data) - 1000 and dest.read_bytes() == data
    assert seen[-1] == len(data) and not (tmp_path / "a.boost.partial").exists()


def test_download_rejects_other_bytes(served: tuple[str, str, bytes], tmp_path: Path) -> None:
    url, digest, data = served
    dest = tmp_path / "a.boost"
    (tmp_path / "a.boost.partial").write_bytes(b"\0" * 1000)  # a corrupt prefix
    with pytest.raises(DownloadError, match="does not match the deploy command's"):
        download(url, dest, digest, len(data), lambda *a: None, DownloadPolicy(attempts=1))
    assert not dest.exists() and not (tmp_path / "a.boost.partial").exists()
    with pytest.raises(DownloadError, match="HTTP 404"):
        missing = url.rsplit("/", 1)[0] + "/" + "0" * 64  # no artifact has this digest
        download(missing, dest, "0" * 64, 10, lambda *a: None, DownloadPolicy())


def _cpuinfo(tmp_path: Path, blocks: list[dict[str, int]]) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(
        "\n\n".join("\n".join(f"{k}\t: {v}" for k, v in b.items()) for b in blocks) + "\n"
    )
    return path


def test_physical_cores_counts_a_hyper_threaded_core_once(tmp_path: Path) -> None:
    ht = [{"processor": i, "physical id": 0, "core id": i % 2} for i in range(4)]
    assert physical_cores(_cpuinfo(tmp_path, ht), {0, 1, 2, 3}) == 2
    assert physical_cores(_cpuinfo(tmp_path, ht), {0, 2}) == 1  # both threads of core 0
    arm = [{"processor": i, "BogoMIPS": 108} for i in range(4)]
    assert physical_cores(_cpuinfo(tmp_path, arm), {0, 1, 2, 3}) == 4
    assert physical_cores(tmp_path / "missing", {0, 1}) == 2


def test_the_runtime_uses_every_core_unless_told_otherwise(tmp_path: Path) -> None:
    script = "import os; from agent.runtime import TvmRuntime; TvmRuntime(); "
    script += "print(os.environ['TVM_NUM_THREADS'])"
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    env["PYTHONPATH"] = str(REPO)
    run = functools.partial(
        subprocess.run, [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert run(env=env).stdout.strip() == str(physical_cores())
    assert run(env={**env, "TVM_NUM_THREADS": "1"}).stdout.strip() == "1"
