"""Provisioning over real SSH: a throwaway user on a loopback OpenSSH server gets the satellite node.

`ansible-playbook site.yml` installs the project into the user's virtualenv (from a wheel of this checkout; the
dependencies come from this checkout's .venv through `emsfl_venv_extra_site_dirs`, so nothing is downloaded), writes
the topology, the certificates and the unit; the agent then starts through the very command the unit runs and answers
gRPC; a second run changes nothing. Needs root (a user and sshd); skips otherwise, fails under CI=true.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from deploy_helpers import DEPLOY, REPO, require, tool

from emsfl import pki
from testbed.broker import BrokerProcess, free_port, wait_for_port

pytestmark = pytest.mark.slow

SSHD = "/usr/sbin/sshd"


@dataclass
class Target:
    user: str
    home: Path
    port: int
    key: Path
    workdir: Path


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120, **kwargs)  # type: ignore[call-overload, no-any-return]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    require(os.geteuid() == 0, "needs root: creates a throwaway user and runs sshd")
    require(Path(SSHD).exists(), "OpenSSH server is not installed (apt-get install openssh-server)")
    require(shutil.which("ssh") is not None, "OpenSSH client is not installed (apt-get install openssh-client)")
    workdir = tmp_path_factory.mktemp("provision")
    os.chmod(workdir, 0o755)
    user = f"emsflt{os.getpid() % 100000}"
    _run(["useradd", "--create-home", "--shell", "/bin/bash", user])
    _run(["usermod", "--password", "*", user])  # not locked (sshd without PAM refuses locked accounts), no password
    home = Path(f"/home/{user}")
    sshd: subprocess.Popen[bytes] | None = None
    try:
        key = workdir / "id_ed25519"
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
        host_key = workdir / "host_ed25519"
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)])
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text((workdir / "id_ed25519.pub").read_text(), encoding="utf-8")
        os.chmod(ssh_dir / "authorized_keys", 0o600)
        shutil.chown(ssh_dir, user, user)
        shutil.chown(ssh_dir / "authorized_keys", user, user)
        port = free_port()
        config = workdir / "sshd_config"
        config.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {workdir}/sshd.pid\n"
            f"AllowUsers {user}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "PubkeyAuthentication yes\nAuthorizedKeysFile .ssh/authorized_keys\nStrictModes yes\n"
            "Subsystem sftp /usr/lib/openssh/sftp-server\n",
            encoding="utf-8",
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        log = open(workdir / "sshd.log", "wb")  # noqa: SIM115 - owned by the child
        sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
        wait_for_port("127.0.0.1", port, timeout_s=15)
        yield Target(user, home, port, key, workdir)
    finally:
        if sshd is not None:
            sshd.terminate()
            sshd.wait(10)
        subprocess.run(["pkill", "-u", user], check=False, timeout=30)
        time.sleep(0.2)
        subprocess.run(["userdel", "--remove", user], check=False, capture_output=True, timeout=60)


def _fake_base(directory: Path) -> None:
    """A tiny base directory in the format of docs/INTERFACES.md (no torch needed)."""
    from safetensors.numpy import save_file

    layers, experts, hidden, inter, rank = 2, 8, 64, 96, 8
    rng = np.random.default_rng(0)
    tensors = {"shared/model.embed_tokens.weight": rng.standard_normal((32, hidden)).astype(np.float32)}
    for layer in range(layers):
        for expert in range(experts):
            tensors[f"expert/{layer}/{expert}/gate_up_proj"] = rng.standard_normal((2 * inter, hidden)).astype(
                np.float32
            )
            tensors[f"expert/{layer}/{expert}/down_proj"] = rng.standard_normal((hidden, inter)).astype(np.float32)
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "base.safetensors"))
    parts = [
        {"name": "gate_up_proj.lora_A", "dtype": "F32", "shape": [rank, hidden]},
        {"name": "gate_up_proj.lora_B", "dtype": "F32", "shape": [2 * inter, rank]},
        {"name": "down_proj.lora_A", "dtype": "F32", "shape": [rank, inter]},
        {"name": "down_proj.lora_B", "dtype": "F32", "shape": [hidden, rank]},
    ]
    manifest = {
        "family": "olmoe",
        "num_layers": layers,
        "num_experts": experts,
        "top_k": 2,
        "tune": "lora",
        "lora_rank": rank,
        "lora_alpha": 16,
        "base_hash": hashlib.sha256((directory / "base.safetensors").read_bytes()).hexdigest(),
        "expert_parts": parts,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


def _wheel(out: Path) -> Path:
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
        env={**os.environ, "SOURCE_DATE_EPOCH": "1767225600", "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    (wheel,) = out.glob("emsfl-*.whl")
    return wheel


def _recap(output: str) -> dict[str, dict[str, int]]:
    recap = {}
    for host, fields in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, flags=re.M):
        recap[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", fields)}
    return recap


def _playbook(inventory: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(DEPLOY / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(workdir / "ansible-local"),
    }
    return subprocess.run(
        [tool("ansible-playbook"), "-i", str(inventory), "site.yml"],
        cwd=DEPLOY,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_site_provisions_the_satellite_node_over_ssh(target: Target, broker: BrokerProcess) -> None:
    tool("ansible-playbook")
    work = target.workdir
    pki_dir = work / "pki"
    pki.init_ca(pki_dir)
    pki.issue(pki_dir, "satellite", "server", sans=["127.0.0.1", "localhost"])
    base = work / "base"
    _fake_base(base)
    wheel = _wheel(work / "dist")
    satellite_port = free_port()
    emsfl_home = target.home / "emsfl"
    site_packages = sysconfig.get_paths()["purelib"]
    host_vars = {
        "ansible_host": "127.0.0.1",
        "ansible_port": target.port,
        "ansible_user": target.user,
        "ansible_ssh_private_key_file": str(target.key),
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
        "ansible_python_interpreter": "/usr/bin/python3",
    }
    group_vars = {
        "emsfl_user": target.user,
        "emsfl_manage_user": False,
        "emsfl_become": False,
        "emsfl_systemd": False,
        "emsfl_home": str(emsfl_home),
        "emsfl_python": f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}",
        "emsfl_venv_extra_site_dirs": [site_packages],
        "emsfl_wheel": str(wheel),
        "emsfl_topology": str(REPO / "testbed/topologies/local.yaml"),
        "emsfl_pki_dir": str(pki_dir),
        "emsfl_secrets_dir": str(work / "secrets"),
        "emsfl_base_src": str(base),
        "emsfl_tls": True,
        "emsfl_broker_host": broker.host,
        "emsfl_broker_port": broker.port,
        "emsfl_satellite_host": "127.0.0.1",
        "emsfl_satellite_port": satellite_port,
        "emsfl_satellite_listen": f"127.0.0.1:{satellite_port}",
    }
    require(Path(group_vars["emsfl_python"]).exists(), f"{group_vars['emsfl_python']} (matching this venv) is missing")
    inventory = work / "inventory.yml"
    inventory.write_text(
        yaml.safe_dump({"all": {"vars": group_vars, "children": {"satellite": {"hosts": {"sat1": host_vars}}}}}),
        encoding="utf-8",
    )

    first = _playbook(inventory, work)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
    assert _recap(first.stdout)["sat1"]["failed"] == 0

    # The project, its config and certificates are in place.
    venv = emsfl_home / "venv"
    version = subprocess.run(
        ["runuser", "-u", target.user, "--", str(venv / "bin/emsfl"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert version.returncode == 0 and version.stdout.startswith("emsfl "), version.stderr
    topology = yaml.safe_load((emsfl_home / "etc/topology.yaml").read_text(encoding="utf-8"))
    assert topology["broker"]["port"] == broker.port
    assert topology["satellite"]["port"] == satellite_port
    assert topology["clusters"] == yaml.safe_load((REPO / "testbed/topologies/local.yaml").read_text())["clusters"]
    tls = emsfl_home / "etc/tls"
    assert (tls / "ca.crt").read_bytes() == (pki_dir / "ca.crt").read_bytes()
    assert stat.S_IMODE((tls / "satellite.key").stat().st_mode) == 0o600
    env_file = emsfl_home / "etc/satellite.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert "EMSFL_MQTT_USERNAME=satellite" in env_file.read_text(encoding="utf-8")
    unit = (emsfl_home / "units/emsfl-satellite.service").read_text(encoding="utf-8")
    command = emsfl_home / "bin/emsfl-satellite"
    assert f"ExecStart={command}" in unit
    assert "Restart=on-failure" in unit and "MemoryMax=" in unit and "StandardOutput=journal" in unit
    assert (emsfl_home / "base/manifest.json").exists()
    for path in emsfl_home.rglob("*"):
        if not path.is_symlink():
            assert path.owner() == target.user, path

    second = _playbook(inventory, work)
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-3000:]
    recap = _recap(second.stdout)
    assert recap["sat1"]["changed"] == 0, second.stdout[-6000:]
    assert recap["localhost"]["changed"] == 0, second.stdout[-6000:]

    # The agent starts through the unit's command and answers gRPC.
    if not (REPO / "satellite_node/cli.py").exists():
        pytest.skip("satellite_node/cli.py is not written yet: provisioning checked, agent start not")
    log = open(work / "satellite.log", "wb")  # noqa: SIM115 - owned by the child
    agent = subprocess.Popen(["runuser", "-u", target.user, "--", str(command)], stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port("127.0.0.1", satellite_port, timeout_s=60)
        except TimeoutError:
            pytest.fail(f"the satellite did not listen: {(work / 'satellite.log').read_text(errors='replace')[-3000:]}")
        import grpc

        from protos.emsfl.v1 import federation_pb2, federation_pb2_grpc
        from protos.wire import CLUSTER_METADATA_KEY

        with grpc.insecure_channel(f"127.0.0.1:{satellite_port}") as channel:
            stub = federation_pb2_grpc.FederationStub(channel)
            try:
                reply = stub.GetStatus(
                    federation_pb2.StatusRequest(), metadata=((CLUSTER_METADATA_KEY, "c0"),), timeout=20
                )
                assert reply is not None
            except grpc.RpcError as exc:  # an answer of the server (e.g. the link of c0 is down), not a dead socket
                assert isinstance(exc, grpc.Call)
                assert exc.code() != grpc.StatusCode.UNAVAILABLE or "link" in (exc.details() or ""), exc
    finally:
        agent.terminate()
        try:
            agent.wait(20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        log.close()
