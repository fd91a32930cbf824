"""What a lowered program knows about its LoRA heads, stored inside the program as a constant method."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from export.errors import ExportError, PackageError

LORA_METHOD = "lorafleet_lora"  # constant method returning LoraSpec JSON


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA heads compiled into a program: PEFT parameter names in program order, rank and scaling.

    ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) is a constant of the compiled graph; adapters are
    rescaled to it (:func:`export.adapter.rescale`) before their tensors are loaded.
    """

    names: tuple[str, ...]  # e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.names:
            raise ExportError("LoraSpec.names is empty: the model has no LoRA parameters")
        if self.r <= 0:
            raise ExportError(f"LoraSpec.r must be positive, got {self.r}")
        if self.lora_alpha <= 0:
            raise ExportError(f"LoraSpec.lora_alpha must be positive, got {self.lora_alpha}")

    @classmethod
    def from_peft(cls, peft_model: Any, names: list[str]) -> LoraSpec:
        """Read rank and scaling from the model's (single, uniform) PEFT ``LoraConfig``."""
        configs = getattr(peft_model, "peft_config", None) or {}
        if len(configs) != 1:
            raise ExportError(f"expected a PEFT model with exactly one adapter, found {len(configs)}")
        cfg = next(iter(configs.values()))
        if cfg.rank_pattern or cfg.alpha_pattern:
            raise ExportError("rank_pattern / alpha_pattern are not supported: one rank per program")
        if getattr(cfg, "use_dora", False):
            raise ExportError("DoRA adapters are not supported")
        targets = cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules)
        return cls(tuple(names), int(cfg.r), float(cfg.lora_alpha), bool(cfg.use_rslora),
                   (targets,) if isinstance(targets, str) else tuple(targets))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, origin: str = "program") -> LoraSpec:
        try:
            d = json.loads(text)
            return cls(tuple(d["names"]), int(d["r"]), float(d["lora_alpha"]), bool(d["use_rslora"]),
                       tuple(d["target_modules"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise PackageError(f"{origin}: unreadable LoRA spec ({exc})") from exc
