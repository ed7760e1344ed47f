"""Artifact downloads: allow-listed URLs only, resumable, verified, atomic.

Bytes go into ``<digest>.partial``; an interrupted transfer resumes from its size with an HTTP
``Range`` request (guarded by ``If-Range`` on the content-addressed ETag). When every byte is there
the file is fsynced, its sha256 checked and only then renamed to its final name, so a reader never
sees a partial or corrupt artifact under the final name. A connection that ends early is resumed at
once when it brought bytes; only attempts that bring nothing count against the policy and wait.
A full disk, or a server sending more than the announced size, ends the download and removes the
partial file.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from agent.artifact import sha256_file
from agent.errors import BoostError
from agent.fsutil import fsync_dir

log = logging.getLogger(__name__)

_CHUNK = 1 << 16


class DownloadError(BoostError):
    """An artifact could not be downloaded, or its bytes do not match the expected sha256."""


class DiskFullError(DownloadError):
    """The filesystem filled up during a download."""


class OverrunError(DownloadError):
    """The server sent more bytes than the deploy command announced."""


def url_allowed(url: str, allowed_hosts: Iterable[str]) -> bool:
    """Whether ``url`` lies under one of the allow-listed base URLs (scheme, host, port, path)."""
    target = urlsplit(url)
    if target.scheme not in ("http", "https") or target.username or target.password:
        return False
    for base in allowed_hosts:
        allowed = urlsplit(base)
        prefix = allowed.path.rstrip("/") + "/"
        if (
            target.scheme == allowed.scheme
            and target.netloc.lower() == allowed.netloc.lower()
            and (target.path + "/").startswith(prefix)
        ):
            return True
    return False


@dataclass(frozen=True)
class DownloadPolicy:
    #: Consecutive attempts that bring no byte before the download is given up.
    attempts: int = 6
    timeout_s: float = 30.0
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0


Progress = Callable[[int, int], None]
"""Called with (bytes on disk, total) as the download advances."""


def download(
    url: str,
    dest: Path,
    sha256: str,
    size: int,
    progress: Progress,
    policy: DownloadPolicy,
) -> int:
    """Fetch ``url`` into ``dest`` (resuming ``dest.partial``); returns the bytes transferred."""
    if dest.exists() and sha256_file(dest) == sha256:  # finished before the agent was stopped
        return 0
    partial = dest.with_name(dest.name + ".partial")
    transferred = 0
    idle = 0  # attempts in a row that brought nothing
    while True:
        before = _size(partial)
        try:
            transferred += _fetch(url, partial, sha256, size, progress, policy.timeout_s)
            break
        except (OSError, http.client.HTTPException, DownloadError) as err:
            if isinstance(err, OverrunError):
                partial.unlink(missing_ok=True)
                raise
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                partial.unlink(missing_ok=True)
                raise DiskFullError(
                    f"{url}: the disk holding {dest.parent} is full ({err.strerror}); the "
                    "partial download was removed"
                ) from err
            if isinstance(err, urllib.error.HTTPError) and err.code in (403, 404, 410):
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
            if _size(partial) > before:
                transferred += _size(partial) - before
                idle = 0
                log.info("download %s: %s; resuming at byte %d", url, err, _size(partial))
                continue
            idle += 1
            if idle == policy.attempts:
                raise DownloadError(
                    f"{url}: gave up after {idle} attempts without progress, last error: {err}"
                ) from err
            delay = min(policy.backoff_s * 2 ** (idle - 1), policy.max_backoff_s)
            log.info("download %s: %s; retrying in %.1f s", url, err, delay)
            time.sleep(delay)
    actual = sha256_file(partial)
    if actual != sha256:
        partial.unlink()
        raise DownloadError(
            f"{url}: sha256 {actual} does not match the deploy command's {sha256}; "
            "the store holds other bytes than the command announced"
        )
    os.replace(partial, dest)
    fsync_dir(dest.parent)
    return transferred


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fetch(
    url: str, partial: Path, sha256: str, size: int, progress: Progress, timeout_s: float
) -> int:
    have = _size(partial)
    if have > size:
        partial.unlink()
        have = 0
    if have == size:
        return 0
    request = urllib.request.Request(url)
    if have:
        request.add_header("Range", f"bytes={have}-")
        request.add_header("If-Range", f'"{sha256}"')
    transferred = 0
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        if have and response.status == 200:
            log.info("download %s: the server ignored the range, starting over", url)
            have = 0
        elif have and response.status != 206:
            raise DownloadError(f"{url}: unexpected HTTP {response.status} to a range request")
        with open(partial, "r+b" if have else "wb") as out:
            out.seek(have)
            out.truncate()
            try:
                while chunk := response.read(_CHUNK):
                    if have + len(chunk) > size:
                        raise OverrunError(
                            f"{url}: the server sent more than the {size} bytes the deploy "
                            "command announced; the partial download was removed"
                        )
                    out.write(chunk)
                    have += len(chunk)
                    transferred += len(chunk)
                    progress(have, size)
            finally:
                out.flush()
                os.fsync(out.fileno())
    if have != size:
        raise DownloadError(f"{url}: connection ended at byte {have} of {size}")
    return transferred
