from __future__ import annotations

import hashlib
import http.client
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from models.store import ArtifactStore, StoreServer
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def served(
    build: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[StoreServer, str, bytes]]:
    artifact = build("tiny_cnn")
    store = ArtifactStore(tmp_path_factory.mktemp("store"))
    published = store.publish(artifact)
    server = StoreServer(store, "127.0.0.1", 0)
    server.start_background()
    yield server, published.digest, artifact.read_bytes()
    server.shutdown()
    server.server_close()


def request(
    server: StoreServer, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), port, timeout=10)
    conn.request(method, path, headers=headers or {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def test_publish_is_content_addressed_and_idempotent(
    build: Callable[..., Path], tmp_path: Path
) -> None:
    artifact = build("tiny_cnn")
    store = ArtifactStore(tmp_path)
    first, second = store.publish(artifact), store.publish(artifact)
    assert first.digest == second.digest == hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert first.path == tmp_path / "sha256" / first.digest
    assert first.path.read_bytes() == artifact.read_bytes()
    assert [p.name for p in (tmp_path / "sha256").iterdir()] == [first.digest]


def test_publish_cli_prints_digest_and_url(build: Callable[..., Path], tmp_path: Path) -> None:
    artifact = build("tiny_cnn")
    result = run_cli(
        "models.cli", "publish", str(artifact), cwd=tmp_path, env={"BOOST_BUILD_SERVE_PORT": "9999"}
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert out == {
        "sha256": digest,
        "url": f"http://127.0.0.1:9999/sha256/{digest}",
        "name": "tiny_cnn-1-x86_64.boost",
    }
    assert (tmp_path / ".boost/store/sha256" / digest).is_file()


def test_full_get(served: tuple[StoreServer, str, bytes]) -> None:
    server, digest, data = served
    status, headers, body = request(server, "GET", f"/sha256/{digest}")
    assert status == 200 and body == data
    assert headers["content-length"] == str(len(data))
    assert headers["etag"] == f'"{digest}"'
    assert headers["accept-ranges"] == "bytes"


def test_head(served: tuple[StoreServer, str, bytes]) -> None:
    server, digest, data = served
    status, headers, body = request(server, "HEAD", f"/sha256/{digest}")
    assert (status, body) == (200, b"")
    assert headers["content-length"] == str(len(data))


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=0-99", 0, 99),
        ("bytes=100-", 100, None),
        ("bytes=-50", -50, None),
        ("bytes=10-999999999", 10, None),
    ],
)
def test_ranged_get(
    served: tuple[StoreServer, str, bytes], header: str, first: int, last: int | None
) -> None:
    server, digest, data = served
    status, headers, body = request(server, "GET", f"/sha256/{digest}", {"Range": header})
    expected = data[first:] if last is None else data[first : last + 1]
    start = first % len(data)
    assert status == 206 and body == expected
    assert headers["content-range"] == f"bytes {start}-{start + len(expected) - 1}/{len(data)}"


def test_if_range_with_another_etag_sends_everything(
    served: tuple[StoreServer, str, bytes],
) -> None:
    server, digest, data = served
    status, _, body = request(
        server, "GET", f"/sha256/{digest}", {"Range": "bytes=0-9", "If-Range": '"other"'}
    )
    assert status == 200 and body == data


def test_not_modified(served: tuple[StoreServer, str, bytes]) -> None:
    server, digest, _ = served
    status, _, body = request(server, "GET", f"/sha256/{digest}", {"If-None-Match": f'"{digest}"'})
    assert (status, body) == (304, b"")


@pytest.mark.parametrize(
    "header", ["bytes=999999999-", "bytes=5-2", "bytes=abc", "bytes=-0", "items=0-1"]
)
def test_bad_range(served: tuple[StoreServer, str, bytes], header: str) -> None:
    server, digest, data = served
    status, headers, _ = request(server, "GET", f"/sha256/{digest}", {"Range": header})
    assert status == 416
    assert headers["content-range"] == f"bytes */{len(data)}"


def test_missing_object_and_bad_paths(served: tuple[StoreServer, str, bytes]) -> None:
    server, _, _ = served
    status, _, body = request(server, "GET", "/sha256/" + "0" * 64)
    assert status == 404 and b"no artifact" in body
    for path in ("/", "/sha256/../../etc/passwd", "/sha256/ABC"):
        status, _, body = request(server, "GET", path)
        assert status == 404 and b"/sha256/<64 hex digits>" in body


def test_concurrent_clients(served: tuple[StoreServer, str, bytes]) -> None:
    server, digest, data = served

    def fetch(i: int) -> bytes:
        start = (i * 997) % len(data)
        status, _, body = request(server, "GET", f"/sha256/{digest}", {"Range": f"bytes={start}-"})
        assert status == 206
        return body

    with ThreadPoolExecutor(max_workers=16) as pool:
        bodies = list(pool.map(fetch, range(64)))
    for i, body in enumerate(bodies):
        assert body == data[(i * 997) % len(data) :]


def test_serve_reports_a_busy_port(served: tuple[StoreServer, str, bytes], tmp_path: Path) -> None:
    server, _, _ = served
    port = server.server_address[1]
    result = run_cli("models.cli", "serve", "--port", str(port), cwd=tmp_path)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
