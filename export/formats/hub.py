"""What Hugging Face tools need to find in a lorafleet adapter: the base model, and a model card.

``adapter_config.json``'s ``base_model_name_or_path`` is what ``peft.AutoPeftModelForCausalLM.from_pretrained``
loads the base model from, so it must be a hub id or a directory ``transformers`` loads, never a lorafleet spec
(:func:`hf_base_model`). The lorafleet spec the adapter was trained on is kept in the adapter's own metadata
(the safetensors header, key :data:`SPEC_KEY`; PEFT ignores it), and :func:`model_card` renders the
``README.md`` written next to a run's global adapter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPEC_KEY = "lorafleet.base_model"  # safetensors metadata: the lorafleet model spec the adapter was trained on
CARD_FILE = "README.md"
# The embedded model is this hub model's Q4_1 GGUF, dequantized to fp32 (export/compiler/models.py): close to,
# not bit-identical with, the hub weights.
HUB_ORIGINS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_SNAPSHOT = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")  # huggingface_hub's cache folder


def hf_base_model(spec: str) -> str | None:
    """``base_model_name_or_path`` for a lorafleet model ``spec``: the hub id of a model in the Hugging Face cache
    (``…/models--ORG--NAME/snapshots/<rev>``) or of the embedded model, the absolute path of another Hugging Face
    directory, a hub id as given; ``None`` for random weights and GGUF files (nothing ``transformers`` loads)."""
    if spec in HUB_ORIGINS:
        return HUB_ORIGINS[spec]
    if spec.startswith("random:") or spec.lower().endswith(".gguf"):
        return None
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        resolved = path.resolve()
        if resolved.parent.name == "snapshots" and (m := HUB_SNAPSHOT.match(resolved.parent.parent.name)):
            return f"{m['org']}/{m['name']}"
        return str(resolved)
    return spec if HUB_ID.match(spec) and not path.exists() else None


@dataclass(frozen=True)
class CardFacts:
    """What a model card says about a run's global adapter."""

    spec: str  # the lorafleet model spec
    method: str  # fedavg, hetlora, flexlora, raflora
    rank: int  # the adapter's rank
    device_ranks: Sequence[int]  # the ranks the devices trained
    rounds: int  # rounds completed
    target_modules: Sequence[str]
    lora_alpha: float
    metrics: Mapping[str, Any]  # name -> value, rendered as given (may be empty)


def model_card(facts: CardFacts) -> str:
    """The ``README.md`` of a global adapter (Hugging Face model-card front matter, then the facts)."""
    base = hf_base_model(facts.spec)
    front = ["---", "library_name: peft", "tags:", "- lora", "- federated-learning", "- lorafleet"]
    if base is not None and not Path(base).is_absolute():
        front.insert(1, f"base_model: {base}")
    lines = [*front, "---", "", f"# LoRA adapter: {facts.method}, {facts.rounds} federated rounds", ""]
    lines.append(f"- base model: `{base}`" if base else
                 f"- base model: lorafleet `{facts.spec}` (no Hugging Face model to load it on)")
    if facts.spec in HUB_ORIGINS:
        lines.append(f"  (trained on lorafleet's `{facts.spec}`: its Q4_1 GGUF dequantized to fp32, so outputs on the "
                     f"full-precision hub weights differ slightly)")
    lines += [f"- lorafleet model spec: `{facts.spec}`", f"- aggregation: {facts.method}",
              f"- rank {facts.rank} (devices trained ranks {', '.join(map(str, sorted(set(facts.device_ranks))))}), "
              f"lora_alpha {facts.lora_alpha:g}, target modules {', '.join(facts.target_modules)}",
              f"- rounds: {facts.rounds}"]
    if facts.metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in facts.metrics.items()]
    load = (["from peft import AutoPeftModelForCausalLM",
             'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/directory")'] if base else
            ["from peft import PeftModel",
             'model = PeftModel.from_pretrained(base, "path/to/this/directory")  # base: the lorafleet model above'])
    lines += ["", "```python", *load, "```", ""]
    return "\n".join(lines)


def write_model_card(adapter_dir: str | Path, facts: CardFacts) -> Path:
    path = Path(adapter_dir) / CARD_FILE
    path.write_text(model_card(facts), encoding="utf-8")
    return path


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
