"""Model families: a 2-layer export of each family lorafleet lists, timed (wall, peak memory) and verified.

    .venv/bin/python bench/families.py [--families gemma2,phi3] [--runtimes onnx,executorch] \
        [--quantize none,int4:16] [--window 4096] [--targets all|default] [--json docs/bench/families.jsonl]

Each family's directory is the one ``tests/test_families.py`` exports (``family_dir``: hidden 64, 2 layers,
4 heads / 2 KV heads, head dim 16, vocab 272, a sharded ``save_pretrained``, the family's own features on),
rank 4, sequence 16, every linear of a layer adapted (``--targets default``: the family's default targets
only). ``--window`` sets the sliding window of the families that have one: the test's 8 cuts the 16-token
sequence; 4096 never cuts. Each (family, runtime, quantization) is one ``lorafleet export`` in its own process,
one after another, measured as ``bench/export.py export`` measures it (wall time, peak PSS and RSS of the
process tree); the row adds the worst of each verification metric from the package's manifest. Rows are
printed and appended as JSON lines to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def run_case(root: Path, model_type: str, runtime: str, quantize: str, window: int | None,
             targets: str) -> dict[str, Any]:
    import test_families

    from export import _worst, bench_export  # bench/export.py (this script's directory is first on sys.path)
    from lorafleet.export.compiler.architectures import FAMILIES, layer_shapes
    from lorafleet.export.formats.package import open_package

    features = dict(test_families.FEATURES.get(model_type, {}))
    if window is not None and "sliding_window" in features:
        features["sliding_window"] = window
    src, model = test_families.family_dir(root / f"{model_type}-{runtime}-{quantize}".replace(":", "_"), model_type,
                                          features=features)
    modules = tuple(layer_shapes(model)) if targets == "all" else FAMILIES[model_type].default_targets
    out = src.parent / "pkg"
    args = argparse.Namespace(model=str(src), ranks="4", target_modules=",".join(modules),
                              seq_len=test_families.SEQ_LEN, batch_size=1, runtimes=runtime, quantize=quantize,
                              out=str(out), limit_gb=8.0)
    row = bench_export(args)
    row.update({"kind": "family", "family": model_type, "model": f"2-layer {model_type}",
                "sliding_window": getattr(model.config, "sliding_window", None), "target_modules": list(modules)})
    if row["returncode"] == 0:
        row["worst"] = _worst(open_package(out, verify=False).manifest.verification["checks"], by_artifact=True)
    return row


def main() -> None:
    from lorafleet.export.compiler.architectures import FAMILIES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(sorted(FAMILIES)))
    ap.add_argument("--runtimes", default="onnx,executorch")
    ap.add_argument("--quantize", default="none", help="comma-separated: none, int8, int4, int4:G")
    ap.add_argument("--window", type=int, default=None, help="sliding window (default: the test's 8)")
    ap.add_argument("--targets", choices=("all", "default"), default="all")
    ap.add_argument("--json", default="docs/bench/families.jsonl")
    args = ap.parse_args()
    unknown = sorted(set(args.families.split(",")) - set(FAMILIES))
    if unknown:
        ap.error(f"unknown families {unknown}; known: {', '.join(sorted(FAMILIES))}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lorafleet-families-") as tmp:
        for model_type in args.families.split(","):
            for quantize in args.quantize.split(","):
                for runtime in args.runtimes.split(","):
                    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
                            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
                    row = run_case(Path(tmp), model_type, runtime, quantize, args.window, args.targets)
                    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
                    with open(args.json, "a") as f:
                        f.write(json.dumps({**meta, **row}) + "\n")
                    print(json.dumps({k: row.get(k) for k in ("family", "runtimes", "quantize", "wall_s",
                                                               "peak_pss_gb", "returncode", "worst", "error")}))


if __name__ == "__main__":
    main()
