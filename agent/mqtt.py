"""MQTT plumbing shared by the agent and ``boost-build``: one way to make a paho-mqtt 2.x client
from a ``[*.mqtt]`` table, and a blocking connect with a deadline for command-line tools."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import MqttConfig
from agent.errors import BoostError
from agent.retry import until_deadline

# How long the broker keeps a persistent agent session (queued QoS 1 commands) while it is away.
SESSION_EXPIRY_S = 7 * 24 * 3600


class MqttError(BoostError):
    """The broker could not be reached or refused us."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str, key: str = "[agent.mqtt] url") -> BrokerAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise MqttError(f"{key}: expected mqtt://host:port or mqtts://host:port, got {url!r}")
        try:
            port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        except ValueError as err:
            raise MqttError(f"{key}: bad port in {url!r}") from err
        return cls(parts.hostname, port, parts.scheme == "mqtts")


def make_client(config: MqttConfig, url: str, client_id: str, persistent: bool) -> paho.Client:
    """A paho client for ``url`` with the credentials, TLS and protocol of ``config``.

    ``persistent`` asks the broker to keep the session (subscriptions and queued QoS 1 messages)
    across disconnects, as the agent needs; tools use a clean session.
    """
    BrokerAddress.parse(url)
    v5 = config.protocol == "5"
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        clean_session=None if v5 else not persistent,
    )
    if config.username:
        client.username_pw_set(config.username, _password(config))
    if url.startswith("mqtts://") or config.tls_ca:
        client.tls_set(
            ca_certs=str(config.tls_ca) if config.tls_ca else None,
            certfile=str(config.tls_cert) if config.tls_cert else None,
            keyfile=str(config.tls_key) if config.tls_key else None,
        )
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    client.on_socket_open = _no_delay
    return client


def _no_delay(client: paho.Client, userdata: Any, sock: Any) -> None:
    """Send small packets at once: with Nagle's algorithm a reply published right after an
    acknowledgement waits for the broker's delayed ACK (40 ms on Linux) before it leaves."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _password(config: MqttConfig) -> str | None:
    """The password from ``password_file`` (its first line), so no secret sits in deploy.toml."""
    if config.password_file is None:
        return None
    try:
        return config.password_file.read_text().splitlines()[0]
    except (OSError, IndexError, UnicodeDecodeError) as err:
        raise MqttError(
            f"password_file {config.password_file}: cannot read a password from it ({err}); "
            "write the broker password on its first line"
        ) from err


def connect_properties(config: MqttConfig, persistent: bool) -> Properties | None:
    if config.protocol != "5":
        return None
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = SESSION_EXPIRY_S if persistent else 0
    return props


def connect_kwargs(config: MqttConfig, url: str, persistent: bool) -> dict[str, object]:
    """Arguments of ``client.connect``/``connect_async`` for this config."""
    address = BrokerAddress.parse(url)
    kwargs: dict[str, object] = {
        "host": address.host,
        "port": address.port,
        "keepalive": config.keepalive_s,
    }
    if config.protocol == "5":
        kwargs["clean_start"] = not persistent
        kwargs["properties"] = connect_properties(config, persistent)
    return kwargs


def expiring(config: MqttConfig, seconds: int) -> Properties | None:
    """PUBLISH properties asking an MQTT 5 broker to drop the message after ``seconds``."""
    if config.protocol != "5":
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.MessageExpiryInterval = seconds
    return props


def connect_blocking(
    config: MqttConfig, url: str, client_id: str, timeout_s: float = 10.0
) -> paho.Client:
    """Connect a tool's client and start its network thread; raises ``MqttError`` on failure."""
    client = make_client(config, url, client_id, persistent=False)
    connected = threading.Event()
    outcome: list[str] = []

    def on_connect(
        client: paho.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        outcome.append(str(reason))
        connected.set()

    client.on_connect = on_connect
    deadline = time.monotonic() + timeout_s
    try:  # a broker that is just starting refuses connections for a moment
        until_deadline(
            lambda: client.connect(**connect_kwargs(config, url, persistent=False)),  # type: ignore[arg-type]
            timeout_s,
            (OSError,),
        )
    except OSError as err:
        raise MqttError(
            f"cannot reach the MQTT broker at {url}: {err.strerror or err}; start it "
            "(boost-build serve starts a local one) or fix [build.mqtt] url"
        ) from err
    client.loop_start()
    if not connected.wait(max(0.0, deadline - time.monotonic())):
        client.loop_stop()
        raise MqttError(f"the MQTT broker at {url} did not answer within {timeout_s:.0f} s")
    if outcome[0] != "Success":
        client.loop_stop()
        raise MqttError(f"the MQTT broker at {url} refused the connection: {outcome[0]}")
    return client
