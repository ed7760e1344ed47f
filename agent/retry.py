"""Waiting for a service that may still be starting, with a deadline in seconds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def until_deadline(
    action: Callable[[], T],
    wait_s: float,
    errors: tuple[type[BaseException], ...],
    interval_s: float = 0.2,
) -> T:
    """Call ``action`` until it stops raising ``errors`` or ``wait_s`` has passed; then the last
    error propagates."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return action()
        except errors:
            if time.monotonic() + interval_s >= deadline:
                raise
            time.sleep(interval_s)
