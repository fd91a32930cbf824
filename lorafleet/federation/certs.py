"""TLS certificates and SuperNode keys for a federation, made with ``cryptography``.

* :func:`write_tls` — a CA and a server certificate it signs, for the names devices connect to. The
  certificate's subject alternative names must hold every name or address a device dials (a device checks
  the server's name against them); IP addresses go in as IP entries, anything else as DNS names.
* :func:`write_node_key` — a SuperNode's authentication key pair: an ECDSA P-384 private key (OpenSSH format,
  what ``flower-supernode --auth-supernode-private-key`` reads) and its public key (``flwr supernode register``
  takes it), as Flower's SuperNode authentication expects.

``lorafleet serve`` also uses :func:`write_tls` for the private link between its gateway and the SuperLink on
127.0.0.1, with a CA made for the run and never shown to devices.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.export.formats.errors import ConfigError

DEFAULT_DAYS = 825  # the longest validity clients accept for a server certificate (CA/Browser forum limit)


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA certificate: every device gets this (--root-certificates)
    cert: Path  # the server certificate (--ssl-certfile)
    key: Path  # the server's private key (--ssl-keyfile), readable by its owner only
    ca_key: Path | None = None  # the CA's private key, to sign later certificates; keep it off the server


def write_tls(directory: Path, names: Sequence[str], *, days: int = DEFAULT_DAYS, keep_ca_key: bool = True,
              common_name: str = "lorafleet federation CA") -> TlsFiles:
    """Write ``ca.pem``, ``server.pem``, ``server.key`` (and ``ca.key``) into ``directory`` for ``names``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not names:
        raise ConfigError("a server certificate needs at least one name or address devices connect to")
    if days < 1:
        raise ConfigError(f"days must be at least 1, got {days}")
    san = x509.SubjectAlternativeName([_san_entry(n) for n in dict.fromkeys(names)])
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end).add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key",
                     directory / "ca.key" if keep_ca_key else None)
    _write_public(files.ca, _pem_cert(ca))
    _write_public(files.cert, _pem_cert(cert))
    _write_private(files.key, _pem_key(key))
    if files.ca_key is not None:
        _write_private(files.ca_key, _pem_key(ca_key))
    return files


KEY_FORMATS = ("openssh", "pkcs8")


def write_node_key(private_path: Path, key_format: str = "openssh") -> tuple[Path, Path]:
    """Write a SuperNode key pair: ``private_path`` (the private key: OpenSSH, what Flower's SuperNode reads, or
    PKCS#8 PEM, what OpenSSL and ``lorafleet-native join`` read) and ``private_path.pub`` (OpenSSH)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if key_format not in KEY_FORMATS:
        raise ConfigError(f"key format must be one of {', '.join(KEY_FORMATS)}, got {key_format!r}")
    key = ec.generate_private_key(ec.SECP384R1())
    public_path = private_path.with_name(private_path.name + ".pub")
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fmt = serialization.PrivateFormat.OpenSSH if key_format == "openssh" else serialization.PrivateFormat.PKCS8
    _write_private(private_path, key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    _write_public(public_path, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                             serialization.PublicFormat.OpenSSH) + b"\n")
    return private_path, public_path


def read_public_keys(path: Path) -> list[Path]:
    """The SuperNode public keys ``path`` names: a ``.pub`` file, or a directory of them (sorted)."""
    if path.is_dir():
        keys = sorted(p for p in path.iterdir() if p.suffix == ".pub" and p.is_file())
        if not keys:
            raise ConfigError(f"{path} holds no *.pub SuperNode public keys")
    elif path.is_file():
        keys = [path]
    else:
        raise ConfigError(f"authorized keys not found: {path}")
    for key in keys:
        check_public_key(key)
    return keys


def check_public_key(path: Path) -> None:
    """A one-line error unless ``path`` holds an OpenSSH ECDSA public key on a NIST curve (what Flower takes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path} is not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{path} is not an ECDSA key (Flower's SuperNode authentication takes ECDSA P-256/384/521)")


def _san_entry(name: str) -> Any:
    from cryptography import x509

    if not name or any(c.isspace() for c in name):
        raise ConfigError(f"not a host name or address: {name!r}")
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return x509.DNSName(name)


def _pem_cert(cert: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)  # type: ignore[attr-defined]


def _pem_key(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,  # type: ignore[attr-defined]
                             serialization.NoEncryption())


def _write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only (0600) before any secret byte is written."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
