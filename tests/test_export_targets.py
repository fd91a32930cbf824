"""`--target-modules`: a package trains LoRA on exactly the requested modules of every layer, on both runtimes.

The oracle is independent of the exporter: the expected module names are spelled out from the architecture
(2 layers of random:tiny × the requested projections), and each artifact's trainable tensors are read from
the artifact itself — the packaged adapter, ONNX Runtime's checkpoint (its trainable parameters) and the
ExecuTorch training program's parameters.
"""

from __future__ import annotations

import re

import pytest

from lorafleet.export.compiler.pipeline import ExportConfig, run_export
from lorafleet.export.formats.package import open_package

pytestmark = pytest.mark.slow

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LAYERS = 2  # random:tiny
MODULE = re.compile(r"(model\.layers\.\d+\.(?:self_attn|mlp)\.\w+)\.lora_[AB]\b")  # inside any wrapper prefix


def expected(targets: tuple[str, ...]) -> set[str]:
    return {f"model.layers.{i}.{'self_attn' if t in ATTENTION else 'mlp'}.{t}" for i in range(LAYERS) for t in targets}


def trained_modules(pkg_path, rank: int) -> dict[str, set[str]]:
    """Each artifact's trainable LoRA modules, read from the artifact."""
    from lorafleet.export.compiler.executorch import load_training
    from lorafleet.export.runtime.onnx import OnnxTrainer

    pkg = open_package(pkg_path)
    onnx = OnnxTrainer.from_package(pkg, rank)
    et = load_training(pkg.path_of(rank, "executorch_training"), pkg.foundation("executorch"))
    return {
        "adapter": set(pkg.initial_adapter(rank).modules),
        "onnx": {_module(name) for name, p in onnx._state.parameters if p.requires_grad},
        "executorch": {_module(k) for k in et.parameters()},
    }


def _module(name: str) -> str:
    found = MODULE.search(name)
    assert found is not None, f"not a LoRA parameter of a decoder layer: {name}"
    return found[1]


@pytest.mark.parametrize("targets", [(t,) for t in ATTENTION + MLP] + [ATTENTION + MLP])
def test_the_package_trains_exactly_the_requested_modules(tmp_path, targets):
    out = tmp_path / "pkg"
    result = run_export(ExportConfig(model="random:tiny", ranks=(2,), target_modules=targets, out=out,
                                     seq_len=8, runtimes=("executorch", "onnx")))
    want = expected(targets)
    assert sorted(result.manifest.target_modules) == sorted(targets)
    got = trained_modules(out, 2)
    assert got == {"adapter": want, "onnx": want, "executorch": want}
    checks = [c for c in result.manifest.verification["checks"] if c["metric"] == "lora_modules_mismatch"]
    assert {c["artifact"] for c in checks} == {"adapter", "onnx_training", "executorch_inference",
                                               "executorch_training"}
    assert all(c["passed"] for c in result.manifest.verification["checks"])
