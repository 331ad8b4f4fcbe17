"""Brokers for the local lab and the tests: a real Mosquitto when present, else embedded amqtt.

Each broker runs as its own OS process on a loopback port, so that restarts and kills are real. A Mosquitto can run
with TLS and the deployed ACL (`MosquittoTls`: every client presents a certificate of the lab's CA, and its
certificate's CN is its user name for deploy/roles/broker/files/emsfl.acl), or with a config given whole (the deploy
tests render deploy/roles/broker's own template).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from testbed.orphans import die_with_parent

DEPLOY_ACL = Path(__file__).resolve().parents[1] / "deploy" / "roles" / "broker" / "files" / "emsfl.acl"


@dataclass(frozen=True)
class MosquittoTls:
    ca: Path
    cert: Path  # the broker's server certificate (SAN 127.0.0.1)
    key: Path
    acl: Path | None = DEPLOY_ACL  # None: every authenticated client may do anything

    def conf(self, host: str, port: int) -> str:
        import pwd

        lines = [
            # run as whoever starts it (Mosquitto started by root drops to `mosquitto`, which could not read the
            # lab's private key in the run directory)
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            f"listener {port} {host}",
            "allow_anonymous false",
            f"cafile {self.ca}",
            f"certfile {self.cert}",
            f"keyfile {self.key}",
            "tls_version tlsv1.2",
            "require_certificate true",
            "use_identity_as_username true",  # the certificate's CN: c0, c0.d0, orbit, satellite, monitor
        ]
        if self.acl is not None:
            if not self.acl.is_file():
                raise FileNotFoundError(f"the broker ACL {self.acl} is missing (it comes with the repository)")
            lines.append(f"acl_file {self.acl}")
        return "\n".join(lines) + "\n"


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

    def __init__(
        self,
        kind: str = "auto",
        port: int | None = None,
        log_path: Path | None = None,
        tls: MosquittoTls | None = None,
        conf: str | None = None,
    ) -> None:
        if kind == "auto":
            kind = "mosquitto" if shutil.which("mosquitto") or tls or conf else "amqtt"
        if kind not in {"mosquitto", "amqtt"}:
            raise ValueError(f"broker kind must be mosquitto, amqtt or auto, got {kind!r}")
        if (tls is not None or conf is not None) and kind != "mosquitto":
            raise ValueError("TLS and a given config need the mosquitto broker")
        if kind == "mosquitto" and not shutil.which("mosquitto"):
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.tls = tls
        self.conf = conf
        self.kind = kind
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._dir = Path(tempfile.mkdtemp(prefix=f"emsfl-{kind}-"))
        self._log_path = log_path or self._dir / "broker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        if self.kind == "mosquitto":
            conf = self._dir / "mosquitto.conf"
            if self.conf is not None:
                body = self.conf
            elif self.tls is not None:
                body = "persistence false\n" + self.tls.conf(self.host, self.port)
            else:
                body = f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
            conf.write_text(body, encoding="utf-8")
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
