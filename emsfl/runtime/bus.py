"""MQTT connection shared by every role: presence with a last will, validated JSON payloads.

Wraps paho-mqtt 2.x; callers get decoded, schema-checked payloads and never see raw bytes.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from emsfl.runtime.tls import TlsFiles
from protos import payloads, topics

log = logging.getLogger(__name__)

Handler = Callable[[str, dict[str, Any]], None]


class Bus:
    """One MQTT session of one process (role, id), announcing itself on its status topic."""

    def __init__(
        self,
        host: str,
        port: int,
        role: str,
        node_id: str,
        status_topic: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.role = role
        self.node_id = node_id
        self.status_topic = status_topic or topics.node_status(role, node_id)
        self._subs: list[tuple[str, str, Handler]] = []  # (filter, payload kind, handler)
        self._connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{role}-{node_id}", clean_session=True)
        self.client.will_set(self.status_topic, self._status("offline"), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(min_delay=1, max_delay=5)
        self.host, self.port = host, port
        self.tls = tls
        self._apply_credentials(os.environ)

    def _apply_credentials(self, env: Mapping[str, str]) -> None:
        """Broker credentials from the role's environment file (written by deploy/, read by systemd); TLS with the
        role's TLS files (the same as its gRPC hops, emsfl/runtime/tls.py), else from that environment.

        The plaintext local lab sets none of these and talks plaintext on loopback.
        """
        if env.get("EMSFL_MQTT_USERNAME"):
            self.client.username_pw_set(env["EMSFL_MQTT_USERNAME"], env.get("EMSFL_MQTT_PASSWORD") or None)
        if self.tls is not None:
            self.client.tls_set(ca_certs=str(self.tls.ca), certfile=str(self.tls.cert), keyfile=str(self.tls.key))
        elif env.get("EMSFL_TLS", "0") not in {"", "0", "false"}:
            self.client.tls_set(
                ca_certs=env.get("EMSFL_TLS_CA") or None,
                certfile=env.get("EMSFL_TLS_CERT") or None,
                keyfile=env.get("EMSFL_TLS_KEY") or None,
            )

    def _status(self, state: str, detail: dict[str, Any] | None = None) -> bytes:
        body: dict[str, Any] = {
            "schema": "emsfl.v1.status",
            "version": 1,
            "role": self.role,
            "id": self.node_id,
            "state": state,
        }
        if detail:
            body["detail"] = detail
        return payloads.encode("status", body)

    def start(self, timeout_s: float = 30.0) -> None:
        """Connect (retrying in the background) and wait until the first connection is up."""
        self.client.connect_async(self.host, self.port, keepalive=10)
        self.client.loop_start()
        if not self._connected.wait(timeout_s):
            self.client.loop_stop()
            raise ConnectionError(f"no MQTT broker answered at {self.host}:{self.port} within {timeout_s:.0f} s")

    def stop(self) -> None:
        """Say offline (as the last will would) and disconnect cleanly."""
        if self.client.is_connected():
            info = self.client.publish(self.status_topic, self._status("offline"), qos=1, retain=True)
            try:
                info.wait_for_publish(2)
            except (RuntimeError, ValueError):
                log.warning("could not say offline: the broker went away first (its last will says it)")
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, topic_filter: str, kind: str, handler: Handler) -> None:
        """Call `handler(topic, payload)` for every valid `kind` message; invalid ones are logged and dropped."""
        self._subs.append((topic_filter, kind, handler))
        if self._connected.is_set():
            self.client.subscribe(topic_filter, qos=1)

    def publish(self, topic: str, kind: str, payload: dict[str, Any], retain: bool = False) -> None:
        self.client.publish(topic, payloads.encode(kind, payload), qos=1, retain=retain)

    def announce(self, detail: dict[str, Any] | None = None) -> None:
        self.client.publish(self.status_topic, self._status("online", detail), qos=1, retain=True)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("MQTT connection refused: %s", reason)
            return
        for topic_filter, _, _ in self._subs:
            client.subscribe(topic_filter, qos=1)
        self.announce()
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT connection lost (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        for topic_filter, kind, handler in self._subs:
            if not mqtt.topic_matches_sub(topic_filter, message.topic):
                continue
            if not message.payload:  # a cleared retained message
                continue
            try:
                payload = payloads.decode(kind, message.payload)
            except payloads.PayloadError as exc:
                log.warning("dropped message on %s: %s", message.topic, exc)
                continue
            try:
                handler(message.topic, payload)
            except Exception:  # a handler bug must not kill the network thread
                log.exception("handler for %s failed", message.topic)
