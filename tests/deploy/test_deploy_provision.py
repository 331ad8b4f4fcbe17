"""Provisioning over real SSH: a throwaway user on a loopback OpenSSH server gets the satellite node and a ground node.

`ansible-playbook site.yml` (with `emsfl_tls: true`) installs the project into the user's virtualenvs (from a wheel of
this checkout; the dependencies come from this checkout's .venv through `emsfl_venv_extra_site_dirs`, so nothing is
downloaded), writes the topology, the certificates and the units; both agents then start through the very commands
the units run, against a Mosquitto with TLS and the deployed ACL, and the ground agent joins the satellite over mutual
TLS with the certificate the deploy gave it; a plaintext client is refused; a second run changes nothing. Needs root
(a user and sshd) and mosquitto; skips otherwise, fails under CI=true.
"""

from __future__ import annotations

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
from typing import Any

import pytest
import yaml
from deploy_helpers import DEPLOY, REPO, require, tool

from emsfl import pki
from emsfl.runtime.events import read_events
from emsfl.runtime.tls import TlsFiles
from satellite_node.testing import Client, OrbitStub, wait_until
from testbed.broker import BrokerProcess, MosquittoTls, free_port, wait_for_port
from tests.helpers import stop_processes

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


def _tiny_topology(path: Path) -> None:
    """The local lab's topology, trimmed so that the base warms up and the ground agent profiles in seconds."""
    topology = yaml.safe_load((REPO / "testbed/topologies/local.yaml").read_text(encoding="utf-8"))
    topology["data"]["train_per_cluster"] = 200
    topology["data"]["test_per_domain"] = 10
    topology["warmup"]["steps"] = 5
    topology.setdefault("training", {})["profile_examples"] = 16
    path.write_text(yaml.safe_dump(topology, sort_keys=False), encoding="utf-8")


def _closed_to_others(path: Path) -> Path | None:
    """The first directory on the way to `path` that other users may not enter, None if there is none.
    Regression: in a clone made with `mktemp -d` (mode 700) the play found no torch and tried to download it."""
    for directory in [*reversed(path.parents), path]:
        if not directory.stat().st_mode & stat.S_IXOTH:
            return directory
    return None


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


def test_site_provisions_satellite_and_ground_with_mutual_tls(target: Target) -> None:
    tool("ansible-playbook")
    require(shutil.which("mosquitto") is not None, "mosquitto is not installed (apt-get install mosquitto)")
    work = target.workdir
    pki_dir = work / "pki"
    inventory = work / "inventory.yml"
    topology_path = work / "topology.yaml"
    _tiny_topology(topology_path)
    base = work / "base"
    from ground_node.model.base import build_base

    build_base(yaml.safe_load(topology_path.read_text(encoding="utf-8")), base)
    wheel = _wheel(work / "dist")
    satellite_port, broker_port = free_port(), free_port()
    emsfl_home = target.home / "emsfl"
    ground_home = target.home / "emsfl-ground"  # the same login, a second testbed host
    site_packages = sysconfig.get_paths()["purelib"]
    closed = _closed_to_others(Path(site_packages))
    require(
        closed is None,
        f"{closed} is closed to other users (mode {0 if closed is None else closed.stat().st_mode & 0o777:o}): the "
        f"throwaway SSH user must read this venv's {site_packages} (its torch), or the play downloads torch; clone "
        "the repository where other users may enter (`mktemp -d` makes a 700 directory), or `chmod o+x` it",
    )
    host_vars = {
        "ansible_host": "127.0.0.1",
        "ansible_port": target.port,
        "ansible_user": target.user,
        "ansible_ssh_private_key_file": str(target.key),
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
        "ansible_python_interpreter": "/usr/bin/python3",
    }
    group_vars: dict[str, Any] = {
        "emsfl_user": target.user,
        "emsfl_manage_user": False,
        "emsfl_become": False,
        "emsfl_systemd": False,
        "emsfl_home": str(emsfl_home),
        "emsfl_python": f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}",
        "emsfl_venv_extra_site_dirs": [site_packages],
        "emsfl_wheel": str(wheel),
        "emsfl_topology": str(topology_path),
        "emsfl_pki_dir": str(pki_dir),
        "emsfl_secrets_dir": str(work / "secrets"),
        "emsfl_base_src": str(base),
        "emsfl_tls": True,
        "emsfl_broker_host": "127.0.0.1",
        "emsfl_broker_port": broker_port,
        "emsfl_satellite_host": "127.0.0.1",
        "emsfl_satellite_port": satellite_port,
        "emsfl_satellite_listen": f"127.0.0.1:{satellite_port}",
    }
    python = str(group_vars["emsfl_python"])
    require(Path(python).exists(), f"{python} (matching this venv) is missing")
    ground_vars = {**host_vars, "emsfl_home": str(ground_home), "emsfl_cluster": "c0"}
    children = {"satellite": {"hosts": {"sat1": host_vars}}, "ground": {"hosts": {"gnd1": ground_vars}}}
    inventory.write_text(yaml.safe_dump({"all": {"vars": group_vars, "children": children}}), encoding="utf-8")
    # every certificate the inventory needs, in one command; the broker's and the orbit stand-in's too
    from emsfl.pki import main as pki_main

    assert pki_main(["issue-inventory", "--dir", str(pki_dir), "--inventory", str(inventory)]) == 0
    pki.issue(pki_dir, "broker", "server", sans=["127.0.0.1", "localhost"])
    pki.issue(pki_dir, "orbit", "client")

    first = _playbook(inventory, work)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
    assert _recap(first.stdout)["sat1"]["failed"] == 0 and _recap(first.stdout)["gnd1"]["failed"] == 0

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
    assert topology["broker"]["port"] == broker_port
    assert topology["satellite"]["port"] == satellite_port and topology["satellite"]["tls"] is True
    assert topology["clusters"] == yaml.safe_load(topology_path.read_text())["clusters"]
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
    assert recap["gnd1"]["changed"] == 0, second.stdout[-6000:]
    ground_env = (ground_home / "etc/ground.env").read_text(encoding="utf-8")
    assert "EMSFL_TLS_CERT=" in ground_env and (ground_home / "etc/tls/ground.crt").exists()
    assert recap["localhost"]["changed"] == 0, second.stdout[-6000:]

    # Both agents start through the units' commands; the ground agent joins over mutual TLS.
    broker_tls = MosquittoTls(ca=pki_dir / "ca.crt", cert=pki_dir / "broker.crt", key=pki_dir / "broker.key")
    broker = BrokerProcess("mosquitto", port=broker_port, log_path=work / "broker.log", tls=broker_tls).start()
    orbit_tls = TlsFiles(ca=pki_dir / "ca.crt", cert=pki_dir / "orbit.crt", key=pki_dir / "orbit.key")
    orbit = OrbitStub("127.0.0.1", broker_port, tls=orbit_tls).start()
    orbit.set_link("c0", True)
    agents: list[tuple[subprocess.Popen[bytes], Any]] = []
    try:
        for name, home in (("satellite", emsfl_home), ("ground", ground_home)):
            log = open(work / f"{name}.log", "wb")  # noqa: SIM115 - closed below
            argv = ["runuser", "-u", target.user, "--", str(home / f"bin/emsfl-{name}")]
            agents.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log))
            if name == "satellite":
                try:
                    wait_for_port("127.0.0.1", satellite_port, timeout_s=60)
                except TimeoutError:
                    tail = (work / "satellite.log").read_text(errors="replace")[-3000:]
                    pytest.fail(f"the satellite did not listen: {tail}")
        events = emsfl_home / "state/satellite/events.jsonl"

        def joined() -> bool:
            for proc, _ in agents:
                assert proc.poll() is None, (work / "ground.log").read_text(errors="replace")[-3000:]
            return events.exists() and any(
                e.get("event") == "joined" and e.get("cluster") == "c0" for e in read_events(events)
            )

        wait_until("the ground agent's join over mutual TLS", joined, 240)
        assert "mutual TLS" in (work / "satellite.log").read_text(encoding="utf-8", errors="replace")
        plaintext = Client(f"127.0.0.1:{satellite_port}", "c0")
        with pytest.raises(Exception) as refused:
            plaintext.status(timeout_s=10)
        plaintext.close()
        assert "UNAVAILABLE" in str(refused.value)
    finally:
        stop_processes([proc for proc, _ in agents], 20)
        for _, log in agents:
            log.close()
        orbit.stop()
        broker.stop()
