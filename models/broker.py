"""A local Mosquitto broker, so that a lab needs no separately installed broker.

``boost-build serve`` starts one when ``[build.mqtt] url`` is empty; the test fixtures start one
per test on a free loopback port. It listens on 127.0.0.1 only and keeps nothing on disk.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from agent.errors import BoostError

log = logging.getLogger(__name__)

_SEARCH = ("/usr/sbin", "/usr/local/sbin", "/usr/bin")


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path=":".join(_SEARCH))
    if found is None:
        raise BoostError(
            "mosquitto not found: install it (apt-get install mosquitto) or set [build.mqtt] url "
            "to a broker you run"
        )
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalBroker:
    """``mosquitto`` on ``127.0.0.1:port``; a context manager that stops it on exit.

    Two settings differ from Mosquitto's defaults, as the README advises for a fleet's broker:
    ``set_tcp_nodelay`` (small answers leave at once, not after a delayed ACK) and a
    ``max_queued_messages`` far above 1000 (a tool subscribing to every device's retained
    documents gets three per device at once; beyond the queue Mosquitto drops them)."""

    def __init__(self, port: int, workdir: Path, extra_config: str = "") -> None:
        self.port = port
        self.workdir = workdir
        self.extra_config = extra_config
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> LocalBroker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "set_tcp_nodelay true\n"
            "max_queued_messages 100000\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\n" + self.extra_config
        )
        log_file = open(self.workdir / "mosquitto.log", "ab")  # noqa: SIM115 - owned by Popen
        self.process = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf)], stdout=log_file, stderr=log_file
        )
        log_file.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BoostError(
                    f"mosquitto exited at start (code {self.process.returncode}); see "
                    f"{self.workdir / 'mosquitto.log'}; is port {self.port} in use? "
                    "choose another [build.serve] broker_port"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                log.info("local MQTT broker at %s", self.url)
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BoostError(f"mosquitto did not listen on port {self.port} within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
