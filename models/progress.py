"""Progress for long build steps: a bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, interactive: bool | None = None) -> None:
        self.interactive = sys.stderr.isatty() if interactive is None else interactive

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        if self.interactive:
            sys.stderr.write(f"{name} ...")
            sys.stderr.flush()
        else:
            log.info("%s ...", name)
        yield
        elapsed = time.monotonic() - start
        if self.interactive:
            sys.stderr.write(f" done ({elapsed:.1f} s)\n")
        else:
            log.info("%s done (%.1f s)", name, elapsed)

    @contextmanager
    def counter(self, name: str, total: int) -> Iterator[Callable[[int], None]]:
        """A callback taking the number of units done so far, shown against ``total``."""
        bar = tqdm(total=total, desc=name, unit="trial", disable=not self.interactive, leave=True)
        last = [0]

        def update(done: int) -> None:
            done = min(done, total)
            if not self.interactive and done // max(1, total // 10) > last[0] // max(
                1, total // 10
            ):
                log.info("%s: %d/%d", name, done, total)
            bar.update(done - last[0])
            last[0] = done

        try:
            yield update
        finally:
            bar.close()
