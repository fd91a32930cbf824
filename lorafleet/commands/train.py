"""`lorafleet train`: train a LoRA adapter locally from an edge package."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lorafleet.commands.options import examples
from lorafleet.commands.output import Quiet, Verbose, say, third_party_log
from lorafleet.commands.profile import BackendName


def train(
    package: Annotated[Path, typer.Option("--package", help="Edge package directory.")],
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank to train (one of the package's).")],
    backend: Annotated[BackendName, typer.Option("--backend", help="Training runtime.")],
    data: Annotated[Path, typer.Option("--data", help="JSONL: instruction/input/output (Alpaca, Dolly, NI).")],
    steps: Annotated[int, typer.Option("--steps", help="Training steps.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data order.")],
    out: Annotated[Path, typer.Option("--out", help="Write the trained PEFT adapter directory here.")],
    adapter: Annotated[Path | None, typer.Option(
        "--adapter", help="Start from this PEFT adapter (truncated to --rank).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help="Batch size (default: the package's).")] = None,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate (serve and fleet use the same "
                                                   "default).")] = 1e-3,
    self_prune: Annotated[bool, typer.Option("--self-prune", help="HetLoRA local rank self-pruning.")] = False,
    skip_invalid: Annotated[bool, typer.Option(
        "--skip-invalid", help="Skip malformed data lines (and count them) instead of failing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a summary.")] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Train one rank of an edge package on instruction data and write the adapter (PEFT directory)."""
    with third_party_log("train", verbose=verbose):
        _train(package, rank, backend, data, steps, seed, out, adapter, batch_size, lr, self_prune, skip_invalid,
               as_json, quiet)


def _train(package: Path, rank: int, backend: BackendName, data: Path, steps: int, seed: int, out: Path,
           adapter: Path | None, batch_size: int | None, lr: float, self_prune: bool, skip_invalid: bool,
           as_json: bool, quiet: bool) -> None:
    from lorafleet.edge_client.data import read_jsonl
    from lorafleet.edge_client.trainer import train_local
    from lorafleet.export.formats.adapter import for_base_model, read_adapter, write_adapter
    from lorafleet.export.formats.errors import LorafleetError
    from lorafleet.export.formats.package import open_package

    if out.exists():
        raise LorafleetError(f"output {out} already exists")
    pkg = open_package(package, ranks=[rank])
    pkg.manifest.rank(rank)
    dataset = read_jsonl(data, skip_invalid=skip_invalid)
    initial = read_adapter(adapter) if adapter is not None else None
    every = max(1, steps // 20)  # at most ~20 progress lines, and always the last step

    def progress(step: int, loss: float, seconds: float) -> None:
        if step == 1:  # after the first step: bad input before it stays a one-line error
            say(f"training rank {rank} of {package} on {backend.value}: {len(dataset.examples)} examples, "
                f"{steps} steps", quiet=quiet or as_json)
        if step % every == 0 or step == steps:
            say(f"step {step}/{steps}: loss {loss:.4f} ({seconds:.2f} s)", quiet=quiet or as_json)

    result = train_local(pkg, rank, backend.value, dataset.examples, initial_adapter=initial, steps=steps,
                         batch_size=batch_size, lr=lr, seed=seed, self_prune=self_prune, on_step=progress)
    write_adapter(for_base_model(result.adapter, pkg.manifest.model.spec), out)
    if dataset.skipped:
        say(f"skipped {dataset.skipped} malformed lines of {data} (lines {dataset.skipped_lines[:10]})")
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    typer.echo(f"trained rank {result.trained_rank} on {result.backend}: {len(result.losses)} steps, loss "
               f"{result.losses[0]:.4f} → {result.losses[-1]:.4f}, {result.step_seconds:.3f} s/step, peak RSS "
               f"{result.peak_rss_bytes / 2**20:.0f} MiB, {result.num_examples} examples")
    if result.prune is not None:
        typer.echo(f"self-pruning: {result.prune.reason}")
    typer.echo(f"adapter (rank {result.rank}) written to {out}")


def register(app: typer.Typer) -> None:
    app.command("train", epilog=examples(
        "lorafleet train --package pkg --rank 8 --backend onnxruntime --data data.jsonl --steps 50 --seed 0 "
        "--out adapter-r8",
    ))(train)
