"""The project's Mosquitto config and ACL (deploy/roles/broker) on a real Mosquitto over TLS with `emsfl pki` certs.

Only the orbit credential may publish link state; a ground (cluster) credential reads only its own link topic and
publishes only its own presence; without a client certificate or a valid password nobody gets in.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from deploy_helpers import DEPLOY, require
from paho.mqtt.enums import CallbackAPIVersion

from emsfl import pki
from testbed.broker import BrokerProcess, free_port
from tests.helpers import mqtt_connect

USERS = ("orbit", "satellite", "operator", "c0", "c1")
QUIET_S = 1.5


@dataclass
class Broker:
    port: int
    pki_dir: Path
    passwords: dict[str, str]


@dataclass
class Client:
    client: mqtt.Client
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def topics(self) -> list[str]:
        with self.lock:
            return [t for t, _ in self.messages]

    def payloads(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p in self.messages if t == topic]


def _render_conf(directory: Path, port: int) -> str:
    jinja2 = pytest.importorskip("jinja2", reason="jinja2 (pulled in by ansible-core, extra [deploy]) is missing")
    template = jinja2.Template((DEPLOY / "roles/broker/templates/emsfl.conf.j2").read_text(encoding="utf-8"))
    body = template.render(
        emsfl_mosquitto_dir=str(directory),
        emsfl_broker_port=port,
        emsfl_mosquitto_bind="127.0.0.1",
        emsfl_tls=True,
        emsfl_mqtt_require_certificate=True,
    )
    # Test-only lines: no privilege drop (the files are in a private temp dir), no persistence, log to stderr.
    return "user root\npersistence false\nlog_dest stderr\n" + body


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    require(shutil.which("mosquitto") is not None, "mosquitto is not installed (apt-get install mosquitto)")
    require(
        shutil.which("mosquitto_passwd") is not None, "mosquitto_passwd is not installed (apt-get install mosquitto)"
    )
    directory = tmp_path_factory.mktemp("acl-broker")
    pki_dir = directory / "pki"
    pki.init_ca(pki_dir)
    pki.issue(pki_dir, "broker", "server", sans=["127.0.0.1", "localhost"])
    for user in USERS:
        pki.issue(pki_dir, user, "client", cluster=user if user.startswith("c") else None)
    shutil.copy(pki_dir / "ca.crt", directory / "ca.crt")
    shutil.copy(pki_dir / "broker.crt", directory / "broker.crt")
    shutil.copy(pki_dir / "broker.key", directory / "broker.key")
    shutil.copy(DEPLOY / "roles/broker/files/emsfl.acl", directory / "acl")
    passwords = {user: f"pw-{user}-{i}" for i, user in enumerate(USERS)}
    (directory / "passwd").touch(mode=0o600)
    for user, password in passwords.items():
        subprocess.run(["mosquitto_passwd", "-b", str(directory / "passwd"), user, password], check=True, timeout=30)
    port = free_port()
    # the shared Mosquitto launcher (testbed/broker.py), here with the deploy role's own rendered config
    broker = BrokerProcess(
        "mosquitto", port=port, log_path=directory / "mosquitto.log", conf=_render_conf(directory, port)
    )
    with broker:
        yield Broker(port, pki_dir, passwords)


def _connect(broker: Broker, user: str, password: str | None = None, cert: bool = True) -> tuple[Client, Any]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{user}-{time.monotonic_ns()}")
    state = Client(client)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(broker.pki_dir / "ca.crt"))
    if cert:
        ctx.load_cert_chain(str(broker.pki_dir / f"{user}.crt"), str(broker.pki_dir / f"{user}.key"))

    def on_message(topic: str, payload: bytes) -> None:
        with state.lock:
            state.messages.append((topic, payload))

    login = broker.passwords.get(user) if password is None else password
    return state, mqtt_connect(client, broker.port, ctx, user, login, on_message)


def _ok(broker: Broker, user: str) -> Client:
    state, reason = _connect(broker, user)
    assert not isinstance(reason, Exception) and not reason.is_failure, f"{user} could not connect: {reason}"
    return state


def _stop(*clients: Client) -> None:
    for state in clients:
        state.client.disconnect()
        state.client.loop_stop()


def _subscribe(state: Client, *filters: str) -> None:
    for topic_filter in filters:
        state.client.subscribe(topic_filter, qos=1)
    time.sleep(0.3)


def _publish(state: Client, topic: str, payload: bytes, retain: bool = False) -> None:
    state.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)


def test_only_the_orbit_credential_publishes_link_state(acl_broker: Broker) -> None:
    operator, orbit, ground = _ok(acl_broker, "operator"), _ok(acl_broker, "orbit"), _ok(acl_broker, "c0")
    try:
        _subscribe(operator, "emsfl/v1/#")
        _publish(orbit, "emsfl/v1/link/c0", b"orbit-up-c0", retain=True)
        _publish(orbit, "emsfl/v1/link/c1", b"orbit-up-c1", retain=True)
        _publish(orbit, "emsfl/v1/clock", b"orbit-clock", retain=True)
        for topic in ("emsfl/v1/link/c0", "emsfl/v1/link/c1", "emsfl/v1/clock"):
            _publish(ground, topic, b"forged", retain=True)
        _publish(ground, "emsfl/v1/contacts/c0", b"forged", retain=True)
        _publish(ground, "emsfl/v1/orbit/status", b"forged", retain=True)
        time.sleep(QUIET_S)
        assert operator.payloads("emsfl/v1/link/c0") == [b"orbit-up-c0"]
        assert operator.payloads("emsfl/v1/link/c1") == [b"orbit-up-c1"]
        assert operator.payloads("emsfl/v1/clock") == [b"orbit-clock"]
        assert not [p for _, p in operator.messages if p == b"forged"]
    finally:
        _stop(operator, orbit, ground)


def test_a_cluster_reads_only_its_own_link_and_contacts(acl_broker: Broker) -> None:
    orbit = _ok(acl_broker, "orbit")
    try:
        for cluster in ("c0", "c1"):
            _publish(orbit, f"emsfl/v1/link/{cluster}", f"up-{cluster}".encode(), retain=True)
            _publish(orbit, f"emsfl/v1/contacts/{cluster}", f"windows-{cluster}".encode(), retain=True)
        _publish(orbit, "emsfl/v1/clock", b"clock", retain=True)
        _publish(orbit, "emsfl/v1/orbit/status", b"online", retain=True)
        ground = _ok(acl_broker, "c0")
        try:
            _subscribe(ground, "emsfl/v1/link/#", "emsfl/v1/link/c1", "emsfl/v1/contacts/#", "emsfl/v1/clock")
            _subscribe(ground, "emsfl/v1/orbit/status")
            _publish(orbit, "emsfl/v1/link/c1", b"up-c1-again", retain=True)
            _publish(orbit, "emsfl/v1/link/c0", b"up-c0-again", retain=True)
            time.sleep(QUIET_S)
            topics = set(ground.topics())
            assert {"emsfl/v1/link/c0", "emsfl/v1/contacts/c0", "emsfl/v1/clock", "emsfl/v1/orbit/status"} <= topics
            assert "emsfl/v1/link/c1" not in topics
            assert "emsfl/v1/contacts/c1" not in topics
            assert ground.payloads("emsfl/v1/link/c0")[-1] == b"up-c0-again"
        finally:
            _stop(ground)
    finally:
        _stop(orbit)


def test_a_cluster_publishes_only_its_own_presence(acl_broker: Broker) -> None:
    operator, ground = _ok(acl_broker, "operator"), _ok(acl_broker, "c0")
    try:
        _subscribe(operator, "emsfl/v1/node/#")
        _publish(ground, "emsfl/v1/node/ground/c0/status", b"online-c0")
        _publish(ground, "emsfl/v1/node/ground/c1/status", b"spoofed")
        _publish(ground, "emsfl/v1/node/satellite/sat/status", b"spoofed")
        time.sleep(QUIET_S)
        assert operator.payloads("emsfl/v1/node/ground/c0/status") == [b"online-c0"]
        assert b"spoofed" not in [p for _, p in operator.messages]
    finally:
        _stop(operator, ground)


def test_no_entry_without_a_password_or_a_client_certificate(acl_broker: Broker) -> None:
    state, reason = _connect(acl_broker, "c0", password="wrong")
    assert isinstance(reason, Exception) or reason.is_failure
    _stop(state)
    state, reason = _connect(acl_broker, "c0", cert=False)
    assert isinstance(reason, Exception) or reason.is_failure
    _stop(state)
