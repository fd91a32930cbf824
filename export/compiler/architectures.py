"""Published architecture configurations, for ``random:<arch>`` model specs.

Values are copied from each model's published ``config.json`` on the Hugging Face Hub (November 2026).
Only the shape-defining fields are kept; the weights are random (seeded), so these models serve export,
profiling and scale tests, never quality claims.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Architecture:
    """The shape of a decoder-only transformer, as its ``config.json`` gives it."""

    name: str
    model_type: str  # "llama" | "qwen2"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rope_theta: float
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    def hf_config_dict(self) -> dict[str, Any]:
        """Keyword arguments for the matching ``transformers`` config class."""
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            **self.extra,
        }


_SMOL = "https://huggingface.co/HuggingFaceTB/{}/blob/main/config.json"

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        # 2 layers, hidden 64: fast tests. Vocab sized for lorafleet's byte-level tokenizer (259 tokens).
        Architecture("tiny", "llama", 64, 128, 2, 4, 2, 272, 10000.0, 2048, 1e-5, True,
                     "lorafleet test model (not a published model)"),
        Architecture("smollm2-135m", "llama", 576, 1536, 30, 9, 3, 49152, 100000.0, 8192, 1e-5, True,
                     _SMOL.format("SmolLM2-135M-Instruct")),
        Architecture("smollm2-360m", "llama", 960, 2560, 32, 15, 5, 49152, 100000.0, 8192, 1e-5, True,
                     _SMOL.format("SmolLM2-360M-Instruct")),
        Architecture("smollm2-1.7b", "llama", 2048, 8192, 24, 32, 32, 49152, 130000.0, 8192, 1e-5, True,
                     _SMOL.format("SmolLM2-1.7B-Instruct")),
        Architecture("llama-3.2-1b", "llama", 2048, 8192, 16, 32, 8, 128256, 500000.0, 131072, 1e-5, True,
                     "https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json",
                     extra={"head_dim": 64, "rope_scaling": {
                         "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
        Architecture("qwen2.5-0.5b", "qwen2", 896, 4864, 24, 14, 2, 151936, 1000000.0, 32768, 1e-6, True,
                     "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct/blob/main/config.json"),
    ]
}


def module_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of every LoRA-targetable linear in one decoder layer.

    ``config`` is a transformers config (or anything with the same attributes). Names are PEFT's
    ``target_modules`` names for Llama-family models.
    """
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    inter = int(config.intermediate_size)
    return {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv_heads * head_dim, hidden),
        "v_proj": (kv_heads * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }
