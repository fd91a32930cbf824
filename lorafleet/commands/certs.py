"""`lorafleet certs` and `lorafleet node-key`: the TLS files and SuperNode keys a federation needs.

    lorafleet certs --out DIR --name server.example.org [--name 203.0.113.7 ...] [--days N]
    lorafleet node-key --out keys/device-1

``certs`` writes ``DIR/ca.pem`` (give it to every device), ``DIR/server.pem`` and ``DIR/server.key`` (the
server's, for ``lorafleet serve --ssl-*``) and ``DIR/ca.key`` (to sign later certificates; keep it off the
server). ``node-key`` writes a device's private key and ``.pub``: the device keeps the first
(``lorafleet client --auth-key``), the server gets the second (``lorafleet serve --authorized-keys``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorafleet.commands.options import examples


def certs(
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Directory for the files (new or empty).")],
    name: Annotated[list[str], typer.Option("--name", metavar="HOST",
                                            help="A name or address devices connect to (repeatable).")],
    days: Annotated[int, typer.Option("--days", min=1, help="Validity in days.")] = 825,
) -> None:
    """Make a CA and a server certificate for the names devices connect to."""
    from lorafleet.export.formats.errors import ConfigError
    from lorafleet.federation.certs import write_tls

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty directory")
    files = write_tls(out, name, days=days)
    typer.echo(f"wrote {files.ca} (for every device), {files.cert} and {files.key} (the server's), "
               f"{files.ca_key} (the CA's key: keep it off the server); names: {', '.join(name)}")


def node_key(
    out: Annotated[Path, typer.Option("--out", metavar="FILE",
                                      help="The private key; FILE.pub is its public key.")],
    key_format: Annotated[str, typer.Option(
        "--format", metavar="openssh|pkcs8",
        help="The private key's format: openssh (lorafleet client, Flower's SuperNode) or pkcs8 (PEM: "
             "lorafleet-native join, OpenSSL).")] = "openssh",
) -> None:
    """Make a SuperNode authentication key pair (ECDSA P-384; the public key in OpenSSH format)."""
    from lorafleet.export.formats.errors import ConfigError
    from lorafleet.federation.certs import KEY_FORMATS, write_node_key

    if key_format not in KEY_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(KEY_FORMATS)}, got {key_format!r}")
    pub = out.with_name(out.name + ".pub")
    if out.exists() or pub.exists():
        raise ConfigError(f"{out if out.exists() else pub} already exists")
    private, public = write_node_key(out, key_format)
    user = "lorafleet-native join --auth-key" if key_format == "pkcs8" else "lorafleet client --auth-key"
    typer.echo(f"wrote {private} (the device keeps it: {user}) and {public} "
               f"(for the server: lorafleet serve --authorized-keys)")


def register(app: typer.Typer) -> None:
    app.command("certs", epilog=examples(
        "lorafleet certs --out tls --name server.example.org --name 127.0.0.1",
    ))(certs)
    app.command("node-key", epilog=examples("lorafleet node-key --out keys/jetson-1",
                                            "lorafleet node-key --out keys/phone-1 --format pkcs8"))(node_key)
