"""Run lowered programs on a device: load with the foundation file, infer, take training steps, and move LoRA
weights in and out as PEFT adapters — without re-export.

* :class:`InferenceProgram` (``executorch.runtime``): ``logits``; ``set_adapter`` / ``adapter`` call the program's
  ``set_lora`` / ``get_lora`` methods, which write and read the LoRA buffers ``forward`` reads.
* :class:`TrainingProgram` (``executorch.extension.training.TrainingModule``): ``step`` runs forward+backward
  and returns the loss and the LoRA gradients by PEFT name; ``parameters`` are ExecuTorch's own parameter
  tensors, which alias the program's memory, so ``set_adapter`` and optimizers write them in place.

Names are PEFT's saved keys (``base_model.model.<module>.lora_A.weight``), as in ``adapter_model.safetensors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorafleet.export.formats.adapter import (
    Adapter,
    LoraPair,
    StateDict,
    parse_lora_key,
    peft_config,
    peft_key,
    rescale,
    scaling_for,
)
from lorafleet.export.formats.errors import AdapterError, ConfigError, PackageError
from lorafleet.export.formats.program import LORA_METHOD, WRAPPED, CompiledLora, StepResult


class InferenceProgram:
    """A loaded inference program: ``forward(input_ids (1, T)) -> logits (1, T, vocab)``."""

    def __init__(self, program: Any, origin: str) -> None:
        self._program = program
        self.origin = origin
        self.lora = CompiledLora.from_json(_only(program.load_method(LORA_METHOD).execute([]), origin), origin)
        self.input_shape = tuple(program.metadata("forward").input_tensor_meta(0).sizes())
        # Load every method now: loading one initializes the LoRA state it shares with the others, which
        # must happen before set_lora writes it, never after.
        self._methods = {m: program.load_method(m) for m in ("forward", "set_lora", "get_lora")}

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        _check_shape("input_ids", input_ids, self.input_shape)
        return self._methods["forward"].execute([input_ids.to(torch.long)])[0]

    def set_adapter(self, adapter: Adapter) -> None:
        """Load ``adapter``'s factors (rescaled to the compiled ``lora_alpha``) into the program."""
        tensors = _factors_in_order(adapter, self.lora, self.get_state())
        self._methods["set_lora"].execute(tensors)

    def get_state(self) -> StateDict:
        """The current LoRA factors by PEFT key."""
        values = self._methods["get_lora"].execute([])
        return {peft_key(n): v for n, v in zip(self.lora.names, values, strict=True)}

    def adapter(self) -> Adapter:
        return adapter_from_state(self.get_state(), self.lora)


class TrainingProgram:
    """A loaded training program: ``forward(input_ids (B, T), labels (B, T)) -> loss`` with LoRA gradients."""

    def __init__(self, module: Any, origin: str) -> None:
        self._module = module  # executorch.extension.training.TrainingModule
        self.origin = origin
        et = module.model
        self.lora = CompiledLora.from_json(_only(et.run_method(LORA_METHOD, ()), origin), origin)
        self.input_shape = tuple(et.method_meta("forward").input_tensor_meta(0).sizes())

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """Forward and backward on one batch; parameters are not changed (the device's optimizer steps them)."""
        _check_shape("input_ids", input_ids, self.input_shape)
        _check_shape("labels", labels, self.input_shape)
        out = self._module.forward_backward("forward", (input_ids.to(torch.long), labels.to(torch.long)))
        grads = {_peft_key_of(fqn): g for fqn, g in self._module.named_gradients().items()}
        return StepResult(float(out[0]), grads)

    def parameters(self) -> StateDict:
        """ExecuTorch's LoRA parameter tensors by PEFT key; they alias program memory (write in place).

        ``TrainingModule`` only exposes them after a first ``forward_backward``; before the first step this runs
        one on a dummy batch (its gradients are discarded, parameters are unchanged).
        """
        if self._module.named_params is None:
            dummy = torch.zeros(self.input_shape, dtype=torch.long)
            self._module.forward_backward("forward", (dummy, dummy))
        return {_peft_key_of(fqn): p for fqn, p in self._module.named_parameters().items()}

    def set_adapter(self, adapter: Adapter) -> None:
        params = self.parameters()
        tensors = _factors_in_order(adapter, self.lora, params)
        with torch.no_grad():
            for name, new in zip(self.lora.names, tensors, strict=True):
                params[peft_key(name)].copy_(new)

    def get_state(self) -> StateDict:
        return {k: v.detach().clone() for k, v in self.parameters().items()}

    def adapter(self) -> Adapter:
        return adapter_from_state(self.get_state(), self.lora)


def load_inference(pte: str | Path, foundation: str | Path | None) -> InferenceProgram:
    """Load an inference program with ``executorch.runtime.Runtime.get().load_program(pte, data_path=...)``."""
    from executorch.runtime import Runtime

    _check_files(pte, foundation)
    try:
        program = Runtime.get().load_program(str(pte), data_path=None if foundation is None else str(foundation))
    except (RuntimeError, ValueError) as exc:
        raise PackageError(f"cannot load ExecuTorch program {pte}: {exc}") from exc
    return InferenceProgram(program, str(pte))


def load_training(pte: str | Path, foundation: str | Path | None) -> TrainingProgram:
    """Load a training program as an ExecuTorch ``TrainingModule`` reading its frozen weights from ``foundation``."""
    from executorch.extension.pybindings.portable_lib import _load_for_executorch
    from executorch.extension.training import TrainingModule

    _check_files(pte, foundation)
    try:
        module = _load_for_executorch(str(pte), data_path=None if foundation is None else str(foundation))
    except (RuntimeError, ValueError) as exc:
        raise PackageError(f"cannot load ExecuTorch training program {pte}: {exc}") from exc
    return TrainingProgram(TrainingModule(module), str(pte))


def adapter_from_state(state: StateDict, spec: CompiledLora) -> Adapter:
    """A PEFT :class:`Adapter` (config from ``spec``) holding copies of ``state``'s factors."""
    scaling = scaling_for(spec.r, spec.lora_alpha, spec.use_rslora)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name in spec.names:
        module, which = _split(name)
        halves.setdefault(module, {})[which] = state[peft_key(name)].detach().clone()
    modules = {m: LoraPair(h["A"], h["B"], scaling) for m, h in halves.items()}
    config = peft_config(list(spec.target_modules), spec.r, spec.lora_alpha, use_rslora=spec.use_rslora)
    return Adapter(modules, config)


# --- internals ------------------------------------------------------------------------------------------

def _factors_in_order(adapter: Adapter, spec: CompiledLora, current: StateDict) -> list[torch.Tensor]:
    """``adapter``'s factors rescaled to the program's scaling, in program order, checked against it."""
    expected = {_split(n)[0] for n in spec.names}
    missing, extra = sorted(expected - set(adapter.modules)), sorted(set(adapter.modules) - expected)
    if missing or extra:
        raise AdapterError(f"adapter modules do not match the program: missing {missing[:3]}, "
                           f"unexpected {extra[:3]}")
    sd = rescale(adapter, spec.lora_alpha, use_rslora=spec.use_rslora).state_dict()
    out = []
    for name in spec.names:
        key = peft_key(name)
        new, old = sd[key], current[key]
        if tuple(new.shape) != tuple(old.shape):
            raise AdapterError(f"{key}: adapter shape {tuple(new.shape)} != program shape {tuple(old.shape)} "
                               f"(program rank {spec.r}, adapter rank {adapter.r})")
        out.append(new.detach().to(torch.float32).contiguous())
    return out


def _peft_key_of(fqn: str) -> str:
    return peft_key(fqn.removeprefix(WRAPPED + "."))


def _only(values: list[Any], origin: str) -> str:
    if len(values) != 1 or not isinstance(values[0], str):
        raise PackageError(f"{origin}: {LORA_METHOD} did not return a string")
    return values[0]


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ConfigError(f"{name} must have the program's shape {shape}, got {tuple(t.shape)}")


def _check_files(pte: str | Path, foundation: str | Path | None) -> None:
    for path in (pte, foundation):
        if path is not None and not Path(path).is_file():
            raise PackageError(f"ExecuTorch file not found: {path}")


def _split(name: str) -> tuple[str, str]:
    parsed = parse_lora_key(name)
    if parsed is None:
        raise PackageError(f"not a LoRA parameter name: {name!r}")
    return parsed
