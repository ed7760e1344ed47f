"""An authenticated fleet: Mosquitto with TLS (a CA and certificates made here), a user per device
and an ACL that confines each device to its own topics; credentials come from files named in
deploy.toml. Also: the agent opens no inbound port, and hostile artifacts sent to a running agent
are rejected before anything is loaded."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import mqtt
from agent.config import BuildConfig, MqttConfig
from agent.errors import BoostError
from agent.protocol import build_reply_topic, device_topic, dumps, group_topic
from models.broker import LocalBroker, free_port
from models.fleet import Fleet
from tests.support.fleet import AgentProcess, CountingStore, Watcher, deploy

Keys = tuple[Path, Path]
BUILD_USER = "boost-build"
DEVICES = {"dev1": ["lab"], "dev2": []}

# The ACL the README's Security section documents: the build host may do anything under
# boost/v1; a device reads only its own and its groups' commands and the workers' answers to its
# build requests, and writes only its own documents, events, metrics, replies to the build host
# and build requests.
ACL = """\
user {build}
topic readwrite boost/v1/#

pattern read boost/v1/dev/%u/cmd/#
pattern write boost/v1/dev/%u/state
pattern write boost/v1/dev/%u/caps
pattern write boost/v1/dev/%u/models
pattern write boost/v1/dev/%u/events
pattern write boost/v1/dev/%u/metrics
pattern write boost/v1/build/replies/#
pattern write boost/v1/build/requests
pattern read boost/v1/build/replies/%u/#
"""


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate for 127.0.0.1 it signed: (ca.crt, server.crt, server.key)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("boost test CA"))
        .issuer_name(_name("boost test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@dataclass
class SecureBroker:
    url: str
    ca: Path
    secrets: Path

    def config(self, user: str) -> MqttConfig:
        """What a deploy.toml of ``user`` says: TLS, its name, the file with its password."""
        return MqttConfig(
            url=self.url, username=user, password_file=self.secrets / user, tls_ca=self.ca
        )


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[SecureBroker]:
    work = tmp_path / "tls-broker"
    work.mkdir()
    ca, cert, key = make_tls(work)
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    users = [BUILD_USER, *DEVICES]
    passwd = work / "passwd"
    passwd.write_text("".join(f"{u}:{os.urandom(12).hex()}-{u}\n" for u in users))
    for line in passwd.read_text().splitlines():
        user, password = line.split(":")
        (secrets / user).write_text(password + "\n")
        (secrets / user).chmod(0o600)
    subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True)
    acl = work / "acl"
    groups = "".join(
        f"\nuser {d}\n" + "".join(f"topic read boost/v1/group/{g}/cmd/#\n" for g in gs)
        for d, gs in DEVICES.items()
    )
    acl.write_text(ACL.format(build=BUILD_USER) + groups)
    port = free_port()
    extra = (
        f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
        f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\nuser root\n"
    )
    with LocalBroker(port, work, extra):
        yield SecureBroker(f"mqtts://127.0.0.1:{port}", ca, secrets)


def tls_agent(
    tmp_path: Path, broker: SecureBroker, device: str, store: CountingStore, keys: Keys
) -> AgentProcess:
    config = broker.config(device)
    return AgentProcess(
        tmp_path / device,
        device,
        broker.url,
        store.url,
        keys[1],
        extra="groups = [" + ", ".join(f'"{g}"' for g in DEVICES[device]) + "]",
        mqtt_extra=f'username = "{device}"\npassword_file = "{config.password_file}"\n'
        f'tls_ca = "{config.tls_ca}"',
    )


class Client:
    """A raw MQTT 5 session as one user, recording acknowledgements and messages."""

    def __init__(self, broker: SecureBroker, user: str) -> None:
        config = broker.config(user)
        self.client = mqtt.make_client(config, broker.url, f"raw-{user}", persistent=False)
        self.puback: dict[int, int] = {}
        self.suback: dict[int, list[int]] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.event = threading.Condition()
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda c, u, m: self._note(self.messages, (m.topic, m.payload))
        self.client.connect(**mqtt.connect_kwargs(config, broker.url, persistent=False))  # type: ignore[arg-type]
        self.client.loop_start()

    def _note(self, into: list[tuple[str, bytes]], item: tuple[str, bytes]) -> None:
        with self.event:
            into.append(item)
            self.event.notify_all()

    def _on_publish(self, c: object, u: object, mid: int, reason: object, props: object) -> None:
        with self.event:
            self.puback[mid] = int(getattr(reason, "value", 0))
            self.event.notify_all()

    def _on_subscribe(
        self, c: object, u: object, mid: int, reasons: list[object], props: object
    ) -> None:
        with self.event:
            self.suback[mid] = [int(getattr(r, "value", 0)) for r in reasons]
            self.event.notify_all()

    def publish(self, topic: str, payload: bytes) -> int:
        """The PUBACK reason code (0 = accepted, 135 = not authorized)."""
        mid = self.client.publish(topic, payload, qos=1).mid
        with self.event:
            assert self.event.wait_for(lambda: mid in self.puback, 10)
            return self.puback[mid]

    def subscribe(self, topic: str) -> int:
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        with self.event:
            assert self.event.wait_for(lambda: mid in self.suback, 10)
            return self.suback[mid][0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


NOT_AUTHORIZED = 135


def test_tls_credentials_and_acl_confine_each_device(
    secure_broker: SecureBroker,
    store: CountingStore,
    build: Callable[..., Path],
    keys: Keys,
    tmp_path: Path,
) -> None:
    agent = tls_agent(tmp_path, secure_broker, "dev1", store, keys).start()
    watcher = Watcher(secure_broker.url, config=secure_broker.config(BUILD_USER))
    intruder = Client(secure_broker, "dev2")
    try:
        watcher.state("dev1", True)
        # The build host deploys over TLS with its own credentials, from files.
        with Fleet(BuildConfig(mqtt=secure_broker.config(BUILD_USER))) as fleet:
            (outcome,) = deploy(fleet, store, build("tiny_cnn"))
            assert outcome.state == "active", (outcome, agent.log_text()[-3000:])
            assert fleet.request("dev1", "ping", {"request_id": "ping-1"}, 30)["ok"]

        # dev2 may speak for itself only.
        assert intruder.publish(device_topic("dev2", "state"), b'{"online": true}') == 0
        assert intruder.publish("boost/v1/build/requests", b"{}") == 0  # answered with an error
        mark = watcher.mark()
        ping = dumps({"request_id": "forged"})
        refused = {
            "command another device": (device_topic("dev1", "cmd/ping"), ping),
            "command a group": (group_topic("lab", "cmd/ping"), ping),
            "command itself": (device_topic("dev2", "cmd/undeploy"), ping),
            "forge another device's state": (device_topic("dev1", "state"), b'{"online": false}'),
            "forge another device's events": (device_topic("dev1", "events"), ping),
        }
        for what, (topic, payload) in refused.items():
            assert intruder.publish(topic, payload) == NOT_AUTHORIZED, what
        # Mosquitto grants any subscription and filters what it delivers by the ACL: dev2
        # sees none of dev1's commands or answers, though dev1 gets and answers them.
        for topic in (device_topic("dev1", "cmd/#"), "boost/v1/#", group_topic("lab", "cmd/#")):
            intruder.subscribe(topic)
        time.sleep(0.5)
        watcher.client.publish(build_reply_topic("dev1", "r"), b'{"request_id": "r"}', qos=1)
        for topic in (device_topic("dev1", "cmd/ping"), group_topic("lab", "cmd/ping")):
            request_id = f"secret-{topic.split('/')[2]}"
            watcher.client.publish(topic, dumps({"request_id": request_id}), qos=1)
            assert watcher.answer(request_id, mark)["ok"]
        time.sleep(1.0)
        seen = [(t, p) for t, p in intruder.messages if not t.startswith("boost/v1/dev/dev2/")]
        assert seen == [], seen
        forged = [
            t
            for t, p, _ in watcher.messages[mark:]
            if b"forged" in dumps(p) or t.endswith("dev1/state")
        ]
        assert forged == [], forged

        # Without the right password, or without TLS, nobody gets in.
        for config in (
            MqttConfig(url=secure_broker.url, tls_ca=secure_broker.ca),
            MqttConfig(
                url=secure_broker.url,
                username="dev1",
                password_file=secure_broker.secrets / "dev2",
                tls_ca=secure_broker.ca,
            ),
            MqttConfig(
                url=secure_broker.url.replace("mqtts", "mqtt"),
                username="dev1",
                password_file=secure_broker.secrets / "dev1",
            ),
        ):
            with pytest.raises(BoostError, match=r"refused|did not answer|cannot reach"):
                mqtt.connect_blocking(config, config.url, "stranger", timeout_s=3).loop_stop()
    finally:
        intruder.close()
        watcher.close()
        if agent.process is not None:
            agent.stop()


def listening_sockets(pid: int) -> list[str]:
    """The TCP/UDP sockets of process ``pid`` that listen or are bound for receiving."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            listening = fields[3] == "0A" if table.startswith("tcp") else fields[3] == "07"
            if fields[9] in inodes and listening:
                found.append(f"{table} {fields[1]}")
    return found


def test_the_agent_opens_no_inbound_port(
    agents: Callable[..., AgentProcess], watcher: Watcher
) -> None:
    agent = agents()
    watcher.state("dev1", True)
    assert agent.process is not None
    assert listening_sockets(agent.process.pid) == []


def test_an_unreadable_password_file_is_named(tmp_path: Path) -> None:
    config = MqttConfig(username="dev1", password_file=tmp_path / "missing")
    with pytest.raises(BoostError, match=r"password_file .*missing: cannot read a password"):
        mqtt.make_client(config, config.url, "dev1", persistent=True)
