"""Every playbook parses against every inventory, and ansible-lint (production profile) passes on deploy/."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from deploy_helpers import DEPLOY, tool

PLAYBOOKS = sorted(p.name for p in DEPLOY.glob("*.yml"))
INVENTORIES = sorted(p.name for p in (DEPLOY / "inventory").glob("*.yml"))


def _env() -> dict[str, str]:
    return {**os.environ, "ANSIBLE_CONFIG": str(DEPLOY / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}


def test_the_playbooks_and_inventories_exist() -> None:
    assert {"site.yml", "update.yml", "restart.yml", "collect.yml", "wipe.yml"} <= set(PLAYBOOKS)
    assert {"lab-3boards.yml", "field.yml"} <= set(INVENTORIES)


@pytest.mark.parametrize("inventory", INVENTORIES)
@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_syntax_check(playbook: str, inventory: str) -> None:
    result = subprocess.run(
        [tool("ansible-playbook"), "-i", f"inventory/{inventory}", "--syntax-check", playbook],
        cwd=DEPLOY,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_ansible_lint_passes() -> None:
    result = subprocess.run(
        [tool("ansible-lint"), "--offline", "--nocolor"],
        cwd=DEPLOY,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_inventory_groups_and_host_vars() -> None:
    result = subprocess.run(
        [tool("ansible-inventory"), "-i", "inventory/lab-3boards.yml", "--list"],
        cwd=DEPLOY,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    for group in ("broker", "orbit", "satellite", "ground"):
        assert data[group]["hosts"], group
    ground = data["ground"]["hosts"]
    clusters = {data["_meta"]["hostvars"][h]["emsfl_cluster"] for h in ground}
    assert clusters == {"c0", "c1", "c2"}
    for host in ground:
        assert {"emsfl_device_role", "emsfl_site"} <= set(data["_meta"]["hostvars"][host])
