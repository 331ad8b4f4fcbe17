"""Operator commands on `emsfl/v1/orbit/cmd/<verb>` (JSON, `protos/mqtt/cmd.schema.json`).

Verbs: `link` {cluster, state: up|down|auto, duration_s?, delay_s?, rate_bps?, loss?}, `pause`, `resume`,
`scale` {scale}, `reload`. Every command gets an answer on `emsfl/v1/orbit/cmd/reply` (`cmd_reply` schema,
echoing `id`); a malformed or impossible one is refused there and in the log, and changes nothing.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from emsfl.config import ConfigError
from emsfl.runtime.events import EventLog
from orbit_service.plan import Plan
from orbit_service.publisher import OrbitPublisher
from protos import payloads, topics

log = logging.getLogger(__name__)

CMD_FILTER = f"{topics.ORBIT_CMD}/+"
REPLY_TOPIC = f"{topics.ORBIT_CMD}/reply"
VERBS = ("link", "pause", "resume", "scale", "reload")
# Fields each verb takes (beyond schema, version, id).
FIELDS = {
    "link": {"cluster", "state", "duration_s", "delay_s", "rate_bps", "loss"},
    "pause": set(),
    "resume": set(),
    "scale": {"scale"},
    "reload": set(),
}
REQUIRED = {"link": {"cluster", "state"}, "scale": {"scale"}}


class CommandError(ValueError):
    pass


def check_command(verb: str, data: bytes | bytearray | str) -> dict[str, Any]:
    """The validated command, or CommandError naming what is wrong."""
    if verb not in VERBS:
        raise CommandError(f"unknown verb {verb!r}; expected one of {', '.join(VERBS)}")
    try:
        body = payloads.decode("cmd", data)
    except payloads.PayloadError as exc:
        raise CommandError(str(exc)) from None
    extra = set(body) - {"schema", "version", "id"} - FIELDS[verb]
    if extra:
        raise CommandError(f"{verb}: unexpected field(s) {', '.join(sorted(extra))}")
    missing = REQUIRED.get(verb, set()) - set(body)
    if missing:
        raise CommandError(f"{verb}: missing field(s) {', '.join(sorted(missing))}")
    return body


def make_command(verb: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"schema": "emsfl.v1.cmd", "version": 1, "id": uuid.uuid4().hex}
    body.update({k: v for k, v in fields.items() if v is not None})
    return body


class CommandListener:
    """Subscribes to the command topics with its own MQTT session and applies commands to the publisher."""

    def __init__(
        self,
        host: str,
        port: int,
        publisher: OrbitPublisher,
        reloader: Callable[[], Plan] | None = None,
        events: EventLog | None = None,
    ) -> None:
        self.publisher = publisher
        self.reloader = reloader
        self.events = events
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"orbit-cmd-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda c, *a: c.subscribe(CMD_FILTER, qos=1)
        self.client.on_message = self._on_message
        self._connected = threading.Event()
        self.client.on_subscribe = lambda *a: self._connected.set()
        self.host, self.port = host, port

    def start(self, timeout_s: float = 10.0) -> None:
        self.client.connect_async(self.host, self.port, keepalive=10)
        self.client.loop_start()
        if not self._connected.wait(timeout_s):
            log.warning("command topics not subscribed within %.0f s; retrying in the background", timeout_s)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _reply(self, verb: str, cmd_id: Any, error: str | None) -> None:
        body = {
            "schema": "emsfl.v1.cmd_reply",
            "version": 1,
            "id": cmd_id if isinstance(cmd_id, str) else None,
            "verb": verb,
            "ok": error is None,
            "error": error,
            "clock": self.publisher.clock.to_payload(),
        }
        self.client.publish(REPLY_TOPIC, payloads.encode("cmd_reply", body), qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        verb = message.topic.rsplit("/", 1)[-1]
        if verb == "reply" or not message.payload:
            return
        cmd_id: Any = None
        try:
            raw = json.loads(message.payload)
            cmd_id = raw.get("id") if isinstance(raw, dict) else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
        try:
            body = check_command(verb, message.payload)
            self.apply(verb, body)
        except (CommandError, KeyError, ValueError, ConfigError) as exc:
            error = str(exc.args[0]) if isinstance(exc, KeyError) else str(exc)
            log.warning("refused command %s: %s", verb, error)
            if self.events is not None:
                self.events.emit("cmd_refused", self.publisher.clock.now(), verb=verb, error=error)
            self._reply(verb, cmd_id, error)
            return
        except Exception as exc:  # never kill the network thread
            log.exception("command %s failed", verb)
            self._reply(verb, cmd_id, f"internal error: {exc}")
            return
        log.info("applied command %s %s", verb, {k: v for k, v in body.items() if k not in ("schema", "version")})
        if self.events is not None:
            self.events.emit("cmd", self.publisher.clock.now(), verb=verb, cmd_id=cmd_id)
        self._reply(verb, cmd_id, None)

    def apply(self, verb: str, body: dict[str, Any]) -> None:
        p = self.publisher
        if verb == "pause":
            p.pause()
        elif verb == "resume":
            p.resume()
        elif verb == "scale":
            p.set_scale(float(body["scale"]))
        elif verb == "link":
            p.force(
                body["cluster"],
                body["state"],
                body.get("duration_s"),
                delay_s=body.get("delay_s"),
                rate_bps=body.get("rate_bps"),
                loss=body.get("loss"),
            )
        elif verb == "reload":
            if self.reloader is None:
                raise CommandError("reload: this run has no plan source to re-read")
            p.reload(self.reloader())
