"""The runtime-specific stages of the export pipeline (:mod:`export.pipeline`): compile one rank for a
runtime and verify what was compiled against the eager PEFT model.

Verification follows :mod:`export.verify`: the shipped initial LoRA weights are read back from each program
(exactly), then a probe adapter with nonzero ``lora_A`` and ``lora_B`` is loaded through the runtime's own
set-weights path and the program's logits / loss / LoRA gradients are compared with eager PEFT holding the
same probe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from export.lora import LoraSpec, load_lora
from export.verify import (
    Check,
    StepResult,
    compare_adapters,
    compare_logits,
    compare_modules,
    compare_step,
    eager_logits,
    eager_step,
    probe_adapter,
)

if TYPE_CHECKING:
    from export.pipeline import RankContext


def export_onnx_rank(ctx: RankContext, peft_model: Any, loss_module: Any, spec: LoraSpec) -> list[Check]:
    """Write rank ``spec.r``'s ORT training artifacts and verify one training step against eager."""
    from export.onnx_training import OnnxTrainer, export_onnx_training

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
    loss, grads = trainer.gradients(*ctx.batch)
    want = eager_step(peft_model, loss_module, ctx.batch)
    checks += compare_step(spec.r, "onnx_training", StepResult(loss, grads), want)
    load_lora(peft_model, spec, initial)
    return checks


def lower_executorch_rank(ctx: RankContext, peft_model: Any, spec: LoraSpec) -> None:
    """Lower rank ``spec.r``'s inference and training programs, each in a forked child process
    (:mod:`export.forked`); their frozen weights join the shared store from the data files the children wrote."""
    from export.executorch import lower_inference, lower_training
    from export.forked import run_forked

    assert ctx.et_store is not None and ctx.et_parts is not None
    for kind, lower, args in (("executorch_inference", lower_inference, (ctx.cfg.seq_len,)),
                              ("executorch_training", lower_training, (ctx.cfg.batch_size, ctx.cfg.seq_len, None))):
        pte, data = ctx.writer.path(spec.r, kind), ctx.et_parts / f"rank-{spec.r}-{kind}.ptd"

        def lower_to_files(lower: Any = lower, args: tuple[Any, ...] = args, pte: Any = pte,
                           data: Any = data) -> None:
            lower(peft_model, *args, data_path=data).write(pte)

        ctx.timed("lower_executorch", run_forked, lower_to_files, f"rank {spec.r}: lowering the {kind} program")
        if data.exists():
            ctx.et_store.add_file(data)


def verify_executorch_rank(ctx: RankContext, peft_model: Any, spec: LoraSpec) -> list[Check]:
    """Load rank ``spec.r``'s programs with the written foundation and compare them with eager PEFT."""
    from export.executorch import load_inference, load_training
    from export.executorch.wrappers import CausalLMLoss as EtLoss

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
    grads = _by_module(got.gradients)
    want = eager_step(peft_model, _first(EtLoss(peft_model)), ctx.batch)
    checks += compare_step(r, "executorch_training", StepResult(got.loss, grads), want)
    load_lora(peft_model, spec, initial)
    return checks


def _modules(names: Any) -> set[str]:
    """The modules a set of LoRA parameter names (PEFT's, with or without the adapter name) belong to."""
    from export.adapter import PEFT_PREFIX

    return {name.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for name in names}


def _by_module(gradients: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """PEFT keys (``base_model.model.<module>.lora_A.weight``) → ``{module: (dA, dB)}``."""
    from export.adapter import PEFT_PREFIX

    out: dict[str, dict[str, Any]] = {}
    for key, g in gradients.items():
        module, which = key.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)
        out.setdefault(module, {})[which.split(".")[0]] = g
    return {m: (h["A"], h["B"]) for m, h in out.items()}


def _first(loss_module: Any) -> Any:
    """ExecuTorch's loss wrapper returns ``(loss,)``; the eager oracle wants the loss."""
    return lambda *batch: loss_module(*batch)[0]
