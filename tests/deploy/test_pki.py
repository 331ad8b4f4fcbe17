"""`emsfl pki`: chain, subject scheme, key modes, rotation and bad input."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from emsfl import pki
from emsfl.cli import main as emsfl_main


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    assert emsfl_main(["pki", "init-ca", "--dir", str(directory)]) == 0
    return directory


def test_init_ca_writes_a_self_signed_ca_with_a_private_key(ca_dir: Path) -> None:
    ca = _cert(ca_dir / "ca.crt")
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700


def test_client_certificate_carries_the_cluster_and_chains_to_the_ca(ca_dir: Path) -> None:
    code = emsfl_main(
        ["pki", "issue", "--dir", str(ca_dir), "--name", "c0-board1", "--role", "client", "--cluster", "c0"]
    )
    assert code == 0
    cert = _cert(ca_dir / "c0-board1.crt")
    cert.verify_directly_issued_by(_cert(ca_dir / "ca.crt"))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "c0"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "cluster"
    assert pki.cluster_id(cert) == "c0"
    assert pki.cluster_id_from_pem((ca_dir / "c0-board1.crt").read_bytes()) == "c0"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "urn:emsfl:cluster:c0" in uris.get_values_for_type(x509.UniformResourceIdentifier)
    assert stat.S_IMODE((ca_dir / "c0-board1.key").stat().st_mode) == 0o600
    key = serialization.load_pem_private_key((ca_dir / "c0-board1.key").read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    pki.verify(ca_dir, "c0-board1")


def test_server_certificate_has_the_sans_and_no_cluster(ca_dir: Path) -> None:
    pki.issue(ca_dir, "broker", "server", sans=["broker.lab", "127.0.0.1"])
    cert = _cert(ca_dir / "broker.crt")
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["broker.lab"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert pki.cluster_id(cert) is None
    pki.issue(ca_dir, "orbit", "client")
    assert pki.cluster_id(_cert(ca_dir / "orbit.crt")) is None


def test_rotate_reissues_with_a_new_key_and_the_same_identity(ca_dir: Path) -> None:
    pki.issue(ca_dir, "satellite", "server", sans=["sat.lab", "10.0.0.2"])
    pki.issue(ca_dir, "c1-board", "client", cluster="c1")
    before = {n: _cert(ca_dir / f"{n}.crt") for n in ("satellite", "c1-board")}
    ca_before = (ca_dir / "ca.crt").read_bytes()
    assert emsfl_main(["pki", "rotate", "--dir", str(ca_dir), "--all"]) == 0
    assert (ca_dir / "ca.crt").read_bytes() == ca_before
    for name, old in before.items():
        new = _cert(ca_dir / f"{name}.crt")
        assert new.serial_number != old.serial_number
        assert new.public_key() != old.public_key()
        assert new.subject == old.subject
        assert new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == (
            old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        )
        pki.verify(ca_dir, name)
        assert stat.S_IMODE((ca_dir / f"{name}.key").stat().st_mode) == 0o600
    assert len(list((ca_dir / "old").glob("*.crt"))) == 2


def test_a_leaf_of_another_ca_does_not_verify(ca_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.init_ca(other)
    pki.issue(other, "c0", "client", cluster="c0")
    (ca_dir / "c0.crt").write_bytes((other / "c0.crt").read_bytes())
    with pytest.raises(pki.PkiError, match="not issued by the CA"):
        pki.verify(ca_dir, "c0")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["issue", "--name", "x", "--role", "client"], "no CA in"),
        (["issue", "--name", "../evil", "--role", "client"], "not a valid name"),
        (
            ["issue", "--name", "ok", "--role", "server", "--cluster", "c0"],
            "a server certificate carries no cluster id",
        ),
        (["issue", "--name", "ok", "--role", "client", "--cluster", "c 0"], "--cluster"),
        (["issue", "--name", "ok", "--role", "server", "--san", "bad host!"], "neither an IP"),
        (["issue", "--name", "ok", "--role", "client", "--san", "h.lab"], "only server and gateway certificates"),
        (["issue", "--name", "ok", "--role", "client", "--days", "0"], "--days"),
        (["rotate", "--name", "missing"], "no certificate missing.crt"),
    ],
)
def test_bad_input_is_refused_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    directory = tmp_path / "pki"
    if message != "no CA in":
        pki.init_ca(directory)
    code = emsfl_main(["pki", argv[0], "--dir", str(directory), *argv[1:]])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1
    assert not (directory / "ok.crt").exists()


def test_existing_ca_and_leaf_are_not_overwritten(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert emsfl_main(["pki", "init-ca", "--dir", str(ca_dir)]) == 2
    assert "already exists" in capsys.readouterr().err
    pki.issue(ca_dir, "orbit", "client")
    with pytest.raises(pki.PkiError, match="rotate"):
        pki.issue(ca_dir, "orbit", "client")


def test_unknown_role_is_an_argparse_error(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert emsfl_main(["pki", "issue", "--dir", str(ca_dir), "--name", "x", "--role", "admin"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "emsfl pki issue: argument --role: invalid choice: 'admin'"
        " (choose from 'server', 'client', 'gateway', 'device')"
    ]


def test_show_lists_every_leaf(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki.issue(ca_dir, "c2-jetson", "client", cluster="c2")
    pki.issue(ca_dir, "broker", "server", sans=["127.0.0.1"])
    assert emsfl_main(["pki", "show", "--dir", str(ca_dir)]) == 0
    out = capsys.readouterr().out
    assert "c2-jetson: client cn=c2 cluster=c2" in out
    assert "broker: server cn=broker sans=127.0.0.1" in out


def test_gateway_and_device_certificates(ca_dir: Path) -> None:
    from cryptography import x509

    pki.issue(ca_dir, "gw-c1", "gateway", cluster="c1", sans=["127.0.0.1"])
    pki.issue(ca_dir, "c1-d0", "device", cluster="c1", device="d0")
    gateway = x509.load_pem_x509_certificate((ca_dir / "gw-c1.crt").read_bytes())
    assert pki.cluster_id(gateway) == "c1"  # the satellite sees the cluster, as of a cluster's client certificate
    assert pki.device_id(gateway) is None
    device = x509.load_pem_x509_certificate((ca_dir / "c1-d0.crt").read_bytes())
    assert pki.device_id(device) == ("c1", "d0") and pki.cluster_id(device) is None  # a device is no cluster
    leaves = {n: pki.read_leaf(ca_dir, n) for n in ("gw-c1", "c1-d0")}
    assert (leaves["gw-c1"].role, leaves["gw-c1"].sans) == ("gateway", ("127.0.0.1",))
    assert (leaves["c1-d0"].role, leaves["c1-d0"].cluster, leaves["c1-d0"].device) == ("device", "c1", "d0")
    pki.rotate(ca_dir, ["gw-c1", "c1-d0"])
    assert pki.read_leaf(ca_dir, "c1-d0").device == "d0" and pki.read_leaf(ca_dir, "gw-c1").role == "gateway"
    with pytest.raises(pki.PkiError, match="--device"):
        pki.issue(ca_dir, "c1-d1", "device", cluster="c1")
    with pytest.raises(pki.PkiError, match="--cluster"):
        pki.issue(ca_dir, "gw-x", "gateway")


def test_issue_inventory_issues_what_site_yml_copies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deploy_helpers import DEPLOY

    directory = tmp_path / "pki"
    inventory = DEPLOY / "inventory" / "lab-3boards.yml"
    assert emsfl_main(["pki", "issue-inventory", "--dir", str(directory), "--inventory", str(inventory)]) == 0
    leaves = {n: pki.read_leaf(directory, n) for n in pki.leaf_names(directory)}
    assert set(leaves) == {"broker", "satellite", "orbit", "jetson-a", "jetson-b", "jetson-c"}
    assert leaves["satellite"].role == "server" and "192.168.50.10" in leaves["satellite"].sans
    assert [leaves[h].cluster for h in ("jetson-a", "jetson-b", "jetson-c")] == ["c0", "c1", "c2"]
    for name in leaves:
        pki.verify(directory, name)
    before = (directory / "jetson-a.crt").read_bytes()
    capsys.readouterr()
    assert emsfl_main(["pki", "issue-inventory", "--dir", str(directory), "--inventory", str(inventory)]) == 0
    assert "jetson-a: kept (exists)" in capsys.readouterr().out
    assert (directory / "jetson-a.crt").read_bytes() == before
    bad = tmp_path / "bad.yml"
    bad.write_text("all:\n  children:\n    ground:\n      hosts:\n        g1: {}\n", encoding="utf-8")
    assert emsfl_main(["pki", "issue-inventory", "--dir", str(tmp_path / "p2"), "--inventory", str(bad)]) == 2
    assert "g1 has no emsfl_cluster" in capsys.readouterr().err
    assert not (tmp_path / "p2").exists()  # bad input: nothing written


def test_issue_inventory_with_a_cluster_of_several_boards(tmp_path: Path) -> None:
    inventory = tmp_path / "inv.yml"
    ground = {
        "gw": {"ansible_host": "10.0.0.12", "emsfl_cluster": "c1", "emsfl_device_role": "gateway"},
        "b0": {"ansible_host": "10.0.0.13", "emsfl_cluster": "c1", "emsfl_device_role": "device", "emsfl_device": "d0"},
        "solo": {"ansible_host": "10.0.0.11", "emsfl_cluster": "c0", "emsfl_device_role": "gateway"},
    }
    inventory.write_text(yaml.safe_dump({"all": {"children": {"ground": {"hosts": ground}}}}), encoding="utf-8")
    directory = tmp_path / "pki"
    pki.issue_inventory(directory, inventory)
    gw, b0, solo = (pki.read_leaf(directory, n) for n in ("gw", "b0", "solo"))
    assert (gw.role, gw.cluster, gw.sans) == ("gateway", "c1", ("gw", "10.0.0.12"))  # serves its devices
    assert (b0.role, b0.cluster, b0.device) == ("device", "c1", "d0")
    assert (solo.role, solo.cluster) == ("client", "c0")  # a single-board cluster only dials the satellite
