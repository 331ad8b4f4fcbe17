"""Shared fixtures: a real MQTT broker process per test that asks for one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from testbed.broker import BrokerProcess


def broker_kind() -> str:
    """Mosquitto when installed; the embedded amqtt otherwise, except under CI where Mosquitto is required."""
    if shutil.which("mosquitto"):
        return "mosquitto"
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but mosquitto is not on PATH: .ci/run must install it (apt-get install mosquitto)")
    return "amqtt"


@pytest.fixture
def broker() -> Iterator[BrokerProcess]:
    """A real broker on a free loopback port: Mosquitto, or embedded amqtt where Mosquitto is absent."""
    with BrokerProcess(broker_kind()) as proc:
        yield proc


@pytest.fixture(scope="module")
def module_broker() -> Iterator[BrokerProcess]:
    """The same broker, shared by the tests of one module (for a module-scoped lab run)."""
    with BrokerProcess(broker_kind()) as proc:
        yield proc
