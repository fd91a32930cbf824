"""The ``lorafleet`` command line: parses, calls the library, prints.

Every subcommand lives in its own module under :mod:`lorafleet.commands` and registers itself on the app. Known errors
(:class:`lorafleet.export.formats.errors.LorafleetError`, and OS errors on user-given paths) become one line on stderr
and a non-zero exit; ``LORAFLEET_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from lorafleet.commands import COMMAND_MODULES
from lorafleet.export.formats.errors import LorafleetError

app = typer.Typer(
    name="lorafleet",
    help="Federated LoRA fine-tuning for on-device language models.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every subcommand's context
)


def _print_version(value: bool) -> None:
    if value:
        from lorafleet import __version__

        typer.echo(f"lorafleet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    pass


for _module in COMMAND_MODULES:
    _module.register(app)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point. Returns the exit code."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # libgomp's default busy-wait makes small matmuls crawl when several processes share few cores
    # (docs/BENCHMARKS.md, "OpenMP spin-waiting").
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # torchao (imported by transformers) warns on every start about its CUDA kernels and pytree enums.
    for name in ("torch.utils._pytree", "torchao"):
        logging.getLogger(name).setLevel(logging.ERROR)
    debug = os.environ.get("LORAFLEET_DEBUG", "") not in ("", "0")
    try:
        app(args=argv, prog_name="lorafleet")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except LorafleetError as exc:
        if debug:
            raise
        _fail(str(exc))
        return exc.exit_code
    except OSError as exc:
        if debug or exc.filename is None:
            raise
        _fail(f"{exc.strerror or exc}: {exc.filename}")
        return 1
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    return 0


def _fail(message: str) -> None:
    line = " ".join(message.split())  # one line, always
    print(f"lorafleet: error: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
