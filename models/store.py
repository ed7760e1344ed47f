"""The artifact store: content-addressed files on disk, served over HTTP.

Layout: ``<store>/sha256/<hex>`` holds the artifact (or FPGA bitstream) whose sha256 is
``<hex>``; its URL path is ``/sha256/<hex>``. ``<store>/bitstreams.json`` lists the bitstreams
builds may reference, by board and design. Any static HTTP server or object store in front of
this directory serves the same URLs; ``boost-build serve`` is the built-in one (HEAD, single
``Range``, ``ETag``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from agent.artifact import Manifest, read_manifest, sha256_file
from agent.errors import BoostError
from agent.fsutil import atomic_write_json
from vta.bitstreams import BitstreamError, BitstreamRef, CatalogEntry

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"^/sha256/([0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Published:
    digest: str
    path: Path
    manifest: Manifest

    @property
    def url_path(self) -> str:
        return f"/sha256/{self.digest}"


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path_of(self, digest: str) -> Path:
        return self.root / "sha256" / digest

    @property
    def bitstream_index(self) -> Path:
        return self.root / "bitstreams.json"

    def publish(self, artifact: Path) -> Published:
        """Copy an artifact into the store under its sha256 (atomically; idempotent)."""
        manifest = Manifest.from_json(read_manifest(artifact)[0], str(artifact))
        digest = sha256_file(artifact)
        return Published(digest, self._put(artifact, digest), manifest)

    def _put(self, source: Path, digest: str) -> Path:
        dest = self.path_of(digest)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{digest}.tmp-{os.getpid()}")
            try:
                shutil.copyfile(source, tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        return dest

    def bitstreams(self) -> dict[tuple[str, str], BitstreamRef]:
        """The bitstreams in the store, by (board, design)."""
        if not self.bitstream_index.exists():
            return {}
        try:
            raw = json.loads(self.bitstream_index.read_text())
            refs = [BitstreamRef.from_json(r, str(self.bitstream_index)) for r in raw]
        except (OSError, ValueError, BitstreamError) as err:
            raise BoostError(
                f"{self.bitstream_index} is damaged ({err}); remove it and add the bitstreams "
                "again with 'boost-build bitstream add'"
            ) from err
        return {(r.board, r.design): r for r in refs}

    def add_bitstream(self, bitstream: Path, entry: CatalogEntry) -> BitstreamRef:
        """Put a bitstream file into the store as the catalog ``entry``'s design for its board.

        The file must have the catalog's sha256; where the catalog has none yet, the file's own
        digest is pinned: every build and device checks against it from then on."""
        if not bitstream.is_file():
            raise BoostError(f"{bitstream}: no such file")
        digest = sha256_file(bitstream)
        if entry.sha256 and digest != entry.sha256:
            raise BoostError(
                f"{bitstream} has sha256 {digest}, the catalog's {entry.board} {entry.design} "
                f"bitstream has {entry.sha256}: obtain the file from {entry.source}"
            )
        self._put(bitstream, digest)
        ref = BitstreamRef(
            entry.board, entry.design, entry.file, digest, bitstream.stat().st_size,
            dict(entry.axi_widths),
        )  # fmt: skip
        index = self.bitstreams()
        index[ref.board, ref.design] = ref
        atomic_write_json(self.bitstream_index, [r.to_json() for r in index.values()])
        return ref


class _Handler(BaseHTTPRequestHandler):
    server: StoreServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _error(
        self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None
    ) -> None:
        data = (message + "\n").encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _serve(self, body: bool) -> None:
        match = _DIGEST.match(self.path.split("?", 1)[0])
        if match is None:
            self._error(
                HTTPStatus.NOT_FOUND, "not found: artifact URLs are /sha256/<64 hex digits>"
            )
            return
        digest = match.group(1)
        path = self.server.store.path_of(digest)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the `with f` below
        except FileNotFoundError:
            self._error(HTTPStatus.NOT_FOUND, f"no artifact {digest} in this store")
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            etag = f'"{digest}"'
            if self.headers.get("If-None-Match") == etag:
                self.send_response(HTTPStatus.NOT_MODIFIED)
                self.send_header("ETag", etag)
                self.end_headers()
                return
            first, last = 0, size - 1
            status = HTTPStatus.OK
            requested = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if requested is not None and (if_range is None or if_range == etag):
                parsed = _parse_range(requested, size)
                if parsed is None:
                    self._error(
                        HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                        f"range {requested!r} not satisfiable for {size} bytes",
                        {"Content-Range": f"bytes */{size}"},
                    )
                    return
                first, last = parsed
                status = HTTPStatus.PARTIAL_CONTENT
            length = last - first + 1
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            self.send_header("Cache-Control", "public, max-age=31536000, immutable")
            if status == HTTPStatus.PARTIAL_CONTENT:
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.end_headers()
            if not body:
                return
            f.seek(first)
            remaining = length
            try:
                while remaining > 0:
                    chunk = f.read(min(_CHUNK, remaining))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                log.debug("client went away during %s", self.path)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """First and last byte of a single ``bytes=`` range, or None when it is not satisfiable."""
    match = _RANGE.match(header.strip())
    if match is None or size == 0:
        return None
    start, end = match.groups()
    if start == "" and end == "":
        return None
    if start == "":
        suffix = int(end)
        return (max(0, size - suffix), size - 1) if suffix > 0 else None
    first = int(start)
    last = min(int(end), size - 1) if end else size - 1
    if first >= size or last < first:
        return None
    return first, last


class StoreServer(ThreadingHTTPServer):
    daemon_threads = True
    #: The listen backlog: a fleet downloads at once (socketserver's default of 5 drops the
    #: connections beyond it, and their clients retry a second later).
    request_queue_size = 1024

    def __init__(self, store: ArtifactStore, host: str, port: int) -> None:
        self.store = store
        try:
            super().__init__((host, port), _Handler)
        except OSError as err:
            raise BoostError(
                f"cannot listen on {host}:{port}: {err.strerror}; choose another [build.serve] port"
            ) from err

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def start_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="artifact-http", daemon=True)
        thread.start()
        return thread
