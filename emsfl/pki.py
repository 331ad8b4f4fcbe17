"""`emsfl pki`: the testbed's certificate authority (ARCHITECTURE §7).

One directory holds the CA (`ca.crt`, `ca.key`) and every leaf (`<name>.crt`, `<name>.key`). Keys are ECDSA P-256,
written with mode 0600; certificates are PEM.

Subject scheme (what the satellite node and the broker read):
- client certificate of a cluster (`--role client --cluster c0`): `O=emsfl, OU=cluster, CN=c0`, plus the URI SANs
  `urn:emsfl:cluster:c0` and `urn:emsfl:node:<name>`. The cluster id is the CN whenever OU is `cluster`
  (`cluster_id(cert)`); several devices of one cluster share the CN and differ in their file name and node SAN.
- client certificate of a service (`--role client` without `--cluster`, e.g. the orbit service):
  `OU=service, CN=<name>`.
- server certificate (`--role server`): `OU=server, CN=<name>`, SANs from `--san` (DNS names or IP addresses;
  default: the name itself), extended key usages serverAuth and clientAuth (a server is also a client of the
  broker, so one certificate per host serves both).
- gateway certificate (`--role gateway --cluster c0 --san HOST`): a cluster's client certificate (`OU=cluster,
  CN=c0`, its URI SANs) that also serves its devices: the `--san` host names and serverAuth as well.
- device certificate (`--role device --cluster c0 --device d0`): `OU=device, CN=c0.d0`, URI SANs
  `urn:emsfl:cluster:c0`, `urn:emsfl:device:d0` and the node; its gateway reads the device's identity from it, and
  the satellite, which reads a cluster only from `OU=cluster`, refuses it (a device talks to its gateway only).

`rotate` re-issues leaves with fresh keys and the same subject, SANs and role, signed by the same CA (the old files are
kept under `old/`), so peers that trust `ca.crt` need no change.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from emsfl.errors import OneLineParser, UserError, positive_int

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
ORGANIZATION = "emsfl"
CLUSTER_OU = "cluster"
SERVICE_OU = "service"
SERVER_OU = "server"
DEVICE_OU = "device"
CLUSTER_URI = "urn:emsfl:cluster:"
DEVICE_URI = "urn:emsfl:device:"
NODE_URI = "urn:emsfl:node:"
ROLES = ("server", "client", "gateway", "device")
DEFAULT_CA_DAYS = 3650
DEFAULT_LEAF_DAYS = 825

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_HOST = re.compile(
    r"^(?=.{1,253}$)(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


class PkiError(UserError):
    """A PKI operation that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class Leaf:
    """What one issued certificate says (as read back from its PEM)."""

    name: str
    role: str
    cluster: str | None
    common_name: str
    device: str | None
    sans: tuple[str, ...]
    not_after: dt.datetime


def _check_name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise PkiError(f"{what}: {value!r} is not a valid name (letters, digits, '.', '_', '-'; at most 63 characters)")
    if value in {"ca", "old"}:
        raise PkiError(f"{what}: {value!r} is reserved")
    return value


def _san(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _HOST.match(value):
        raise PkiError(f"--san: {value!r} is neither an IP address nor a DNS name")
    return x509.DNSName(value.lower())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _write(path: Path, data: bytes, private: bool) -> None:
    """Atomically write `data` (mode 0600 for keys, 0644 for certificates)."""
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600 if private else 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _days(days: int) -> int:
    if days < 1 or days > 36500:
        raise PkiError(f"--days: expected 1..36500, got {days}")
    return days


def _key_usage(ca: bool) -> x509.KeyUsage:
    """Every certificate signs (TLS handshakes); a CA also signs certificates and CRLs, a leaf agrees keys."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def init_ca(directory: Path, name: str = "emsfl-ca", days: int = DEFAULT_CA_DAYS, force: bool = False) -> Path:
    """Create `ca.crt` and `ca.key` in `directory`; refuse to overwrite an existing CA unless `force`."""
    if not _NAME.match(name):
        raise PkiError(f"--name: {name!r} is not a valid CA name (letters, digits, '.', '_', '-')")
    days = _days(days)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if (cert_path.exists() or key_path.exists()) and not force:
        raise PkiError(f"a CA already exists in {directory}; pass --force to replace it (every leaf must be re-issued)")
    key = _new_key()
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION), x509.NameAttribute(NameOID.COMMON_NAME, name)]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return cert_path


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise PkiError(
            f"no CA in {directory} (expected {CA_CERT} and {CA_KEY}); run `emsfl pki init-ca --dir {directory}`"
        )
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError as exc:
        raise PkiError(f"cannot read the CA in {directory}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path}: expected an EC private key")
    if cert.public_key() != key.public_key():
        raise PkiError(f"{cert_path} and {key_path} do not belong together")
    return cert, key


def issue(
    directory: Path,
    name: str,
    role: str,
    cluster: str | None = None,
    sans: Sequence[str] = (),
    days: int = DEFAULT_LEAF_DAYS,
    force: bool = False,
    device: str | None = None,
) -> tuple[Path, Path]:
    """Issue `<name>.crt` / `<name>.key` signed by the CA in `directory`; returns (cert path, key path)."""
    _check_name(name, "--name")
    if role not in ROLES:
        raise PkiError(f"--role: expected one of {', '.join(ROLES)}, got {role!r}")
    if cluster is not None:
        _check_name(cluster, "--cluster")
        if role == "server":
            raise PkiError("--cluster: a server certificate carries no cluster id (a gateway's: --role gateway)")
    elif role in ("gateway", "device"):
        raise PkiError(f"--cluster: required for a {role} certificate")
    if device is not None:
        _check_name(device, "--device")
        if role != "device":
            raise PkiError("--device: only device certificates carry a device id (--role device)")
    elif role == "device":
        raise PkiError("--device: required for a device certificate")
    if sans and role not in ("server", "gateway"):
        raise PkiError("--san: only server and gateway certificates carry host names")
    days = _days(days)
    ca_cert, ca_key = _load_ca(directory)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    if (cert_path.exists() or key_path.exists()) and not force:
        raise PkiError(
            f"{cert_path.name} already exists in {directory}; use `emsfl pki rotate --name {name}` to re-issue"
        )
    general_names: list[x509.GeneralName]
    if role == "server":
        ou, cn = SERVER_OU, name
        general_names = [_san(s) for s in (sans or [name])]
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    elif role == "device":
        assert cluster is not None and device is not None
        ou, cn = DEVICE_OU, f"{cluster}.{device}"
        general_names = [
            x509.UniformResourceIdentifier(CLUSTER_URI + cluster),
            x509.UniformResourceIdentifier(DEVICE_URI + device),
            x509.UniformResourceIdentifier(NODE_URI + name),
        ]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    elif cluster is not None:
        ou, cn = CLUSTER_OU, cluster
        general_names = [
            x509.UniformResourceIdentifier(CLUSTER_URI + cluster),
            x509.UniformResourceIdentifier(NODE_URI + name),
        ]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role == "gateway":  # it serves its devices too
            general_names += [_san(s) for s in (sans or [name])]
            usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    else:
        ou, cn = SERVICE_OU, name
        general_names = [x509.UniformResourceIdentifier(NODE_URI + name)]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    key = _new_key()
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(general_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return cert_path, key_path


def cluster_id(cert: x509.Certificate) -> str | None:
    """The cluster id a client certificate carries (CN where OU is `cluster`), else None."""
    ous = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if ous == [CLUSTER_OU] and len(cns) == 1 and isinstance(cns[0], str):
        return cns[0]
    return None


def cluster_id_from_pem(pem: bytes) -> str | None:
    """`cluster_id` of a PEM certificate (e.g. the peer certificate a gRPC auth context hands over)."""
    return cluster_id(x509.load_pem_x509_certificate(pem))


def _uris(cert: x509.Certificate, prefix: str) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [u[len(prefix) :] for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(prefix)]


def device_id(cert: x509.Certificate) -> tuple[str, str] | None:
    """(cluster, device) of a device certificate (OU `device`, one cluster URI and one device URI), else None."""
    ous = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    clusters, devices = _uris(cert, CLUSTER_URI), _uris(cert, DEVICE_URI)
    if ous != [DEVICE_OU] or len(clusters) != 1 or len(devices) != 1:
        return None
    return clusters[0], devices[0]


def device_id_from_pem(pem: bytes) -> tuple[str, str] | None:
    try:
        return device_id(x509.load_pem_x509_certificate(pem))
    except ValueError:
        return None


def read_leaf(directory: Path, name: str) -> Leaf:
    path = directory / f"{name}.crt"
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"no certificate {path.name} in {directory}") from None
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM certificate: {exc}") from exc
    ous = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    usages: list[x509.ObjectIdentifier] = []
    with contextlib.suppress(x509.ExtensionNotFound):
        usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    if ous == [SERVER_OU]:
        role = "server"
    elif ous == [DEVICE_OU]:
        role = "device"
    elif ous == [CLUSTER_OU] and ExtendedKeyUsageOID.SERVER_AUTH in usages:
        role = "gateway"
    else:
        role = "client"
    identity = device_id(cert)
    try:
        san_ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san_ext = x509.SubjectAlternativeName([])
    sans = tuple(
        [str(v) for v in san_ext.get_values_for_type(x509.DNSName)]
        + [str(v) for v in san_ext.get_values_for_type(x509.IPAddress)]
    )
    return Leaf(
        name=name,
        role=role,
        cluster=identity[0] if identity else cluster_id(cert),
        common_name=str(cns[0]) if cns else "",
        device=identity[1] if identity else None,
        sans=sans,
        not_after=cert.not_valid_after_utc,
    )


def leaf_names(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.crt") if p.name != CA_CERT)


def rotate(directory: Path, names: Sequence[str], days: int = DEFAULT_LEAF_DAYS) -> list[Path]:
    """Re-issue each leaf with a fresh key, same subject/SANs/role, same CA; old files move to `old/`."""
    _load_ca(directory)
    if not names:
        raise PkiError(f"nothing to rotate: name leaves with --name or pass --all (found {leaf_names(directory)})")
    leaves = [read_leaf(directory, _check_name(n, "--name")) for n in names]
    old = directory / "old"
    old.mkdir(mode=0o700, exist_ok=True)
    stamp = _now().strftime("%Y%m%dT%H%M%SZ")
    issued = []
    for leaf in leaves:
        for suffix in (".crt", ".key"):
            src = directory / f"{leaf.name}{suffix}"
            if src.exists():
                os.replace(src, old / f"{leaf.name}-{stamp}{suffix}")
        cert_path, _ = issue(
            directory,
            leaf.name,
            leaf.role,
            cluster=leaf.cluster,
            sans=leaf.sans if leaf.role in ("server", "gateway") else (),
            days=days,
            device=leaf.device,
        )
        issued.append(cert_path)
    return issued


def verify(directory: Path, name: str) -> x509.Certificate:
    """Check that `<name>.crt` is signed by the CA in `directory` and valid now; returns it."""
    ca_cert, _ = _load_ca(directory)
    path = directory / f"{name}.crt"
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read {path}: {exc}") from exc
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PkiError(f"{path.name} is not issued by the CA in {directory}: {exc}") from exc
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PkiError(
            f"{path.name} is not valid now (valid {cert.not_valid_before_utc} to {cert.not_valid_after_utc})"
        )
    return cert


def issue_inventory(directory: Path, inventory: Path, days: int = DEFAULT_LEAF_DAYS) -> list[str]:
    """Issue what `inventory` needs (emsfl/pki_inventory.py) into `directory`, the CA first when missing; leaves
    that exist are kept. One line per leaf."""
    from emsfl.pki_inventory import InventoryError, plan

    try:
        leaves = plan(inventory)
    except InventoryError as exc:
        raise PkiError(str(exc)) from exc
    if not (directory / CA_CERT).exists():
        init_ca(directory)
    lines = []
    for leaf in leaves:
        if (directory / f"{leaf['name']}.crt").exists():
            lines.append(f"{leaf['name']}: kept (exists)")
            continue
        issue(
            directory,
            leaf["name"],
            leaf["role"],
            leaf.get("cluster"),
            leaf.get("sans", ()),
            days,
            False,
            leaf.get("device"),
        )
        cluster = f" cluster={leaf['cluster']}" if "cluster" in leaf else ""
        cluster += f" device={leaf['device']}" if "device" in leaf else ""
        lines.append(f"{leaf['name']}: issued {leaf['role']}{cluster}")
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="emsfl pki", description="certificates for MQTT and gRPC TLS (ARCHITECTURE §7)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init-ca", help="create the CA (ca.crt, ca.key) in DIR")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--name", default="emsfl-ca", help="CA common name")
    p.add_argument("--days", type=positive_int, default=DEFAULT_CA_DAYS)
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    p = sub.add_parser("issue", help="issue a server or client certificate signed by the CA in DIR")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--name", required=True, help="file name of the leaf (NAME.crt, NAME.key)")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--cluster", help="cluster id of a client, gateway or device certificate (OU=cluster, CN=ID)")
    p.add_argument("--device", help="device id of a device certificate (--role device, with --cluster)")
    p.add_argument(
        "--san", action="append", default=[], metavar="HOST", help="server or gateway DNS name or IP (repeatable)"
    )
    p.add_argument("--days", type=positive_int, default=DEFAULT_LEAF_DAYS)
    p.add_argument("--force", action="store_true", help="overwrite an existing leaf of that name")
    p = sub.add_parser("rotate", help="re-issue leaves with fresh keys, keeping the CA, subjects and SANs")
    p.add_argument("--dir", required=True, type=Path)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--name", action="append", default=[], help="leaf to rotate (repeatable)")
    group.add_argument("--all", action="store_true", help="every leaf in DIR")
    p.add_argument("--days", type=positive_int, default=DEFAULT_LEAF_DAYS)
    p = sub.add_parser("show", help="list the leaves in DIR: role, cluster, SANs, expiry, chain check")
    p.add_argument("--dir", required=True, type=Path)
    p = sub.add_parser("issue-inventory", help="every certificate an Ansible inventory needs (CA too), in one go")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--inventory", required=True, type=Path, help="a YAML inventory (deploy/inventory/*.yml)")
    p.add_argument("--days", type=positive_int, default=DEFAULT_LEAF_DAYS)
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "init-ca":
            print(init_ca(args.dir, args.name, args.days, args.force))
        elif args.command == "issue":
            cert_path, key_path = issue(
                args.dir, args.name, args.role, args.cluster, args.san, args.days, args.force, args.device
            )
            print(cert_path)
            print(key_path)
        elif args.command == "issue-inventory":
            for line in issue_inventory(args.dir, args.inventory, args.days):
                print(line)
        elif args.command == "rotate":
            for path in rotate(args.dir, leaf_names(args.dir) if args.all else args.name, args.days):
                print(path)
        else:
            if not (args.dir / CA_CERT).is_file():  # a wrong --dir must not look like an empty one
                raise PkiError(f"--dir: {args.dir}: no {CA_CERT} there (create one with `emsfl pki init-ca`)")
            for name in leaf_names(args.dir):
                leaf = read_leaf(args.dir, name)
                verify(args.dir, name)
                cluster = f" cluster={leaf.cluster}" if leaf.cluster else ""
                cluster += f" device={leaf.device}" if leaf.device else ""
                sans = f" sans={','.join(leaf.sans)}" if leaf.sans else ""
                print(f"{name}: {leaf.role} cn={leaf.common_name}{cluster}{sans} until={leaf.not_after:%Y-%m-%d} ok")
    except PkiError as exc:
        print(f"emsfl pki: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"emsfl pki: error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
