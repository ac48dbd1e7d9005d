"""TLS certificates and SuperNode authentication keys for a Flower deployment (``cryptography``).

``mona-sfl certs OUT [--hosts 127.0.0.1,localhost] [--nodes N] [--days D]`` (see :mod:`mona_sfl.cli.certs`)
(``simulations/gen_certs.sh`` wraps it) writes into ``OUT``:

=====================  =====================================================================
``ca.crt``             a self-made CA certificate: give it to every SuperNode
                       (``--root-certificates``), to the SuperLink (``--ssl-ca-certfile``) and
                       to the machine that runs ``flwr`` (``root-certificates`` of the connection)
``ca.key``             the CA's private key: only needed to issue more certificates; keep it offline
``server.pem/.key``    the SuperLink's certificate (signed by the CA, SANs = ``--hosts``) and key
``supernode-I.key``    SuperNode I's authentication key: EC P-384, OpenSSH private-key format,
                       what ``flower-supernode --auth-supernode-private-key`` loads
``supernode-I.pub``    its public key (OpenSSH format), what ``flwr supernode register`` takes
=====================  =====================================================================

Private keys are written unencrypted with mode 0600; existing files are never overwritten.
A SuperLink started with ``--enable-supernode-auth`` refuses every SuperNode whose public key
was not registered through its Control API (``flwr supernode register KEY.pub CONNECTION``).

This is a small CA for tests and for a lab deployment. In production, use the certificates of
your organisation's CA for the SuperLink; the SuperNode key pairs are yours to make either way.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mona_sfl.errors import UserError

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"


class CertError(UserError):
    """Bad input (an existing file, an empty host name): exit code 2 on the command line."""


def node_key_paths(out: Path, index: int) -> tuple[Path, Path]:
    """``(private, public)`` key files of SuperNode ``index`` in ``out``."""
    return Path(out) / f"supernode-{index}.key", Path(out) / f"supernode-{index}.pub"


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Create ``path`` (never overwrite); private keys get mode 0600 from the start."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(path, flags, 0o600 if private else 0o644)
    except FileExistsError:
        raise CertError(f"{path} already exists: choose an empty folder or delete it first") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        h = h.strip()
        if not h:
            raise CertError("empty host name in --hosts")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_ca_and_server(out: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS, days: int = 365) -> None:
    """``ca.crt``/``ca.key`` and ``server.pem``/``server.key`` (SANs = ``hosts``) in ``out``."""
    out = Path(out)
    for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY):
        if (out / name).exists():
            raise CertError(f"{out / name} already exists: choose an empty folder or delete it first")
    san = _san(hosts)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mona-sfl deployment CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0].strip() or "superlink")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(san, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    out.mkdir(parents=True, exist_ok=True)
    _write(out / CA_KEY, _key_pem(ca_key), private=True)
    _write(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / SERVER_KEY, _key_pem(server_key), private=True)
    _write(out / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM), private=False)


def make_node_key(out: Path, index: int) -> tuple[Path, Path]:
    """SuperNode ``index``'s authentication key pair (EC P-384, OpenSSH format); returns (private, public)."""
    key_path, pub_path = node_key_paths(out, index)
    Path(out).mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), private=True)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(pub_path, pub + f" supernode-{index}\n".encode(), private=False)
    return key_path, pub_path


def make_test_certs(out: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS, nodes: int = 0, days: int = 365) -> Path:
    """CA, SuperLink certificate and ``nodes`` SuperNode key pairs in ``out``; returns ``out``."""
    if nodes < 0:
        raise CertError(f"--nodes must be >= 0, got {nodes}")
    if days < 1:
        raise CertError(f"--days must be >= 1, got {days}")
    make_ca_and_server(out, hosts, days)
    for i in range(nodes):
        make_node_key(out, i)
    return Path(out)


def add_node_keys(out: str | Path, nodes: int) -> list[Path]:
    """``nodes`` more SuperNode key pairs in ``out``, numbered after the ones it has; their public keys."""
    if nodes < 1:
        raise CertError("--node-keys-only needs --nodes >= 1")
    out = Path(out)
    start = 0
    while node_key_paths(out, start)[0].exists() or node_key_paths(out, start)[1].exists():
        start += 1
    return [make_node_key(out, i)[1] for i in range(start, start + nodes)]


