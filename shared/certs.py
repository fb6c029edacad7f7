"""Development certificates for a deployment: a CA, a server certificate, site key pairs.

``fedrnn certs DIR`` writes what a trial deployment needs; production replaces the CA and
server certificate with the organisation's own (docs/deployment.md).

- ``ca.crt``: the certificate every site trusts (``fedrnn client --root-cert``);
- ``server.crt`` / ``server.key``: the server's TLS identity, valid for ``localhost``,
  ``127.0.0.1`` and every ``--host`` given;
- with ``--clients N``: ``site-<i>.key`` / ``site-<i>.pub``, ECDSA P-384 key pairs that
  authenticate a site to a server run with ``--require-auth`` (the public halves go into
  the server's authorised-keys directory; the private half never leaves its site).

The CA's own private key is written as ``ca.key`` so that more server certificates can be
issued later; keep it off the server in production.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedrnn.shared.errors import ConfigError
from fedrnn.shared.files import write_atomic

VALID_DAYS = 365


def write_certificates(directory: str | Path, *, hosts: list[str] | tuple[str, ...] = (),
                       clients: int = 0, overwrite: bool = False) -> list[Path]:
    """Write a development CA, a server certificate for ``localhost`` + ``hosts`` and
    ``clients`` site key pairs into ``directory``; returns the files written.

    Refuses to overwrite existing files unless ``overwrite``: replacing a CA silently
    would lock out every site that trusts the old one.
    """
    out = Path(directory)
    names = ["ca.crt", "ca.key", "server.crt", "server.key"]
    names += [f"site-{i}.{ext}" for i in range(1, clients + 1) for ext in ("key", "pub")]
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise ConfigError(f"{out} already holds {', '.join(existing)}; "
                          "choose another directory or pass --overwrite")
    if clients < 0:
        raise ConfigError("--clients must be 0 or more")
    out.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrnn development CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    san = _subject_alt_names(["localhost", "127.0.0.1", "::1", *hosts])
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrnn server")]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    files = {
        "ca.crt": _pem_cert(ca_cert), "ca.key": _pem_key(ca_key),
        "server.crt": _pem_cert(server_cert), "server.key": _pem_key(server_key),
    }
    for i in range(1, clients + 1):
        key = ec.generate_private_key(ec.SECP384R1())
        # OpenSSH encodings: the formats Flower's SuperNode and SuperLink read
        files[f"site-{i}.key"] = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption())
        files[f"site-{i}.pub"] = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    written = []
    for name, data in files.items():
        path = out / name
        # a private key is owner-only from the moment its file exists, not chmod-ed after
        write_atomic(path, data, private=name.endswith(".key"))
        written.append(path)
    return written


def _subject_alt_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    seen = set()
    for host in hosts:
        host = host.strip()
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
