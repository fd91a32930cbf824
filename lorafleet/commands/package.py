"""`lorafleet package inspect|verify`: what an edge package holds, and whether it is intact.

    lorafleet package inspect PKG [--json]
    lorafleet package verify PKG

``inspect`` reads and validates the manifest only (its own digest included) and summarizes it: the model, the
LoRA settings, the runtimes, the training shape, each rank's size and cost estimates, and the checks the export
ran against eager PEFT. ``verify`` opens the package as a device does
(:func:`lorafleet.export.formats.package.open_package` with ``verify=True``): every listed file's size and
sha256, and each rank's adapter against the manifest. It prints ``OK`` or the one-line error (exit 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lorafleet.commands.cache import human_size
from lorafleet.commands.options import examples

if TYPE_CHECKING:
    from lorafleet.export.formats.manifest import Manifest

package_app = typer.Typer(name="package", help="Inspect and verify edge packages.", no_args_is_help=True)

PackageArg = Annotated[Path, typer.Argument(metavar="PKG", help="Edge package directory.")]


@package_app.command("inspect", epilog=examples("lorafleet package inspect pkg",
                                                "lorafleet package inspect pkg --json"))
def inspect(
    package: PackageArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a summary.")] = False,
) -> None:
    """Summarize an edge package's manifest: model, ranks, runtimes, sizes, estimates, verification."""
    from lorafleet.export.formats.package import open_package

    pkg = open_package(package, verify=False)  # the manifest is parsed and validated; files are not hashed
    summary = summarize(pkg.manifest, pkg.path)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_summary(summary)


@package_app.command("verify", epilog=examples("lorafleet package verify pkg"))
def verify(package: PackageArg) -> None:
    """Check every file of an edge package against its manifest (size, sha256, adapters); OK or the error."""
    from lorafleet.export.formats.errors import PackageError
    from lorafleet.export.formats.package import open_package

    pkg = open_package(package, verify=True)
    m = pkg.manifest
    if m.verification.get("passed") is not True:
        raise PackageError(f"{package}: the manifest does not record a passed verification against eager PEFT")
    files = m.all_files()
    typer.echo(f"OK: {package}: {len(files)} files, {human_size(sum(e.size for e in files.values()))}, ranks "
               f"{','.join(map(str, m.ranks))}, runtimes {','.join(m.runtimes)}")


def summarize(m: Manifest, path: Path) -> dict[str, Any]:
    """The manifest's summary (what ``inspect --json`` prints)."""
    ranks = []
    for r in m.ranks:
        art = m.rank(r)
        ranks.append({
            "r": r, "trainable_parameters": art.trainable_parameters, "size_bytes": art.size_bytes,
            "training_peak_memory_bytes": art.estimates.training_peak_memory_bytes,
            "flops_per_step": art.estimates.flops_per_step,
            "memory_breakdown": dict(art.estimates.memory_breakdown),
            "device_memory": {rt: {**terms, "total": sum(terms.values())}
                              for rt, terms in art.estimates.device_memory.items()},
            "artifacts": {kind: getattr(art, kind) for kind in ("executorch_inference", "executorch_training",
                                                                 "onnx_training", "adapter")
                          if getattr(art, kind) is not None},
        })
    model = m.model
    return {
        "path": str(path), "format_version": m.format_version, "created_by": m.created_by,
        "model": {"spec": model.spec, "architecture": model.architecture, "model_type": model.model_type,
                  "num_layers": model.num_layers, "hidden_size": model.hidden_size, "vocab_size": model.vocab_size,
                  "num_parameters": model.num_parameters},
        "target_modules": list(m.target_modules), "lora_alpha": m.lora_alpha, "use_rslora": m.use_rslora,
        "runtimes": list(m.runtimes), "quantize": m.quantize, "seq_len": m.seq_len, "batch_size": m.batch_size,
        "ranks": ranks,
        "shared_files": {rel: e.size for rel, e in sorted(m.shared_files.items())},
        "size_bytes": sum(e.size for e in m.all_files().values()),
        "verification": _verification(m.verification),
    }


def _verification(v: dict[str, Any]) -> dict[str, Any]:
    """``passed``, the number of checks (and of failed ones) and, per metric, the worst value and its limit."""
    checks = [c for c in v.get("checks", []) if isinstance(c, dict)] if isinstance(v.get("checks"), list) else []
    value_of: dict[str, float] = {}
    limit_of: dict[str, float | None] = {}
    for c in checks:
        metric, value, limit = c.get("metric"), c.get("value"), c.get("limit")
        if not isinstance(metric, str) or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        if metric not in value_of or value > value_of[metric]:
            value_of[metric] = float(value)
            limit_of[metric] = float(limit) if isinstance(limit, int | float) and not isinstance(limit, bool) else None
    worst = {k: {"value": value_of[k], "limit": limit_of[k]} for k in value_of}
    return {"passed": v.get("passed") is True, "checks": len(checks),
            "failed": sum(1 for c in checks if c.get("passed") is not True), "worst": worst}


def _print_summary(s: dict[str, Any]) -> None:
    from rich.table import Table

    from lorafleet.commands.output import console as make_console

    console = make_console(highlight=False)
    model = s["model"]
    console.print(f"edge package {s['path']} (format {s['format_version']}, {s['created_by']})")
    console.print(f"model: {model['spec']} ({model['architecture']}, {model['num_layers']} layers, hidden "
                  f"{model['hidden_size']}, vocab {model['vocab_size']}, {model['num_parameters']:,} parameters)")
    console.print(f"LoRA: target modules {','.join(s['target_modules'])}, lora_alpha {s['lora_alpha']:g}"
                  f"{', rsLoRA' if s['use_rslora'] else ''}")
    console.print(f"runtimes: {','.join(s['runtimes'])} (quantize {s['quantize']}); training shape: batch size "
                  f"{s['batch_size']} x seq_len {s['seq_len']}")
    table = Table()
    device = sorted({rt for r in s["ranks"] for rt in r["device_memory"]})
    for col in ("rank", "trainable", "own files", "est. train peak", *(f"{rt} device est." for rt in device),
                "est. GFLOP/step"):
        table.add_column(col, justify="right")
    for r in s["ranks"]:
        table.add_row(str(r["r"]), f"{r['trainable_parameters']:,}", human_size(r["size_bytes"]),
                      human_size(r["training_peak_memory_bytes"]),
                      *(human_size(r["device_memory"][rt]["total"]) if rt in r["device_memory"] else "-"
                        for rt in device),
                      f"{r['flops_per_step'] / 1e9:.2f}")
    console.print(table)
    for rel, size in s["shared_files"].items():
        console.print(f"shared: {rel} {human_size(size)}")
    console.print(f"total: {human_size(s['size_bytes'])}")
    v = s["verification"]
    status = "passed" if v["passed"] and not v["failed"] else "NOT passed"
    worst = ", ".join(f"{k} {w['value']:.2g}" + (f" (limit {w['limit']:.2g})" if w["limit"] is not None else "")
                      for k, w in v["worst"].items())
    console.print(f"verification against eager PEFT: {status}, {v['checks']} checks"
                  + (f", {v['failed']} failed" if v["failed"] else "") + (f"; worst: {worst}" if worst else ""))
    console.print(f"files not hashed here: lorafleet package verify {s['path']}")


def register(app: typer.Typer) -> None:
    app.add_typer(package_app, name="package")
