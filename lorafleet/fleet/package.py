"""The fleet's edge package: exported once through the export pipeline, cached by what it is built from.

The package lives in ``$LORAFLEET_CACHE/packages/<model>-<key>/``, ``key`` a digest of the model spec (and,
for a local model, its path and modification time), ranks, target modules, ``lora_alpha``, sequence length,
batch size, runtimes and the base's quantization; a later fleet with the same settings opens it instead of
exporting again (it is checked file by file first, and re-exported if it fails the check). The fleet trains
ONNX Runtime's programs (:mod:`lorafleet.fleet` says why), so only the ONNX runtime is compiled.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

from lorafleet.export.formats.errors import PackageError
from lorafleet.export.formats.manifest import FORMAT_VERSION, MANIFEST_FILE

RUNTIMES = ("onnx",)


def package_key(model: str, ranks: tuple[int, ...], target_modules: tuple[str, ...], lora_alpha: float,
                seq_len: int, batch_size: int = 1, runtimes: tuple[str, ...] = RUNTIMES,
                quantize: str = "none") -> str:
    """A digest of everything the package is built from (24 hex digits)."""
    from lorafleet.export.compiler.models import parse_spec
    from lorafleet.export.formats.quantization import Quantization

    spec = parse_spec(model)
    source: dict[str, object] = {"spec": model}
    if spec.path is not None:
        p = Path(spec.path).resolve()
        source.update(path=str(p), mtime_ns=p.stat().st_mtime_ns if p.exists() else 0)
    payload = {"format": FORMAT_VERSION, "source": source, "ranks": sorted(ranks),
               "target_modules": sorted(target_modules), "lora_alpha": float(lora_alpha), "seq_len": seq_len,
               "batch_size": batch_size, "runtimes": sorted(runtimes)}
    q = Quantization.parse(quantize)
    if q.enabled:  # an fp32 package keeps the key it had before quantized bases existed
        payload["quantize"] = str(q)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def package_dir(model: str, key: str) -> Path:
    from lorafleet.export.formats.cache import cache_dir

    slug = re.sub(r"[^A-Za-z0-9.]+", "-", model).strip("-")[-40:] or "model"
    return cache_dir() / "packages" / f"{slug}-{key}"


def fleet_package(model: str, ranks: tuple[int, ...], target_modules: tuple[str, ...], lora_alpha: float,
                  seq_len: int, *, quantize: str = "none",
                  log: Callable[[str], None] = lambda _m: None) -> tuple[Path, bool]:
    """The package's path, exporting it first unless a verified copy is cached; ``(path, was_cached)``."""
    from lorafleet.export.compiler.pipeline import ExportConfig, run_export
    from lorafleet.export.formats.package import open_package

    key = package_key(model, ranks, target_modules, lora_alpha, seq_len, quantize=quantize)
    out = package_dir(model, key)
    if (out / MANIFEST_FILE).is_file():
        try:
            open_package(out)
            return out, True
        except PackageError as exc:
            log(f"cached package {out} failed its check ({exc}); exporting it again")
    cfg = ExportConfig(model=model, ranks=tuple(ranks), target_modules=tuple(target_modules), out=out,
                       lora_alpha=lora_alpha, seq_len=seq_len, batch_size=1, runtimes=RUNTIMES,
                       quantize=quantize, force=out.exists())
    log_file = out.parent / f"{out.name}.export.log"
    log(f"exporting {model} (ranks {', '.join(map(str, sorted(ranks)))}, seq_len {seq_len}, base {quantize}) "
        f"into {out}; "
        f"runtime log: {log_file}")
    from lorafleet.export.compiler.onnx.artifacts import stderr_to

    with stderr_to(log_file):
        run_export(cfg, log=log)
    return out, False
