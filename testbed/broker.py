"""Brokers for the local lab and the tests: a real Mosquitto when present, else embedded amqtt.

Each broker runs as its own OS process on a loopback port, so that restarts and kills are real.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from testbed.orphans import die_with_parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s")


class BrokerProcess:
    """An MQTT broker process on 127.0.0.1:`port`; `kind` is "mosquitto" or "amqtt"."""

    def __init__(self, kind: str = "auto", port: int | None = None, log_path: Path | None = None) -> None:
        if kind == "auto":
            kind = "mosquitto" if shutil.which("mosquitto") else "amqtt"
        if kind not in {"mosquitto", "amqtt"}:
            raise ValueError(f"broker kind must be mosquitto, amqtt or auto, got {kind!r}")
        self.kind = kind
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._dir = Path(tempfile.mkdtemp(prefix=f"emsfl-{kind}-"))
        self._log_path = log_path or self._dir / "broker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        if self.kind == "mosquitto":
            conf = self._dir / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n", encoding="utf-8"
            )
            return ["mosquitto", "-c", str(conf)]
        conf = self._dir / "amqtt.yaml"
        conf.write_text(
            "listeners:\n  default:\n    type: tcp\n"
            f"    bind: {self.host}:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
            "  amqtt.plugins.sys.broker.BrokerSysPlugin:\n    sys_interval: 0\n",
            encoding="utf-8",
        )
        amqtt = Path(sys.executable).parent / "amqtt"
        return [str(amqtt if amqtt.exists() else "amqtt"), "-c", str(conf)]

    def start(self) -> BrokerProcess:
        log = open(self._log_path, "ab")  # noqa: SIM115 - owned by the child process
        # Own session: a Ctrl-C in the terminal must not kill the broker before the roles have said goodbye.
        self.proc = subprocess.Popen(
            self._command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        try:
            wait_for_port(self.host, self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{self.kind} broker did not start; see {self._log_path}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
