"""The runtime-specific stages of the export pipeline (:mod:`lorafleet.export.compiler.pipeline`): compile one rank for
a runtime and verify what was compiled against the eager PEFT model.

Verification follows :mod:`lorafleet.export.compiler.verify`: the shipped initial LoRA weights are read back from each
program (exactly), then a probe adapter with nonzero ``lora_A`` and ``lora_B`` is loaded through the runtime's own
set-weights path and the program's logits / loss / LoRA gradients are compared with eager PEFT holding the same probe.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.export.compiler.lora import load_lora
from lorafleet.export.compiler.verify import (
    Check,
    compare_adapters,
    compare_logits,
    compare_modules,
    compare_step,
    eager_logits,
    eager_step,
    probe_adapter,
)
from lorafleet.export.formats.adapter import Adapter
from lorafleet.export.formats.package import PackageWriter
from lorafleet.export.formats.program import LoraSpec

Log = Callable[[str], None]


@dataclass
class RankContext:
    """What the per-rank stages share during one export (the pipeline builds it once)."""

    writer: PackageWriter
    batch: tuple[Any, Any]  # (input_ids, labels), int64 (B, T): the verification batch, and the programs' shape
    seconds: dict[str, float]
    log: Log
    onnx_shared: Any | None = None  # lorafleet.export.compiler.onnx.graph.SharedExternalData
    et_store: Any | None = None  # lorafleet.export.compiler.executorch.FoundationStore
    et_parts: Path | None = None  # each program's data file until the shared one is written (same filesystem)
    initial: dict[int, Adapter] = field(default_factory=dict)  # each rank's packaged LoRA weights
    modules: frozenset[str] = frozenset()  # the requested modules, from the base model (lora.target_shapes)

    @property
    def shape(self) -> tuple[int, int]:
        """``(batch_size, seq_len)`` of the programs being compiled."""
        b, t = self.batch[0].shape
        return int(b), int(t)

    def timed(self, stage: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
        return out


def export_onnx_rank(ctx: RankContext, peft_model: Any, loss_module: Any, spec: LoraSpec) -> list[Check]:
    """Write rank ``spec.r``'s ORT training artifacts and verify one training step against eager."""
    from lorafleet.export.compiler.onnx.artifacts import export_onnx_training
    from lorafleet.export.runtime.onnx import OnnxTrainer

    out = ctx.writer.path(spec.r, "onnx_training")
    ctx.timed("export_onnx", export_onnx_training, loss_module, ctx.batch, out, ctx.onnx_shared, spec)
    return ctx.timed("verify", _verify_onnx, ctx, peft_model, loss_module, spec, OnnxTrainer)


def _verify_onnx(ctx: RankContext, peft_model: Any, loss_module: Any, spec: LoraSpec,
                 trainer_cls: Any) -> list[Check]:
    initial = ctx.initial[spec.r]
    trainer = trainer_cls(ctx.writer.path(spec.r, "onnx_training"), spec, input_shape=tuple(ctx.batch[0].shape))
    checks = compare_modules(spec.r, "onnx_training", trainer.names, ctx.modules)
    checks += compare_adapters(spec.r, "onnx_training", trainer.get_lora(), initial)
    probe = probe_adapter(initial, spec)
    load_lora(peft_model, spec, probe)
    trainer.set_lora(probe)
    got = trainer.gradients(*ctx.batch)
    want = eager_step(peft_model, loss_module, ctx.batch)
    checks += compare_step(spec.r, "onnx_training", got, want)
    load_lora(peft_model, spec, initial)
    return checks


def lower_executorch_rank(ctx: RankContext, peft_model: Any, spec: LoraSpec) -> None:
    """Lower rank ``spec.r``'s inference and training programs, each in a forked child process
    (:mod:`lorafleet.export.compiler.forked`); their frozen weights join the shared store from the data files the
    children wrote."""
    from lorafleet.export.compiler.executorch import lower_inference, lower_training
    from lorafleet.export.compiler.forked import run_forked

    assert ctx.et_store is not None and ctx.et_parts is not None
    batch_size, seq_len = ctx.shape
    for kind, lower, args in (("executorch_inference", lower_inference, (seq_len,)),
                              ("executorch_training", lower_training, (batch_size, seq_len, None))):
        pte, data = ctx.writer.path(spec.r, kind), ctx.et_parts / f"rank-{spec.r}-{kind}.ptd"

        def lower_to_files(lower: Any = lower, args: tuple[Any, ...] = args, pte: Any = pte,
                           data: Any = data) -> None:
            lower(peft_model, *args, data_path=data).write(pte)

        ctx.timed("lower_executorch", run_forked, lower_to_files, f"rank {spec.r}: lowering the {kind} program")
        if data.exists():
            ctx.et_store.add_file(data)


def verify_executorch_rank(ctx: RankContext, peft_model: Any, spec: LoraSpec) -> list[Check]:
    """Load rank ``spec.r``'s programs with the written foundation and compare them with eager PEFT."""
    from lorafleet.export.compiler.executorch import load_inference, load_training
    from lorafleet.export.compiler.loss import CausalLMLoss

    r, initial = spec.r, ctx.initial[spec.r]
    foundation = ctx.writer.foundation("executorch")
    ids, labels = ctx.batch
    inference = load_inference(ctx.writer.path(r, "executorch_inference"), foundation)
    checks = compare_modules(r, "executorch_inference", _modules(inference.lora.names), ctx.modules)
    checks += compare_adapters(r, "executorch_inference", inference.adapter(), initial)
    checks += compare_logits(r, "executorch_inference", inference.logits(ids[:1]), eager_logits(peft_model, ids[:1]))
    probe = probe_adapter(initial, spec)
    load_lora(peft_model, spec, probe)
    inference.set_adapter(probe)
    checks += compare_logits(r, "executorch_inference", inference.logits(ids[:1]), eager_logits(peft_model, ids[:1]),
                             metric="probe_logits_max_abs_diff")
    del inference
    training = load_training(ctx.writer.path(r, "executorch_training"), foundation)
    checks += compare_modules(r, "executorch_training", _modules(training.parameters()), ctx.modules)
    checks += compare_adapters(r, "executorch_training", training.adapter(), initial)
    training.set_adapter(probe)
    got = training.step(ids, labels)
    want = eager_step(peft_model, CausalLMLoss(peft_model), ctx.batch)
    checks += compare_step(r, "executorch_training", got, want)
    load_lora(peft_model, spec, initial)
    return checks


def _modules(names: Any) -> set[str]:
    """The modules a set of LoRA parameter names (PEFT's, with or without the adapter name) belong to."""
    from lorafleet.export.formats.adapter import PEFT_PREFIX

    return {name.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for name in names}
