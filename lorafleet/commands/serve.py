"""`lorafleet serve`: run a federation server — Flower's SuperLink with the lorafleet ServerApp on it.

    lorafleet serve --package PKG --method M --rounds R [--min-clients N] [--fraction F] [--round-timeout S]
                    --address HOST:PORT --state DIR [--resume]
                    [--ssl-certfile CERT --ssl-keyfile KEY --ssl-ca-certfile CA] [--authorized-keys DIR]
                    [--max-update-norm N] [--max-examples N] [--clip-updates K]

Exits 0 after R rounds; DIR holds ``global/`` (the global PEFT adapter) and ``state.json``. Devices reach
only the Fleet API on ``--address`` (:mod:`lorafleet.federation.gateway`); the orchestration is
:func:`lorafleet.federation.serve`; docs/SECURITY.md has the deployment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import click
import typer

from lorafleet.commands.options import AUTO_POSITIVE, examples
from lorafleet.server.aggregation import METHODS


def serve(
    package: Annotated[Path, typer.Option("--package", help="The edge package the devices train.")],
    method: Annotated[str, typer.Option("--method", click_type=click.Choice(list(METHODS)),
                                        help="fedavg (every device at the package's smallest rank), hetlora "
                                             "(Cho et al. 2024), flexlora (Bai et al. 2024) or raflora "
                                             "(Wu et al. 2026).")],
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Rounds to run (in all, when resuming).")],
    address: Annotated[str, typer.Option("--address", metavar="HOST:PORT",
                                         help="Where the SuperLink listens for devices.")],
    state: Annotated[Path, typer.Option("--state", metavar="DIR",
                                        help="State directory: global/ adapter, state.json, Flower's files.")],
    min_clients: Annotated[int, typer.Option("--min-clients", min=1,
                                             help="Devices to wait for before a round, and (unless "
                                                  "--min-valid) valid replies needed to update the global "
                                                  "adapter.")] = 2,
    min_valid: Annotated[int, typer.Option("--min-valid", min=0, show_default="--min-clients",
                                           help="Valid replies needed to update the global adapter.")] = 0,
    fraction: Annotated[float, typer.Option("--fraction", help="Share of connected devices per round.")] = 1.0,
    round_timeout: Annotated[float, typer.Option("--round-timeout", metavar="S",
                                                 help="Seconds to wait for replies; also each device's time "
                                                      "budget for its local round.")] = 600.0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in --state.")] = False,
    local_steps: Annotated[int, typer.Option("--local-steps", min=1,
                                             help="Training steps per device per round.")] = 10,
    lr: Annotated[float, typer.Option("--lr", help="Devices' learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option("--seed", help="Seed of sampling and of the devices' batches.")] = 0,
    ssl_certfile: Annotated[str, typer.Option("--ssl-certfile", metavar="CERT",
                                              help="TLS: the server's certificate (PEM).")] = "",
    ssl_keyfile: Annotated[str, typer.Option("--ssl-keyfile", metavar="KEY",
                                             help="TLS: the server's private key (PEM).")] = "",
    ssl_ca_certfile: Annotated[str, typer.Option("--ssl-ca-certfile", metavar="CA",
                                                 help="TLS: the CA certificate devices verify the server "
                                                      "with.")] = "",
    authorized_keys: Annotated[Path | None, typer.Option(
        "--authorized-keys", metavar="PATH",
        help="SuperNode authentication: a .pub key, or a directory of them (lorafleet node-key); only "
             "devices holding one of the private keys can join. Needs TLS.")] = None,
    max_update_norm: Annotated[Any, typer.Option(
        "--max-update-norm", metavar="auto|N", click_type=AUTO_POSITIVE,
        help="Drop a reply whose weight change ‖ΔW − ΔW_sent‖_F exceeds N; auto: drop one that moved any "
             "LoRA parameter further than AdamW can in --local-steps steps at --lr (docs/SECURITY.md).")] = "auto",
    max_examples: Annotated[int, typer.Option("--max-examples", min=1,
                                              help="A reply weighs at most this many examples.")] = 10_000,
    clip_updates: Annotated[float, typer.Option(
        "--clip-updates", metavar="K",
        help="Clip each reply's parameter update to K × the round's median norm (0: off; K >= 1).")] = 0.0,
) -> None:
    """Run a lorafleet federation server on Flower (SuperLink + the lorafleet ServerApp)."""
    from lorafleet.federation import Tls
    from lorafleet.federation import serve as run_serve
    from lorafleet.server.server_app import ServerConfig

    config = ServerConfig(package=str(package.resolve()), method=method, rounds=rounds,
                          state_dir=str(state.resolve()), resume=resume, min_clients=min_clients,
                          min_valid=min_valid, fraction=fraction, round_timeout=round_timeout, seed=seed,
                          local_steps=local_steps, lr=lr, max_update_norm=max_update_norm,
                          max_examples=max_examples, clip_updates=clip_updates)
    final = run_serve(config, address, Tls(ssl_certfile, ssl_keyfile, ssl_ca_certfile),
                      authorized_keys=authorized_keys, echo=typer.echo)
    typer.echo(f"lorafleet: {final.method} finished: round {final.round} of {final.rounds}; global adapter in "
               f"{state / 'global'}")


def register(app: typer.Typer) -> None:
    app.command("serve", epilog=examples(
        "lorafleet serve --package pkg --method flexlora --rounds 3 --min-clients 2 --address 127.0.0.1:9092 "
        "--state fed-state",
        "lorafleet serve --package pkg --method flexlora --rounds 20 --min-clients 3 --address 0.0.0.0:9092 "
        "--state fed-state --ssl-certfile tls/server.pem --ssl-keyfile tls/server.key --ssl-ca-certfile tls/ca.pem",
    ))(serve)
