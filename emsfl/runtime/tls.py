"""The TLS identity of one role: a CA, a certificate and its key (PEM files, as `emsfl pki` writes them).

One `TlsFiles` configures every hop of a role: the gRPC channels it dials and the server it runs (both mutual
TLS, emsfl/runtime/channel.py) and its MQTT session (emsfl/runtime/bus.py). Where a role gets it (ARCHITECTURE §7,
docs/INTERFACES.md):

- the flags `--tls-ca`, `--tls-cert`, `--tls-key` (all three or none), else
- the topology's `tls: {ca: PATH, cert: PATH, key: PATH}` (paths relative to the topology file; the deploy writes
  it into each host's topology), else
- `EMSFL_TLS=1` with `EMSFL_TLS_CA`, `EMSFL_TLS_CERT`, `EMSFL_TLS_KEY` in the environment (the deploy's env file).

`satellite.tls: true` in a topology says that the gRPC hops of the testbed run mutual TLS: a role that has no TLS
files then refuses to start instead of falling back to plaintext. `broker.tls: true` says that the MQTT sessions
use TLS, with the same files (client certificate included).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emsfl.config import ConfigError


class TlsError(ConfigError):
    """TLS settings that cannot work: the message names the flag, key or file."""


@dataclass(frozen=True)
class TlsPems:
    ca: bytes
    cert: bytes
    key: bytes


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # CA certificate: peers must present a certificate it signed
    cert: Path  # this role's certificate
    key: Path  # its private key

    def read(self, labels: tuple[str, str, str] = ("TLS CA certificate", "TLS certificate", "TLS key")) -> TlsPems:
        """The three PEMs; TlsError names (by `labels`: the flag or key it came from) a file that is missing,
        unreadable or not PEM."""
        pems = []
        for what, path in zip(labels, (self.ca, self.cert, self.key), strict=True):
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise TlsError(f"{what}: {path}: {exc.strerror or exc}") from None
            if b"-----BEGIN " not in data:
                raise TlsError(f"{what}: {path}: not a PEM file")
            pems.append(data)
        return TlsPems(*pems)

    def check(self, labels: tuple[str, str, str] = ("TLS CA certificate", "TLS certificate", "TLS key")) -> TlsFiles:
        self.read(labels)
        return self

    def flags(self) -> list[str]:
        """The `--tls-ca/--tls-cert/--tls-key` arguments that name these files on a role's command line."""
        return ["--tls-ca", str(self.ca), "--tls-cert", str(self.cert), "--tls-key", str(self.key)]


FLAGS = ("--tls-ca", "--tls-cert", "--tls-key")


def add_tls_flags(parser: argparse.ArgumentParser, serves: bool = False) -> None:
    """`--tls-ca/--tls-cert/--tls-key` on a role's command (`serves`: it also runs a gRPC server)."""
    peer = "clients and servers" if serves else "servers"
    parser.add_argument("--tls-ca", help=f"CA certificate (PEM) that {peer} must be signed by; with the two below")
    parser.add_argument("--tls-cert", help="this role's certificate (PEM, `emsfl pki issue`): mutual TLS on gRPC/MQTT")
    parser.add_argument("--tls-key", help="this role's private key (PEM)")


def from_flags(args: argparse.Namespace) -> TlsFiles | None:
    given: dict[str, str] = {}
    for flag in FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value:
            given[flag] = str(value)
    if not given:
        return None
    missing = [f for f in FLAGS if f not in given]
    if missing:
        raise TlsError(f"{', '.join(missing)}: required with {', '.join(given)} (mutual TLS needs all three)")
    return TlsFiles(Path(given["--tls-ca"]), Path(given["--tls-cert"]), Path(given["--tls-key"])).check(FLAGS)


def from_topology(topology: Mapping[str, Any], relative_to: Path | None = None) -> TlsFiles | None:
    raw = topology.get("tls")
    if raw is None or raw is False:
        return None
    if not isinstance(raw, Mapping) or set(raw) != {"ca", "cert", "key"}:
        raise TlsError(f"tls: expected a mapping with ca, cert and key (PEM paths), got {raw!r}")

    def path(key: str) -> Path:
        value = raw[key]
        if not isinstance(value, str) or not value:
            raise TlsError(f"tls.{key}: expected a file path, got {value!r}")
        p = Path(value)
        return p if p.is_absolute() or relative_to is None else relative_to / p

    return TlsFiles(path("ca"), path("cert"), path("key")).check(("tls.ca", "tls.cert", "tls.key"))


def from_env(env: Mapping[str, str]) -> TlsFiles | None:
    if env.get("EMSFL_TLS", "0") in {"", "0", "false"}:
        return None
    names = ("EMSFL_TLS_CA", "EMSFL_TLS_CERT", "EMSFL_TLS_KEY")
    missing = [n for n in names if not env.get(n)]
    if missing:
        raise TlsError(f"{missing[0]}: required with EMSFL_TLS=1")
    return TlsFiles(*(Path(env[n]) for n in names)).check(names)


def grpc_tls_required(topology: Mapping[str, Any]) -> bool:
    """`satellite.tls: true`: every gRPC hop of this testbed runs mutual TLS."""
    satellite = topology.get("satellite")
    return isinstance(satellite, Mapping) and satellite.get("tls") is True


def mqtt_tls(topology: Mapping[str, Any], tls: TlsFiles | None) -> TlsFiles | None:
    """The files of the role's MQTT session: its TLS files when the topology says `broker.tls: true` (TlsError
    when it has none), else None (a plaintext broker, e.g. the loopback lab's)."""
    broker = topology.get("broker")
    if not (isinstance(broker, Mapping) and broker.get("tls") is True):
        return None
    if tls is None:
        raise TlsError("broker.tls: the topology asks for MQTT over TLS, but no TLS files were given (--tls-*)")
    return tls


def resolve(
    args: argparse.Namespace,
    topology: Mapping[str, Any],
    topology_path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    grpc_role: bool = True,
) -> TlsFiles | None:
    """A role's TLS files from its flags, else its topology, else its environment; TlsError when a `grpc_role`'s
    topology says `satellite.tls: true` and none is given (no silent plaintext)."""
    import os

    relative_to = Path(topology_path).resolve().parent if topology_path is not None else None
    tls = from_flags(args) or from_topology(topology, relative_to) or from_env(os.environ if env is None else env)
    if tls is None and grpc_role and grpc_tls_required(topology):
        raise TlsError(
            "satellite.tls: the topology asks for mutual TLS, but no TLS files were given"
            " (--tls-ca/--tls-cert/--tls-key, the topology's tls: keys, or EMSFL_TLS_* in the environment)"
        )
    return tls
