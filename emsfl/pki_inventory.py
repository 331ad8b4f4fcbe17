"""What `emsfl pki issue-inventory` issues: every certificate an Ansible inventory (deploy/inventory/*.yml) needs.

Names are the ones deploy/site.yml copies to each host (`emsfl_cert_name`):
- `broker` and `satellite`: server certificates whose SANs are the host's `ansible_host` and inventory name (the
  satellite's certificate is also its MQTT client certificate);
- `orbit`: a service client certificate;
- each ground host (named after the host, or its `emsfl_cert_name`): a cluster client certificate for its
  `emsfl_cluster`; in a cluster of several boards, the gateway's (`emsfl_device_role: gateway`) is a gateway
  certificate that also serves its devices (SANs: its address and name), and each device host
  (`emsfl_device_role: device`, `emsfl_device: d0`) gets a device certificate.
`emsfl.pki.issue_inventory` issues them; leaves that exist already are kept (rotate them with `emsfl pki rotate`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


class InventoryError(ValueError):
    """An inventory that cannot be read or names a ground host without its cluster."""


def _walk(group: Mapping[str, Any], name: str, hosts: dict[str, dict[str, Any]], groups: dict[str, set[str]]) -> None:
    """Collect host vars (merged across groups) and group membership below `group`."""
    members = groups.setdefault(name, set())
    for host, host_vars in (group.get("hosts") or {}).items():
        hosts.setdefault(str(host), {}).update(host_vars or {})
        members.add(str(host))
    for child, body in (group.get("children") or {}).items():
        _walk(body or {}, str(child), hosts, groups)
        members |= groups[str(child)]


def read_inventory(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, set[str]]]:
    """(host -> vars, group -> hosts) of a YAML inventory."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InventoryError(f"--inventory: cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise InventoryError(f"--inventory: {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("all"), dict):
        raise InventoryError(f"--inventory: {path} is not a YAML inventory with an `all` group")
    hosts: dict[str, dict[str, Any]] = {}
    groups: dict[str, set[str]] = {}
    _walk(data["all"], "all", hosts, groups)
    return hosts, groups


def plan(path: Path) -> list[dict[str, Any]]:
    """The leaves the inventory needs: name, role, cluster, SANs; PkiError naming a ground host without a cluster."""
    hosts, groups = read_inventory(path)
    leaves: list[dict[str, Any]] = []

    def sans(group: str) -> list[str]:
        out: list[str] = []
        for host in sorted(groups.get(group, ())):
            for value in (hosts[host].get("ansible_host"), host):
                if value and "{{" not in str(value) and str(value) not in out:
                    out.append(str(value))
        return out

    if groups.get("broker"):
        leaves.append({"name": "broker", "role": "server", "sans": sans("broker")})
    if groups.get("satellite"):
        leaves.append({"name": "satellite", "role": "server", "sans": sans("satellite")})
    if groups.get("orbit"):
        leaves.append({"name": "orbit", "role": "client"})
    ground = sorted(groups.get("ground", ()))
    with_devices = {str(hosts[h].get("emsfl_cluster")) for h in ground if hosts[h].get("emsfl_device_role") == "device"}
    for host in ground:
        host_vars = hosts[host]
        cluster = host_vars.get("emsfl_cluster")
        if not cluster:
            raise InventoryError(f"--inventory: ground host {host} has no emsfl_cluster")
        leaf: dict[str, Any] = {"name": str(host_vars.get("emsfl_cert_name") or host), "cluster": str(cluster)}
        kind = host_vars.get("emsfl_device_role", "gateway")
        if kind == "device":
            if not host_vars.get("emsfl_device"):
                raise InventoryError(f"--inventory: device host {host} has no emsfl_device")
            leaf.update(role="device", device=str(host_vars["emsfl_device"]))
        elif str(cluster) in with_devices:
            address = host_vars.get("ansible_host")
            leaf.update(role="gateway", sans=[str(v) for v in (address, host) if v and "{{" not in str(v)])
        else:
            leaf["role"] = "client"
        leaves.append(leaf)
    if not leaves:
        raise InventoryError(f"--inventory: {path} names no broker, satellite, orbit or ground host")
    return leaves
