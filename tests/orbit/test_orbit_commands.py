"""Operator commands over a real broker: applied, or refused with the reason on the reply topic."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from emsfl.runtime.bus import Bus
from emsfl.runtime.clock import EmulatedClock
from orbit_service.cli import main
from orbit_service.commands import REPLY_TOPIC, CommandListener
from orbit_service.contacts import Window
from orbit_service.link import LinkModel
from orbit_service.plan import Plan
from orbit_service.publisher import OrbitPublisher
from protos import topics
from testbed.broker import BrokerProcess

START = datetime(2026, 3, 20, 6, 0, tzinfo=timezone.utc)


def _plan() -> Plan:
    plan = Plan(START, START + timedelta(hours=10), 60.0, {}, {})
    plan.windows = {"c0": [Window(START + timedelta(hours=1), START + timedelta(hours=2), "A", 50.0, 10.0, 1800.0)]}
    return plan


@pytest.fixture
def service(broker: BrokerProcess) -> Iterator[OrbitPublisher]:
    bus = Bus(broker.host, broker.port, role="orbit", node_id="orbit", status_topic=topics.ORBIT_STATUS)
    bus.start()
    pub = OrbitPublisher(_plan(), bus, EmulatedClock(START, time.time(), 60.0), LinkModel(), 3)
    listener = CommandListener(broker.host, broker.port, pub, reloader=_plan)
    pub.start()
    listener.start()
    try:
        yield pub
    finally:
        listener.stop()
        pub.stop()
        bus.stop()


def test_override_cli_applies_commands(
    broker: BrokerProcess, service: OrbitPublisher, capsys: pytest.CaptureFixture[str]
) -> None:
    b = f"{broker.host}:{broker.port}"
    assert main(["override", "--broker", b, "link", "--cluster", "c0", "--state", "up", "--duration-s", "600"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert service.forced["c0"].state == "up"
    assert main(["override", "--broker", b, "pause"]) == 0 and service.clock.paused
    assert main(["override", "--broker", b, "resume"]) == 0 and not service.clock.paused
    assert main(["override", "--broker", b, "scale", "600"]) == 0 and service.clock.scale == 600.0
    assert main(["override", "--broker", b, "reload"]) == 0 and "c0" not in service.forced
    capsys.readouterr()
    assert main(["override", "--broker", b, "link", "--cluster", "zz", "--state", "down"]) == 1
    assert "unknown cluster 'zz'" in capsys.readouterr().err


def test_malformed_command_gets_an_error_reply(broker: BrokerProcess, service: OrbitPublisher) -> None:
    replies: list[dict[str, Any]] = []
    ready, got = threading.Event(), threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw-operator")
    client.on_connect = lambda c, *a: c.subscribe(REPLY_TOPIC, qos=1)
    client.on_subscribe = lambda *a: ready.set()

    def on_message(c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        replies.append(json.loads(msg.payload))
        got.set()

    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        assert ready.wait(10)
        client.publish(f"{topics.ORBIT_CMD}/scale", b'{"schema": "emsfl.v1.cmd", "version": 1, "scale": "fast"}', qos=1)
        assert got.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()
    assert replies[0]["ok"] is False and "scale" in replies[0]["error"]
    assert service.clock.scale == 60.0  # nothing changed
