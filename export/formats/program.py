"""What a compiled program states about itself, the same way for every runtime.

A rank's LoRA configuration is one :class:`LoraSpec` (PEFT's ``r``, ``target_modules``, ``lora_alpha``,
``use_rslora``). The compiler writes it into every program: an ExecuTorch program carries it, with its LoRA
parameter names in program order, as the JSON a constant method :data:`LORA_METHOD` returns
(:class:`CompiledLora`); an ONNX Runtime training graph carries it in its ``metadata_props``
(:func:`onnx_props`). When a program is loaded, :func:`check_compiled` compares what it says with the
package's manifest: the program is what runs, so a disagreement is refused, not reconciled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorafleet.export.formats.errors import ConfigError, PackageError

if TYPE_CHECKING:
    from lorafleet.export.formats.manifest import Manifest

IGNORE_INDEX = -100  # the label value no loss counts (PyTorch's CrossEntropyLoss default, Hugging Face's convention)
WRAPPED = "model"  # attribute name of the PEFT model inside every exported wrapper module
LORA_METHOD = "lorafleet_lora"  # the ExecuTorch constant method returning CompiledLora JSON
META_PREFIX = "lorafleet."  # prefix of the ONNX training graph's metadata keys


@dataclass(frozen=True)
class LoraSpec:
    """One rank's LoRA configuration: PEFT's ``r``, ``target_modules``, ``lora_alpha``, ``use_rslora``.

    ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) is a constant of a compiled graph; adapters are
    rescaled to it (:func:`lorafleet.export.formats.adapter.rescale`) before their tensors are loaded.
    """

    r: int
    target_modules: tuple[str, ...]
    lora_alpha: float
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError(f"target_modules must be non-empty module names, got {self.target_modules!r}")
        if not (isinstance(self.lora_alpha, int | float) and math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ConfigError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r


@dataclass(frozen=True)
class StepResult:
    """One training step's loss and its LoRA gradients by PEFT key (``base_model.model.<module>.lora_A.weight``),
    torch or numpy arrays: what every runtime and the eager oracle report."""

    loss: float
    gradients: Mapping[str, Any]

    def by_module(self) -> dict[str, tuple[Any, Any]]:
        """``{module: (d lora_A (r, in), d lora_B (out, r))}``."""
        from lorafleet.export.formats.adapter import parse_lora_key

        halves: dict[str, dict[str, Any]] = {}
        for key, g in self.gradients.items():
            parsed = parse_lora_key(key)
            if parsed is None:
                raise ConfigError(f"not a LoRA gradient key: {key!r}")
            halves.setdefault(parsed[0], {})[parsed[1]] = g
        missing = sorted(m for m, h in halves.items() if set(h) != {"A", "B"})
        if missing:
            raise ConfigError(f"gradients of {missing[:3]} lack lora_A or lora_B")
        return {m: (h["A"], h["B"]) for m, h in halves.items()}


@dataclass(frozen=True)
class CompiledLora:
    """The LoRA heads compiled into an ExecuTorch program: its :class:`LoraSpec` and the PEFT parameter names
    in program order (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` ...)."""

    names: tuple[str, ...]
    spec: LoraSpec

    def __post_init__(self) -> None:
        if not self.names:
            raise ConfigError("a compiled program has no LoRA parameter names")

    @property
    def r(self) -> int:
        return self.spec.r

    @property
    def lora_alpha(self) -> float:
        return self.spec.lora_alpha

    @property
    def use_rslora(self) -> bool:
        return self.spec.use_rslora

    @property
    def target_modules(self) -> tuple[str, ...]:
        return self.spec.target_modules

    def to_json(self) -> str:
        s = self.spec
        return json.dumps({"names": list(self.names), "r": s.r, "lora_alpha": s.lora_alpha,
                           "use_rslora": s.use_rslora, "target_modules": list(s.target_modules)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, origin: str = "program") -> CompiledLora:
        try:
            d = json.loads(text)
            spec = LoraSpec(int(d["r"]), tuple(d["target_modules"]), float(d["lora_alpha"]), bool(d["use_rslora"]))
            return cls(tuple(d["names"]), spec)
        except (ValueError, KeyError, TypeError) as exc:
            raise PackageError(f"{origin}: unreadable LoRA spec ({exc})") from exc


def onnx_props(spec: LoraSpec, input_shape: tuple[int, ...]) -> dict[str, str]:
    """The ONNX training graph's metadata naming what it computes with."""
    return {f"{META_PREFIX}r": str(spec.r), f"{META_PREFIX}lora_alpha": repr(float(spec.lora_alpha)),
            f"{META_PREFIX}use_rslora": str(bool(spec.use_rslora)).lower(),
            f"{META_PREFIX}target_modules": ",".join(sorted(spec.target_modules)),
            f"{META_PREFIX}input_shape": "x".join(str(d) for d in input_shape)}


def parse_onnx_props(props: Mapping[str, str], origin: str) -> tuple[LoraSpec, tuple[int, ...]]:
    """The inverse of :func:`onnx_props`; a graph without them is refused."""
    p = {k.removeprefix(META_PREFIX): v for k, v in props.items() if k.startswith(META_PREFIX)}
    try:
        spec = LoraSpec(int(p["r"]), tuple(t for t in p["target_modules"].split(",") if t), float(p["lora_alpha"]),
                        p["use_rslora"] == "true")
        return spec, tuple(int(d) for d in p["input_shape"].split("x"))
    except (KeyError, ValueError, ConfigError):
        raise PackageError(f"{origin} does not say what it was compiled with (no lorafleet metadata); re-export "
                           f"the package") from None


def check_compiled(m: Manifest, rank: int, artifact: str, spec: LoraSpec, input_shape: tuple[int, ...]) -> None:
    """Raise :class:`PackageError` unless the program agrees with the manifest on what it computes with.

    A manifest that says ``lora_alpha`` 32 over a program compiled at 16 would train at one scaling and write
    adapters at the other: the program is what runs, so a disagreement is refused, not reconciled.
    """
    want_shape = (1, m.seq_len) if artifact == "executorch_inference" else (m.batch_size, m.seq_len)
    want = {"r": rank, "lora_alpha": m.lora_alpha, "use_rslora": m.use_rslora,
            "target_modules": tuple(sorted(m.target_modules)), "input_shape": want_shape}
    got = {"r": spec.r, "lora_alpha": float(spec.lora_alpha), "use_rslora": spec.use_rslora,
           "target_modules": tuple(sorted(spec.target_modules)), "input_shape": tuple(input_shape)}
    for name, value in got.items():
        if value != want[name]:
            raise PackageError(f"rank {rank} {artifact}: the program was compiled with {name} {value!r}, the "
                               f"manifest says {want[name]!r}: the manifest or the program was changed after "
                               f"export; re-export the package")
