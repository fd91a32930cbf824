"""`lorafleet client`: run a device — a Flower SuperNode with the lorafleet ClientApp.

    lorafleet client --server HOST:PORT --package PKG --data FILE (--profile FILE | --measure)
                     [--backend B] [--root-certificates CA] [--exit-on-finish] [--verbose]
    lorafleet client --dry-run --package PKG (--profile FILE | --measure) [--data FILE]

The ClientApp's profiler picks the rank (an emulated device from ``--profile``, or this machine with
``--measure``) under the server's round budget; its trainer trains locally on ``--data``. Runs until stopped
(Ctrl-C), or with ``--exit-on-finish`` until the run's last round. The owner sees one line per round. The
orchestration is :func:`lorafleet.federation.run_client`; ``--dry-run`` is
:func:`lorafleet.edge_client.dry_run.dry_run` (no server contacted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorafleet.commands.options import examples
from lorafleet.export.formats.errors import ConfigError

DRY_RUN_EXAMPLES = 2  # built-in examples per seen family a dry run trains its step on, without --data


def check_sha256(text: str) -> str:
    """A FAB digest as ``flwr`` prints it: 64 hex digits."""
    digest = text.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ConfigError(f"--trust-app must be a FAB's sha256 (64 hex digits), got {text!r}")
    return digest


def client(
    package: Annotated[Path, typer.Option("--package", help="The edge package (the server's).")],
    server: Annotated[str | None, typer.Option("--server", metavar="HOST:PORT",
                                               help="The server's address (not with --dry-run).")] = None,
    data: Annotated[Path | None, typer.Option("--data", metavar="FILE",
                                              help="Local training data (JSONL; a dry run defaults to a "
                                                   "batch of the built-in tasks).")] = None,
    profile: Annotated[str | None, typer.Option("--profile", metavar="FILE",
                                                help="Emulate the device of this profile (a TOML file, or a "
                                                     "name in profiles/).")] = None,
    measure: Annotated[bool, typer.Option("--measure", help="Measure this machine (e.g. a Jetson).")] = False,
    backend: Annotated[str, typer.Option("--backend", metavar="B",
                                         help="executorch, onnxruntime, torch or native (default: the first the "
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
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check this device without joining: pick the rank, "
                                                              "train one step, report memory, step time "
                                                              "and loss.")] = False,
    exit_on_finish: Annotated[bool, typer.Option("--exit-on-finish",
                                                 help="Exit (0) when the run's last round is done instead of "
                                                      "waiting for the next run.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show all of Flower's output (with --dry-run: "
                                                                  "the runtimes' warnings and logs).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --dry-run: print the report as JSON.")] = False,
) -> None:
    """Run a lorafleet device on Flower (SuperNode + the lorafleet ClientApp), or check it with --dry-run."""
    from lorafleet.edge_client.data import read_jsonl
    from lorafleet.edge_client.flower_client import NodeSettings, resolve_backend
    from lorafleet.edge_client.profiles import load_profile, resolve_profile_path
    from lorafleet.export.formats.package import open_package
    from lorafleet.federation import Tls, run_client

    if (profile is None) == (not measure):
        raise ConfigError("give exactly one of --profile FILE (an emulated device) or --measure (this machine)")
    if dry_run and server is not None:
        raise ConfigError("--dry-run contacts no server: drop --server")
    if not dry_run and (server is None or data is None):
        raise ConfigError("a device needs --server HOST:PORT and --data FILE (or check it first with --dry-run)")
    profile_path = ""
    if profile is not None:
        load_profile(profile)  # a one-line error now rather than in the ClientApp
        profile_path = str(resolve_profile_path(profile).resolve())
    if dry_run:
        from lorafleet.commands.output import third_party_log

        with third_party_log("client-dry-run", verbose=verbose):
            _dry_run(package, data, backend, profile_path, measure, as_json)
        return
    assert server is not None and data is not None
    pkg = open_package(package)  # checks every file once; the ClientApp then trusts the package
    examples = read_jsonl(data).examples
    settings = NodeSettings(package=str(package.resolve()), data=str(data.resolve()), backend=backend,
                            profile=profile_path, measure=measure)
    chosen = resolve_backend(settings, pkg)
    if not root_certificates:
        typer.echo("lorafleet: warning: no --root-certificates: the connection to the server is plaintext")
    typer.echo(f"lorafleet: device ({'measured' if measure else profile}) with {len(examples)} examples, "
               f"backend {chosen}, connecting to {server}")
    trusted = tuple(check_sha256(h) for h in trust_app or ())
    code = run_client(settings, server, Tls(ca_certfile=root_certificates), auth_key=auth_key,
                      trusted_apps=trusted, exit_on_finish=exit_on_finish, verbose=verbose, echo=typer.echo)
    if code not in (0, -15):
        from lorafleet.federation import FederationError

        raise FederationError(f"the SuperNode stopped with status {code} before the run's last round (rerun "
                              f"with --verbose to see Flower's output)")


def _dry_run(package: Path, data: Path | None, backend: str, profile: str, measure: bool, as_json: bool) -> None:
    import json

    from lorafleet.edge_client.data import read_jsonl
    from lorafleet.edge_client.dry_run import dry_run
    from lorafleet.edge_client.flower_client import NodeSettings
    from lorafleet.edge_client.rank_choice import fmt_bytes
    from lorafleet.export.formats.errors import LorafleetError

    examples: list[Any]
    if data is not None:
        examples, source = read_jsonl(data).examples, str(data)
    else:
        from lorafleet import tasks

        examples = [ex for fam in tasks.seen_families() for ex in tasks.generate(fam, DRY_RUN_EXAMPLES, seed=0)]
        source = "the built-in tasks"
    settings = NodeSettings(package=str(package), data=str(data or "built-in"), backend=backend, profile=profile,
                            measure=measure)
    report = dry_run(settings, examples)
    if as_json:
        typer.echo(json.dumps(report.to_json()))
    else:
        for reason in report.reasons:
            typer.echo(f"- {reason}")
    if report.loss is None:
        raise LorafleetError("no packaged rank fits this device (see the reasons above): it would answer the "
                             "server but not train")
    if as_json:
        return
    step = f"{report.step_seconds:.2f} s" if report.step_seconds >= 1 else f"{report.step_seconds * 1e3:.1f} ms"
    typer.echo(f"dry run: rank {report.rank} on {report.backend}, one step of batch {report.batch_size} from "
               f"{len(examples)} examples of {source}: loss {report.loss:.4f}, {step} per step, "
               f"peak RSS {fmt_bytes(report.peak_rss_bytes)} of {fmt_bytes(report.memory_available_bytes)} "
               f"available; no server contacted")


def register(app: typer.Typer) -> None:
    app.command("client", epilog=examples(
        "lorafleet client --dry-run --package pkg --profile pixel-8",
        "lorafleet client --server 127.0.0.1:9092 --package pkg --data data.jsonl --measure --exit-on-finish",
    ))(client)
