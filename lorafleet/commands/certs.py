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
) -> None:
    """Make a SuperNode authentication key pair (ECDSA P-384, OpenSSH format)."""
    from lorafleet.export.formats.errors import ConfigError
    from lorafleet.federation.certs import write_node_key

    pub = out.with_name(out.name + ".pub")
    if out.exists() or pub.exists():
        raise ConfigError(f"{out if out.exists() else pub} already exists")
    private, public = write_node_key(out)
    typer.echo(f"wrote {private} (the device keeps it: lorafleet client --auth-key) and {public} "
               f"(for the server: lorafleet serve --authorized-keys)")


def register(app: typer.Typer) -> None:
    app.command("certs", epilog=examples(
        "lorafleet certs --out tls --name server.example.org --name 127.0.0.1",
    ))(certs)
    app.command("node-key", epilog=examples("lorafleet node-key --out keys/jetson-1"))(node_key)
