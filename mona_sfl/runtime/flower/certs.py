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

Private keys are written unencrypted with mode 0600. Existing files are never overwritten:
before anything is written, every file that would be is checked, and one that exists (a link
included) is an error naming them all; nothing is half-written (a SuperNode key whose ``.pub``
belongs to another key, a CA without its server certificate). ``force=True`` (``--force``)
replaces them instead, each file at once (written beside it, then renamed over it).
A SuperLink started with ``--enable-supernode-auth`` refuses every SuperNode whose public key
was not registered through its Control API (``flwr supernode register KEY.pub CONNECTION``).

This is a small CA for tests and for a lab deployment. In production, use the certificates of
your organisation's CA for the SuperLink; the SuperNode key pairs are yours to make either way.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
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


#: File name -> (content, private). What one command writes, made in memory before anything is written.
Files = dict[str, tuple[bytes, bool]]


def _write_all(out: Path, files: Files, *, force: bool = False) -> list[Path]:
    """Write ``files`` into ``out``: all of them or (on an error) none. Without ``force`` a file
    that exists is refused before anything is written; with it, each is replaced at once."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CertError(f"{out} exists and is not a folder")
    if not force:
        taken = [out / name for name in files if os.path.lexists(out / name)]
        if taken:
            what = f"{taken[0]} already exists" if len(taken) == 1 else f"{', '.join(map(str, taken))} already exist"
            raise CertError(f"{what}: keys and certificates are never overwritten: choose another folder, "
                            f"delete {'it' if len(taken) == 1 else 'them'}, or pass --force to replace them")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for name, (data, private) in files.items():
            path = out / name
            mode = 0o600 if private else 0o644
            if force:
                fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
                try:
                    os.fchmod(fd, mode)
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                    os.replace(tmp, path)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
            else:
                try:  # O_EXCL: a file made meanwhile is not overwritten either
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                except FileExistsError:
                    raise CertError(f"{path} already exists (it appeared while the keys were written): nothing was written") from None
                written.append(path)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
    except BaseException:
        for path in written:  # files this call created; a replaced file cannot be restored
            path.unlink(missing_ok=True)
        raise
    return [out / name for name in files]


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


def ca_and_server(hosts: tuple[str, ...] = DEFAULT_HOSTS, days: int = 365) -> Files:
    """``ca.crt``/``ca.key`` and ``server.pem``/``server.key`` (SANs = ``hosts``), in memory."""
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
    return {
        CA_KEY: (_key_pem(ca_key), True),
        CA_CERT: (ca_cert.public_bytes(serialization.Encoding.PEM), False),
        SERVER_KEY: (_key_pem(server_key), True),
        SERVER_CERT: (server_cert.public_bytes(serialization.Encoding.PEM), False),
    }


def node_key(index: int) -> Files:
    """SuperNode ``index``'s authentication key pair (EC P-384, OpenSSH format), in memory."""
    key = ec.generate_private_key(ec.SECP384R1())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    return {f"supernode-{index}.key": (private, True), f"supernode-{index}.pub": (pub + f" supernode-{index}\n".encode(), False)}


def make_node_key(out: Path, index: int) -> tuple[Path, Path]:
    """Write SuperNode ``index``'s key pair into ``out``; returns (private, public)."""
    _write_all(out, node_key(index))
    return node_key_paths(out, index)


def make_test_certs(out: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS, nodes: int = 0, days: int = 365, *, force: bool = False) -> Path:
    """CA, SuperLink certificate and ``nodes`` SuperNode key pairs in ``out``; returns ``out``.
    Nothing is written when one of these files exists, unless ``force`` (then they are replaced)."""
    if nodes < 0:
        raise CertError(f"--nodes must be >= 0, got {nodes}")
    if days < 1:
        raise CertError(f"--days must be >= 1, got {days}")
    files = ca_and_server(hosts, days)
    for i in range(nodes):
        files.update(node_key(i))
    _write_all(out, files, force=force)
    return Path(out)


def add_node_keys(out: str | Path, nodes: int) -> list[Path]:
    """``nodes`` more SuperNode key pairs in ``out``, numbered after the ones it has; their public keys."""
    if nodes < 1:
        raise CertError("--node-keys-only needs --nodes >= 1")
    out = Path(out)
    start = 0
    while any(os.path.lexists(p) for p in node_key_paths(out, start)):
        start += 1
    files: Files = {}
    for i in range(start, start + nodes):
        files.update(node_key(i))
    _write_all(out, files)
    return [node_key_paths(out, i)[1] for i in range(start, start + nodes)]
