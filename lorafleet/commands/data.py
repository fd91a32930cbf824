"""`lorafleet data`: write the built-in task suite as a JSONL file that `lorafleet train --data` reads.

    lorafleet data --out FILE.jsonl [--split seen|heldout|all] [--families a,b] [--examples N] [--seed S]

Each line is ``{"instruction", "input", "output", "family"}`` (:func:`lorafleet.edge_client.data.read_jsonl`
reads the first three and ignores ``family``). The families take turns line by line, so any prefix of the file
(``head -n 100``) is balanced across them. The same options always give the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorafleet.commands.options import NAMES, examples

SPLIT_CHOICES = ("seen", "heldout", "all")


def data(
    out: Annotated[Path, typer.Option("--out", metavar="FILE.jsonl", help="The JSONL file to create (new).")],
    split: Annotated[str, typer.Option("--split", metavar="seen|heldout|all",
                                       help="Families trained on (seen), only evaluated (heldout), or all.")] = "seen",
    families: Annotated[Any, typer.Option("--families", click_type=NAMES, metavar="A,B",
                                          help="Only these families of the split (default: all of it).")] = None,
    examples: Annotated[int, typer.Option("--examples", metavar="N", help="Examples per family.")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generated examples.")] = 0,
) -> None:
    """Write the built-in instruction tasks as JSONL training data (for train, fleet --data, client)."""
    from lorafleet import tasks
    from lorafleet.export.formats.errors import ConfigError

    if split not in SPLIT_CHOICES:
        raise ConfigError(f"--split must be one of {', '.join(SPLIT_CHOICES)}, got {split!r}")
    if examples < 1:
        raise ConfigError(f"--examples must be a positive integer, got {examples}")
    if out.exists() or out.is_symlink():
        raise ConfigError(f"--out {out} already exists; remove it or choose another file")
    in_split = {"seen": tasks.families("seen"), "heldout": tasks.families("heldout"), "all": tasks.families()}[split]
    names = list(families) if families else in_split
    for name in names:
        fam = tasks.family(name)  # unknown: ConfigError naming the known families
        if name not in in_split:
            raise ConfigError(f"--families: {name!r} is a {fam.split} family, not in --split {split} "
                              f"(pass --split {fam.split} or all)")
    if len(set(names)) != len(names):
        raise ConfigError(f"--families names a family twice: {','.join(names)}")
    lines = _interleaved({name: tasks.generate(name, examples, seed=seed, stream="train") for name in names})
    _write_new(out, "".join(line + "\n" for line in lines))
    which = "both splits" if split == "all" else f"the {split} split"
    typer.echo(f"wrote {len(lines)} examples ({examples} each of {len(names)} "
               f"famil{'y' if len(names) == 1 else 'ies'} of {which}, seed {seed}) to {out}")


def _interleaved(by_family: dict[str, list[Any]]) -> list[str]:
    """One JSON line per example, the families taking turns (example 0 of each, then example 1, ...)."""
    import json

    rows = []
    longest = max((len(v) for v in by_family.values()), default=0)
    for i in range(longest):
        for name, exs in by_family.items():
            if i < len(exs):
                ex = exs[i]
                rows.append(json.dumps({"instruction": ex.instruction, "input": ex.input, "output": ex.output,
                                        "family": name}, ensure_ascii=False))
    return rows


def _write_new(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling; never replaces a file that appeared meanwhile."""
    import os
    import tempfile

    from lorafleet.export.formats.atomic import rename_noreplace
    from lorafleet.export.formats.errors import ConfigError

    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.tmp-")
    except OSError as exc:
        raise ConfigError(f"--out {path}: cannot write to {parent} ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        rename_noreplace(Path(tmp), path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def batches(
    package: Annotated[Path, typer.Option("--package", help="Edge package: its tokenizer, sequence length and "
                                                            "batch size.")],
    data: Annotated[Path, typer.Option("--data", help="JSONL training data (as `lorafleet train --data`).")],
    steps: Annotated[int, typer.Option("--steps", help="Number of batches.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data order.")],
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="The token-batch file to create (new).")],
    skip_invalid: Annotated[bool, typer.Option(
        "--skip-invalid", help="Skip malformed data lines instead of failing.")] = False,
) -> None:
    """Tokenize training data into the batch file the native trainer reads (`lorafleet-native train --batches`):
    the same batches, in the same order, that `lorafleet train` with these --steps and --seed trains on."""
    from lorafleet.edge_client.backends.native_backend import write_batches
    from lorafleet.edge_client.data import batches as make_batches
    from lorafleet.edge_client.data import encode_all, read_jsonl
    from lorafleet.edge_client.tokenizer import load_tokenizer
    from lorafleet.export.formats.errors import ConfigError
    from lorafleet.export.formats.package import open_package

    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    if out.exists() or out.is_symlink():
        raise ConfigError(f"--out {out} already exists; remove it or choose another file")
    pkg = open_package(package, verify=False)
    m = pkg.manifest
    dataset = read_jsonl(data, skip_invalid=skip_invalid)
    encoded = encode_all(load_tokenizer(m.model.spec), dataset.examples, m.seq_len)
    tmp = out.with_name(out.name + ".partial")
    try:
        n = write_batches(tmp, make_batches(encoded, m.batch_size, steps, seed))
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    typer.echo(f"wrote {n} batches of {m.batch_size} x {m.seq_len} tokens ({len(dataset.examples)} examples) "
               f"to {out}")


def register(app: typer.Typer) -> None:
    app.command("data", epilog=examples(
        "lorafleet data --out data.jsonl --examples 16",
        "lorafleet data --out heldout.jsonl --split heldout",
    ))(data)
    app.command("batches", epilog=examples(
        "lorafleet batches --package pkg --data data.jsonl --steps 20 --seed 0 --out batches.bin",
    ))(batches)
