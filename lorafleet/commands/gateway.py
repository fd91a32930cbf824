"""`lorafleet gateway`: serve devices the Flower Fleet API of a SuperLink, and nothing else.

    lorafleet gateway --listen HOST:PORT --superlink 127.0.0.1:PORT [--superlink-ca CA]
                      [--ssl-certfile CERT --ssl-keyfile KEY]

``lorafleet serve`` starts one itself; this command puts one in front of a SuperLink started with Flower's own
commands (bound to 127.0.0.1). See :mod:`lorafleet.federation.gateway` and docs/SECURITY.md.
"""

from __future__ import annotations

from typing import Annotated

import typer

from lorafleet.commands.options import examples


def gateway(
    listen: Annotated[str, typer.Option("--listen", metavar="HOST:PORT",
                                        help="Where devices connect (e.g. 0.0.0.0:9092).")],
    superlink: Annotated[str, typer.Option("--superlink", metavar="HOST:PORT",
                                           help="The SuperLink, bound to 127.0.0.1.")],
    superlink_ca: Annotated[str, typer.Option("--superlink-ca", metavar="CA",
                                              help="CA of the SuperLink's certificate (without it the "
                                                   "SuperLink is reached over plain HTTP).")] = "",
    ssl_certfile: Annotated[str, typer.Option("--ssl-certfile", metavar="CERT",
                                              help="TLS towards devices: the server certificate (PEM).")] = "",
    ssl_keyfile: Annotated[str, typer.Option("--ssl-keyfile", metavar="KEY",
                                             help="TLS towards devices: its private key (PEM).")] = "",
    max_body_mib: Annotated[int, typer.Option("--max-body-mib", min=1,
                                              help="Largest request a device may send.")] = 64,
) -> None:
    """Forward only the Flower Fleet API (POST /v1/fleet/...) from devices to a local SuperLink."""
    from lorafleet.federation import parse_address
    from lorafleet.federation.gateway import GatewayConfig, run_gateway

    host, port = parse_address(listen)
    parse_address(superlink)
    run_gateway(GatewayConfig(host, port, superlink, ssl_certfile, ssl_keyfile, superlink_ca,
                              max_body_mib << 20))


def register(app: typer.Typer) -> None:
    app.command("gateway", epilog=examples(
        "lorafleet gateway --listen 0.0.0.0:9092 --superlink 127.0.0.1:9093 --superlink-ca ca.pem",
    ))(gateway)
