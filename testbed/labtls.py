"""`emsfl lab up --tls`: a throwaway CA and one certificate per role in the run directory (`<run>/pki`).

Every gRPC hop (ground agent and gateway to the satellite, device to its gateway) runs mutual TLS and every MQTT
session TLS with a client certificate, against a Mosquitto that takes the certificate's CN as the user name for the
deployed ACL (deploy/roles/broker/files/emsfl.acl). Names, as `emsfl pki` issues them:

- `satellite`, `broker`: server certificates for 127.0.0.1 and localhost;
- `orbit`, `monitor` (the lab's own watcher, read-only in the ACL): service client certificates;
- a single-device cluster `c0`: a cluster client certificate `c0`;
- a cluster `c1` of several devices: a gateway certificate `gw-c1` (cluster c1, serving 127.0.0.1) and one device
  certificate `c1-d0`, `c1-d1`, ... per device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from emsfl import pki
from emsfl.runtime.tls import TlsFiles
from testbed.broker import MosquittoTls

LOOPBACK = ["127.0.0.1", "localhost"]


@dataclass(frozen=True)
class LabPki:
    directory: Path

    def files(self, name: str) -> TlsFiles:
        d = self.directory
        return TlsFiles(ca=d / pki.CA_CERT, cert=d / f"{name}.crt", key=d / f"{name}.key")

    def args(self, name: str) -> list[str]:
        """The `--tls-*` flags of the role with certificate `name`."""
        return self.files(name).flags()

    def broker(self) -> MosquittoTls:
        f = self.files("broker")
        return MosquittoTls(ca=f.ca, cert=f.cert, key=f.key)


def gateway_name(cluster: str) -> str:
    return f"gw-{cluster}"


def device_name(cluster: str, device: str) -> str:
    return f"{cluster}-{device}"


def issue_lab_pki(directory: Path, devices: dict[str, int]) -> LabPki:
    """The CA and every certificate a lab of these clusters (cluster id -> number of devices) needs."""
    pki.init_ca(directory, name="emsfl-lab-ca", days=2)
    for server in ("satellite", "broker"):
        pki.issue(directory, server, "server", sans=LOOPBACK, days=2)
    for service in ("orbit", "monitor"):
        pki.issue(directory, service, "client", days=2)
    for cluster, count in devices.items():
        if count == 1:
            pki.issue(directory, cluster, "client", cluster=cluster, days=2)
            continue
        pki.issue(directory, gateway_name(cluster), "gateway", cluster=cluster, sans=LOOPBACK, days=2)
        for i in range(count):
            pki.issue(directory, device_name(cluster, f"d{i}"), "device", cluster=cluster, device=f"d{i}", days=2)
    return LabPki(directory)
