"""`emsfl pki issue-inventory`: every certificate an Ansible inventory (deploy/inventory/*.yml) needs, in one command.

Names are the ones deploy/site.yml copies to each host (`emsfl_cert_name`):
- `broker` and `satellite`: server certificates whose SANs are the host's `ansible_host` and inventory name (the
  satellite's certificate is also its MQTT client certificate);
- `orbit`: a service client certificate;
- each ground host: a cluster client certificate named after the host (or its `emsfl_cert_name`), for its
  `emsfl_cluster`.
Leaves that exist already are kept (rotate them with `emsfl pki rotate`); the CA is created when missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from emsfl import pki


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
        raise pki.PkiError(f"--inventory: cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise pki.PkiError(f"--inventory: {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("all"), dict):
        raise pki.PkiError(f"--inventory: {path} is not a YAML inventory with an `all` group")
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
    for host in sorted(groups.get("ground", ())):
        host_vars = hosts[host]
        cluster = host_vars.get("emsfl_cluster")
        if not cluster:
            raise pki.PkiError(f"--inventory: ground host {host} has no emsfl_cluster")
        name = str(host_vars.get("emsfl_cert_name") or host)
        leaves.append({"name": name, "role": "client", "cluster": str(cluster)})
    if not leaves:
        raise pki.PkiError(f"--inventory: {path} names no broker, satellite, orbit or ground host")
    return leaves


def issue_inventory(directory: Path, inventory: Path, days: int = pki.DEFAULT_LEAF_DAYS) -> list[str]:
    """Issue what `inventory` needs into `directory` (CA first when missing); returns one line per leaf."""
    leaves = plan(inventory)
    if not (directory / pki.CA_CERT).exists():
        pki.init_ca(directory)
    lines = []
    for leaf in leaves:
        if (directory / f"{leaf['name']}.crt").exists():
            lines.append(f"{leaf['name']}: kept (exists)")
            continue
        pki.issue(directory, leaf["name"], leaf["role"], leaf.get("cluster"), leaf.get("sans", ()), days)
        lines.append(
            f"{leaf['name']}: issued {leaf['role']}" + (f" cluster={leaf['cluster']}" if "cluster" in leaf else "")
        )
    return lines
