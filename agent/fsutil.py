"""Crash-safe file updates: write a temporary file, fsync it, rename it over the old one, fsync
the directory. After a crash a reader finds either the old or the new contents, never a mix."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


def remove_stale_tmp(directory: Path) -> None:
    """Remove what ``atomic_write`` of a killed process left behind in ``directory``."""
    for stale in directory.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)
