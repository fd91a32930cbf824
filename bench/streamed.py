"""What loading a quantized base costs in memory: streamed from its checkpoint against fp32-then-quantize.

    .venv/bin/python bench/streamed.py save-random random:llama-3.2-1b /tmp/hf1b      # the same weights as a
                                                                                    # sharded HF directory
    .venv/bin/python bench/streamed.py load /tmp/hf1b --quantize int4 --json docs/bench/streamed.jsonl
    .venv/bin/python bench/streamed.py load /tmp/hf1b --quantize int4 --whole --json docs/bench/streamed.jsonl

``load`` runs in a fresh child process: the libraries and the model's code are imported first (the
baseline), then the model is loaded quantized — streamed (``load_model(..., quantization=q)``: one fp32 tensor
at a time) or, with ``--whole``, the path every quantized export took before: the fp32 model loaded whole, then
quantized in place. The row has the peak resident memory above the baseline (``VmHWM``), the wall time, the
quantized model's stored bytes and the fp32 bytes it stands for. ``MALLOC_MMAP_THRESHOLD_=65536`` is set in the
child (each block of 64 KiB or more its own mapping, returned when freed), so the peak counts live memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, sys, time
import torch, torchao.quantization.quant_primitives  # noqa: F401
from lorafleet.export.compiler import models, quantize, streamed  # noqa: F401
from lorafleet.export.formats.quantization import Quantization
from lorafleet.export.runtime.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
spec, scheme, whole = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
q = Quantization.parse(scheme)
models.meta_model(spec)
reset_peak_rss()
before, t0 = current_rss_bytes(), time.perf_counter()
if whole:
    lm = models.load_model(spec, with_tokenizer=False)
    summary = quantize.quantize_model(lm.model, q)
else:
    lm = models.load_model(spec, with_tokenizer=False, quantization=q)
    summary = lm.quantization
seconds = time.perf_counter() - t0
print(json.dumps({"peak_above_start_mb": round((peak_rss_bytes() - before) / 1e6, 1),
                  "held_after_mb": round((current_rss_bytes() - before) / 1e6, 1), "load_s": round(seconds, 1),
                  "streamed": lm.streamed, "stored_mb": round(summary.stored_bytes / 1e6, 1),
                  "fp32_mb": round(4 * lm.info.num_parameters / 1e6, 1),
                  "largest_fp32_tensor_mb": round(4 * max([lm.info.vocab_size * lm.info.hidden_size, *(
                      h * w for h, w in lm.info.module_shapes.values())]) / 1e6, 1)}))
"""


def load(args: argparse.Namespace) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": "."}
    proc = subprocess.run([sys.executable, "-c", CHILD, args.model, args.quantize, "1" if args.whole else "0"],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()
        raise SystemExit(f"load failed: {tail[-1] if tail else proc.returncode}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"kind": "load", "model": Path(args.model).name if os.sep in args.model else args.model,
            "quantize": args.quantize, "path": "fp32 whole, then quantized" if args.whole else "streamed", **row,
            "load_avg_1m": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def save_random(args: argparse.Namespace) -> dict:
    from lorafleet.export.compiler.models import load_model

    model = load_model(args.model, with_tokenizer=False).model
    model.save_pretrained(args.out, max_shard_size="1GB")
    return {"kind": "save-random", "model": args.model, "shards": len(list(Path(args.out).glob("*.safetensors")))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save-random", help="write random:<arch>'s in-memory weights as a sharded HF directory")
    s.add_argument("model")
    s.add_argument("out")
    m = sub.add_parser("load", help="peak memory of loading a quantized base")
    m.add_argument("model")
    m.add_argument("--quantize", default="int4")
    m.add_argument("--whole", action="store_true", help="load the fp32 model whole, then quantize (the old path)")
    m.add_argument("--json", help="append the row to this JSON-lines file")
    args = ap.parse_args()
    row = save_random(args) if args.cmd == "save-random" else load(args)
    print(json.dumps(row))
    if getattr(args, "json", None):
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
