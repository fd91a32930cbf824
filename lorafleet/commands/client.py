"""`lorafleet client`: run a device — a Flower SuperNode with the lorafleet ClientApp.

    lorafleet client --server HOST:PORT --package PKG --data FILE (--profile FILE | --measure)
                     [--backend B] [--root-certificates CA]

The ClientApp's profiler picks the rank (an emulated device from ``--profile``, or this machine with
``--measure``) under the server's round budget; its trainer trains locally on ``--data``. Runs until stopped
(Ctrl-C). The orchestration is :func:`lorafleet.federation.run_client`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorafleet.export.formats.errors import ConfigError


def check_sha256(text: str) -> str:
    """A FAB digest as ``flwr`` prints it: 64 hex digits."""
    digest = text.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ConfigError(f"--trust-app must be a FAB's sha256 (64 hex digits), got {text!r}")
    return digest


def client(
    server: Annotated[str, typer.Option("--server", metavar="HOST:PORT", help="The server's address.")],
    package: Annotated[Path, typer.Option("--package", help="The edge package (the server's).")],
    data: Annotated[Path, typer.Option("--data", metavar="FILE", help="Local training data (JSONL).")],
    profile: Annotated[str | None, typer.Option("--profile", metavar="FILE",
                                                help="Emulate the device of this profile (a TOML file, or a "
                                                     "name in profiles/).")] = None,
    measure: Annotated[bool, typer.Option("--measure", help="Measure this machine (e.g. a Jetson).")] = False,
    backend: Annotated[str, typer.Option("--backend", metavar="B",
                                         help="executorch, onnxruntime or torch (default: the first the "
                                              "device and the package both have).")] = "auto",
    root_certificates: Annotated[str, typer.Option("--root-certificates", metavar="CA",
                                                   help="TLS: the CA certificate to verify the server "
                                                        "with (without it the connection is plaintext).")] = "",
    auth_key: Annotated[Path | None, typer.Option("--auth-key", metavar="FILE",
                                                  help="This device's private key (lorafleet node-key) for "
                                                       "SuperNode authentication; needs TLS.")] = None,
    trust_app: Annotated[list[str] | None, typer.Option(
        "--trust-app", metavar="SHA256",
        help="Also run the Flower app with this FAB sha256 (repeatable); by default a device runs only "
             "the lorafleet app it has installed.")] = None,
) -> None:
    """Run a lorafleet device on Flower (SuperNode + the lorafleet ClientApp)."""
    from lorafleet.edge_client.data import read_jsonl
    from lorafleet.edge_client.flower_client import NodeSettings, resolve_backend
    from lorafleet.edge_client.profiles import load_profile, resolve_profile_path
    from lorafleet.export.formats.package import open_package
    from lorafleet.federation import Tls, run_client

    if (profile is None) == (not measure):
        raise ConfigError("give exactly one of --profile FILE (an emulated device) or --measure (this machine)")
    pkg = open_package(package)  # checks every file once; the ClientApp then trusts the package
    examples = read_jsonl(data).examples
    profile_path = ""
    if profile is not None:
        load_profile(profile)  # a one-line error now rather than in the ClientApp
        profile_path = str(resolve_profile_path(profile).resolve())
    settings = NodeSettings(package=str(package.resolve()), data=str(data.resolve()), backend=backend,
                            profile=profile_path, measure=measure)
    chosen = resolve_backend(settings, pkg)
    if not root_certificates:
        typer.echo("lorafleet: warning: no --root-certificates: the connection to the server is plaintext")
    typer.echo(f"lorafleet: device ({'measured' if measure else profile}) with {len(examples)} examples, "
               f"backend {chosen}, connecting to {server}")
    trusted = tuple(check_sha256(h) for h in trust_app or ())
    code = run_client(settings, server, Tls(ca_certfile=root_certificates), auth_key=auth_key,
                      trusted_apps=trusted)
    if code not in (0, -15):
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("client")(client)
