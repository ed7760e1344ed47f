"""A serial line that damages traffic on purpose: a pseudo-terminal relayed to a device's.

Each frame crossing it (either way) may get one byte changed or random bytes in front of it; the
driver must retry and resynchronise, and the device must never run a request twice.
"""

from __future__ import annotations

import os
import random
import threading
import tty


class NoisyLine:
    def __init__(self, device_port: str, seed: int, damage: float, garbage: float) -> None:
        self.rng = random.Random(seed)
        self.damage, self.garbage = damage, garbage
        self.faults = 0
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.port = os.ttyname(self._slave)
        self._device = os.open(device_port, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self._device)
        self._lock = threading.Lock()
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._pump, args=(self._master, self._device), daemon=True),
            threading.Thread(target=self._pump, args=(self._device, self._master), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _spoil(self, frame: bytes) -> bytes:
        with self._lock:
            out = bytearray(frame)
            if len(out) > 1 and self.rng.random() < self.damage:
                at = self.rng.randrange(len(out) - 1)  # never the delimiter
                out[at] = (out[at] + self.rng.randrange(1, 255)) % 256
                self.faults += 1
            if self.rng.random() < self.garbage:
                out[:0] = bytes(self.rng.randrange(1, 256) for _ in range(self.rng.randint(1, 9)))
                self.faults += 1
            return bytes(out)

    def _pump(self, source: int, sink: int) -> None:
        pending = bytearray()
        while not self._stopping:
            try:
                chunk = os.read(source, 65536)
            except OSError:
                return
            pending += chunk
            while (end := pending.find(0)) >= 0:
                frame = bytes(pending[: end + 1])
                del pending[: end + 1]
                try:
                    os.write(sink, self._spoil(frame))
                except OSError:
                    return

    def close(self) -> None:
        self._stopping = True
        for fd in (self._master, self._slave, self._device):
            os.close(fd)
