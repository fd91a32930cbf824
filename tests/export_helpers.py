"""Helpers for the export tests: small fixed batches, eager references, and hand-built packages.

``fake_package`` lays out a package with placeholder program files through the real writer, so the
manifest and ``open_package`` can be tested in milliseconds without compiling anything.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorafleet.export.formats.adapter import Adapter, LoraPair, peft_config, write_adapter
from lorafleet.export.formats.manifest import Estimates, ModelSection
from lorafleet.export.formats.package import PackageSpec, RankRecord, write_package

TINY_SHAPES = {"q_proj": [64, 64], "v_proj": [32, 64]}


def tiny_model_section() -> ModelSection:
    return ModelSection(spec="random:tiny", architecture="LlamaForCausalLM", model_type="llama", num_layers=2,
                        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                        vocab_size=272, num_parameters=123456, module_shapes=TINY_SHAPES)


def random_adapter(r: int, *, lora_alpha: float = 16.0, seed: int = 0, layers: int = 2,
                   shapes: dict[str, list[int]] | None = None) -> Adapter:
    """A rank-``r`` adapter with nonzero A and B on q_proj/v_proj of a ``layers``-layer model."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for layer in range(layers):
        for name, (out, inp) in (shapes or TINY_SHAPES).items():
            mods[f"model.layers.{layer}.self_attn.{name}"] = LoraPair(
                torch.randn(r, inp, generator=g) * 0.1, torch.randn(out, r, generator=g) * 0.1, lora_alpha / r)
    return Adapter(mods, peft_config(sorted(shapes or TINY_SHAPES), r, lora_alpha))


def fake_package(out: Path, ranks: tuple[int, ...] = (2, 4), runtimes: tuple[str, ...] = ("executorch", "onnx"),
                 overwrite: bool = False) -> Path:
    """A structurally valid package whose programs are placeholder bytes (for format tests only)."""
    spec = PackageSpec(model=tiny_model_section(), target_modules=["q_proj", "v_proj"], lora_alpha=16.0,
                       seq_len=8, batch_size=1, runtimes=list(runtimes))
    with write_package(out, overwrite=overwrite) as w:
        if "executorch" in runtimes:
            w.foundation("executorch").write_bytes(b"frozen weights" * 10)
        if "onnx" in runtimes:
            w.foundation("onnx").write_bytes(b"onnx frozen weights" * 10)
        records = []
        for r in ranks:
            write_adapter(random_adapter(r), w.path(r, "adapter"))
            if "executorch" in runtimes:
                w.path(r, "executorch_inference").write_bytes(b"pte inference %d" % r)
                w.path(r, "executorch_training").write_bytes(b"pte training %d" % r)
            if "onnx" in runtimes:
                d = w.path(r, "onnx_training")
                d.mkdir()
                for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint"):
                    (d / name).write_bytes(f"{name} {r}".encode())
            records.append(RankRecord(r, 4 * r * (64 + 64 + 64 + 32), Estimates(1000 * r, 2000 * r, {"weights": 1})))
        w.finish(spec, records, {"passed": True, "checks": []})
    return out
