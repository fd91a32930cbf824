"""What a device's ONNX Runtime holds while a package's training artifacts train, measured at export.

ExecuTorch stores its memory plan in the program, so its prediction is read from the file
(:mod:`lorafleet.export.compiler.executorch.memory`). ONNX Runtime stores none: it optimizes the training graph when
a session opens and plans and allocates its buffers on the first steps, so what it holds comes from running it. A
reading of the plan from what ran undercounts (``bench/ort_liveness.py``: the liveness of every kernel output in
ORT's execution order, sizes from ORT's profiler, views aliased): for an int4 SmolLM2-135M rank-16 step at 1 × 64
it gives 223 MB with the foundation, LoRA tensors and graphs, where ORT's allocations counted exactly reach 342 MB
and 503 MB with lorafleet's session options (docs/BENCHMARKS.md "ONNX Runtime: measured at export").

So export measures it, in a fresh process per rank that does what a device app does: import the runtime (the
baseline), open the rank's training session and AdamW optimizer with lorafleet's session options, train
:data:`STEPS` steps on ids of the compiled shape. Terms, each above the one before::

    loaded    resident memory once the session and optimizer are open, above the baseline: the graphs, the
              LoRA tensors, the session's own structures and the foundation tensors ORT read at load (an fp32
              foundation is mapped, and its pages count where the step first touches them)
    step      the peak while training, above ``loaded``: activations, a quantized base's dequantized
              working set, gradients, AdamW's moments, the CPU arena and, from the second step, the memory
              pattern ORT allocates from the first step's plan (why two steps are measured)

No interpreter, library or model is in the figure: the baseline is taken after importing ONNX Runtime (whose
Python package imports torch for its training extensions) and before the session opens. The allocator is the
host's (glibc here; a phone's is another), so this is the host's figure of the device's runtime; the token values
do not matter (sizes depend only on the compiled shapes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lorafleet.export.formats.errors import PackageError

TERMS = ("loaded", "step")
STEPS = 3  # ORT allocates its memory pattern on the second run; the third shows it stays
TIMEOUT_SECONDS = 1800.0


def program_memory(artifact_dir: str | Path, input_shape: tuple[int, int], *,
                   timeout: float = TIMEOUT_SECONDS) -> dict[str, int]:
    """The device-memory terms (bytes, :data:`TERMS`) of one rank's ORT training artifacts at ``input_shape``
    (batch, seq_len), measured in a fresh process."""
    art = Path(artifact_dir)
    batch, seq = input_shape
    cmd = [sys.executable, "-m", "lorafleet.export.compiler.onnx.memory", str(art), str(batch), str(seq)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise PackageError(f"{art}: measuring ONNX Runtime's training step took over {timeout:.0f} s") from exc
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        raise PackageError(f"{art}: ONNX Runtime's training step could not be measured: "
                           f"{lines[-1] if lines else f'exit code {done.returncode}'}")
    return {k: int(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def _measure_here(artifact_dir: str, batch: int, seq: int) -> dict[str, int]:
    """The child's side (see the module docstring)."""
    import numpy as np
    import onnxruntime  # noqa: F401  (the runtime's libraries are in the baseline, as on a device)
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    from lorafleet.export.runtime.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
    from lorafleet.export.runtime.onnx import quiet_onnxruntime, session_options

    quiet_onnxruntime()
    art = Path(artifact_dir)
    for name in ("checkpoint", "training_model.onnx", "optimizer_model.onnx"):
        if not (art / name).is_file():
            raise PackageError(f"{art} has no {name}")
    ids = np.zeros((batch, seq), dtype=np.int64)
    baseline = current_rss_bytes()
    reset_peak_rss()
    state = CheckpointState.load_checkpoint(str(art / "checkpoint"))
    module = Module(str(art / "training_model.onnx"), state, None, session_options=session_options())
    optimizer = Optimizer(str(art / "optimizer_model.onnx"), module)
    loaded = max(peak_rss_bytes(), current_rss_bytes()) - baseline
    module.train()
    for _ in range(STEPS):
        module(ids, ids.copy())
        optimizer.step()
        module.lazy_reset_grad()
    peak = peak_rss_bytes() - baseline
    return {"loaded": loaded, "step": max(0, peak - loaded)}


if __name__ == "__main__":
    try:
        print(json.dumps(_measure_here(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
    except Exception as exc:  # one line for the parent's error
        print(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        sys.exit(1)
