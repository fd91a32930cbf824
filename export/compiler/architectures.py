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
    model_type: str  # a transformers model type: a key of FAMILIES
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


@dataclass(frozen=True)
class Family:
    """A model family lorafleet exports: its transformers ``model_type`` and what sets it apart."""

    model_type: str
    name: str
    features: str  # what the export has to get right for it
    default_targets: tuple[str, ...]  # the attention projections a q,v-style LoRA adapts, in this family's names
    # (runtime, quantization) pairs the test suite exports and verifies for this family (tests/test_families.py,
    # every linear of the decoder adapted; Llama's ExecuTorch pairs in the export tests it names); printed by
    # `lorafleet models`
    verified: tuple[tuple[str, str], ...] = (("onnx", "none"), ("onnx", "int4"))

    def runtimes_verified(self, quantize: str) -> tuple[str, ...]:
        return tuple(rt for rt, q in self.verified if q == quantize)


FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("llama", "Llama 3.x / SmolLM2", "GQA, RoPE (llama3 scaling)", ("q_proj", "v_proj"),
           verified=(("onnx", "none"), ("executorch", "none"), ("onnx", "int4"), ("executorch", "int4"))),
    Family("qwen2", "Qwen2.5", "GQA, q/k/v biases", ("q_proj", "v_proj")),
    Family("qwen3", "Qwen3", "GQA, q_norm / k_norm on each head, explicit head_dim", ("q_proj", "v_proj")),
    Family("gemma2", "Gemma 2", "GeGLU, pre+post norms (1 + w), scaled embedding, attention and final logit "
           "soft-capping, alternating sliding-window layers", ("q_proj", "v_proj")),
    Family("gemma3_text", "Gemma 3 (text)", "Gemma 2's norms plus q/k norms, 5 local : 1 global layers, "
           "two RoPE bases", ("q_proj", "v_proj"),
           verified=(("onnx", "none"), ("executorch", "none"), ("onnx", "int4"))),
    Family("phi3", "Phi-3.5 / Phi-4 mini", "fused qkv_proj and gate_up_proj (chunked in the graph), partial "
           "rotary", ("qkv_proj",),
           verified=(("onnx", "none"), ("executorch", "none"), ("onnx", "int4"))),
    Family("smollm3", "SmolLM3", "GQA, no RoPE on every 4th layer (NoPE)", ("q_proj", "v_proj")),
    Family("mistral", "Mistral / Ministral", "GQA, sliding-window attention", ("q_proj", "v_proj")),
]}

_HF = "https://huggingface.co/{}/blob/main/config.json"
_SMOL = "https://huggingface.co/HuggingFaceTB/{}/blob/main/config.json"
_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_GEMMA2 = {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
           "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
           "hidden_activation": "gelu_pytorch_tanh"}
_GEMMA3 = {"head_dim": 256, "query_pre_attn_scalar": 256, "rope_local_base_freq": 10000.0,
           "sliding_window_pattern": 6, "hidden_activation": "gelu_pytorch_tanh"}
# Phi's published rope_scaling is "longrope" with 2 × 48 per-frequency factors (positions beyond 4096);
# left out: it changes no shape, and these entries carry shapes only.
_PHI = {"original_max_position_embeddings": 4096}

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
                     _HF.format("meta-llama/Llama-3.2-1B"),
                     extra={"head_dim": 64, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0}}),
        Architecture("llama-3.2-3b", "llama", 3072, 8192, 28, 24, 8, 128256, 500000.0, 131072, 1e-5, True,
                     _HF.format("meta-llama/Llama-3.2-3B"),
                     extra={"head_dim": 128, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0}}),
        Architecture("llama-3.1-8b", "llama", 4096, 14336, 32, 32, 8, 128256, 500000.0, 131072, 1e-5, False,
                     _HF.format("meta-llama/Llama-3.1-8B"),
                     extra={"head_dim": 128, "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0}}),
        Architecture("qwen2.5-0.5b", "qwen2", 896, 4864, 24, 14, 2, 151936, 1000000.0, 32768, 1e-6, True,
                     _HF.format("Qwen/Qwen2.5-0.5B-Instruct")),
        Architecture("qwen2.5-1.5b", "qwen2", 1536, 8960, 28, 12, 2, 151936, 1000000.0, 32768, 1e-6, True,
                     _HF.format("Qwen/Qwen2.5-1.5B-Instruct")),
        Architecture("qwen2.5-3b", "qwen2", 2048, 11008, 36, 16, 2, 151936, 1000000.0, 32768, 1e-6, True,
                     _HF.format("Qwen/Qwen2.5-3B-Instruct")),
        Architecture("qwen2.5-7b", "qwen2", 3584, 18944, 28, 28, 4, 152064, 1000000.0, 32768, 1e-6, False,
                     _HF.format("Qwen/Qwen2.5-7B-Instruct")),
        Architecture("qwen3-0.6b", "qwen3", 1024, 3072, 28, 16, 8, 151936, 1000000.0, 40960, 1e-6, True,
                     _HF.format("Qwen/Qwen3-0.6B"), extra={"head_dim": 128}),
        Architecture("qwen3-1.7b", "qwen3", 2048, 6144, 28, 16, 8, 151936, 1000000.0, 40960, 1e-6, True,
                     _HF.format("Qwen/Qwen3-1.7B"), extra={"head_dim": 128}),
        Architecture("qwen3-4b", "qwen3", 2560, 9728, 36, 32, 8, 151936, 1000000.0, 40960, 1e-6, True,
                     _HF.format("Qwen/Qwen3-4B"), extra={"head_dim": 128}),
        Architecture("qwen3-8b", "qwen3", 4096, 12288, 36, 32, 8, 151936, 1000000.0, 40960, 1e-6, False,
                     _HF.format("Qwen/Qwen3-8B"), extra={"head_dim": 128}),
        Architecture("gemma-2-2b", "gemma2", 2304, 9216, 26, 8, 4, 256000, 10000.0, 8192, 1e-6, True,
                     _HF.format("google/gemma-2-2b-it"), extra=_GEMMA2),
        Architecture("gemma-2-9b", "gemma2", 3584, 14336, 42, 16, 8, 256000, 10000.0, 8192, 1e-6, True,
                     _HF.format("google/gemma-2-9b-it"), extra=_GEMMA2),
        Architecture("gemma-3-1b", "gemma3_text", 1152, 6912, 26, 4, 1, 262144, 1000000.0, 32768, 1e-6, True,
                     _HF.format("google/gemma-3-1b-it"), extra={**_GEMMA3, "sliding_window": 512}),
        Architecture("gemma-3-4b", "gemma3_text", 2560, 10240, 34, 8, 4, 262208, 1000000.0, 131072, 1e-6, True,
                     _HF.format("google/gemma-3-4b-it") + " (text_config)",
                     extra={**_GEMMA3, "sliding_window": 1024,
                            "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
        Architecture("phi-3.5-mini", "phi3", 3072, 8192, 32, 32, 32, 32064, 10000.0, 131072, 1e-5, False,
                     _HF.format("microsoft/Phi-3.5-mini-instruct"), extra=_PHI),
        Architecture("phi-4-mini", "phi3", 3072, 8192, 32, 24, 8, 200064, 10000.0, 131072, 1e-5, True,
                     _HF.format("microsoft/Phi-4-mini-instruct"), extra={**_PHI, "partial_rotary_factor": 0.75}),
        Architecture("smollm3-3b", "smollm3", 2048, 11008, 36, 16, 4, 128256, 5000000.0, 65536, 1e-6, True,
                     _SMOL.format("SmolLM3-3B"), extra={"no_rope_layer_interval": 4}),
        Architecture("mistral-7b", "mistral", 4096, 14336, 32, 32, 8, 32768, 1000000.0, 32768, 1e-5, False,
                     _HF.format("mistralai/Mistral-7B-Instruct-v0.3"), extra={"head_dim": 128, "sliding_window": None}),
        Architecture("ministral-8b", "mistral", 4096, 12288, 36, 32, 8, 131072, 100000000.0, 32768, 1e-5, False,
                     _HF.format("mistralai/Ministral-8B-Instruct-2410"),
                     extra={"head_dim": 128, "sliding_window": 32768}),
    ]
}


def module_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of every LoRA-targetable linear in one decoder layer, from the config alone.

    ``config`` is a transformers config (or anything with the same attributes). Names are PEFT's
    ``target_modules`` names and follow the family: Phi-3 / Phi-4 fuse the attention input projections into
    ``qkv_proj`` (``(nh + 2·nkv)·hd`` outputs) and the MLP's gate and up into ``gate_up_proj`` (``2·I``).
    A loaded model's own shapes come from :func:`layer_shapes`, which reads its linears.
    """
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    inter = int(config.intermediate_size)
    if str(getattr(config, "model_type", "")) in FUSED_FAMILIES:
        return {
            "qkv_proj": ((heads + 2 * kv_heads) * head_dim, hidden),
            "o_proj": (hidden, heads * head_dim),
            "gate_up_proj": (2 * inter, hidden),
            "down_proj": (hidden, inter),
        }
    return {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv_heads * head_dim, hidden),
        "v_proj": (kv_heads * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }


FUSED_FAMILIES = frozenset({"phi3"})  # model types whose attention and MLP input projections are fused


def layer_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every ``nn.Linear`` in the model's first decoder layer, keyed by its last name.

    What the model really has, whatever its family calls them (``q_proj``/``qkv_proj``/``gate_up_proj`` …);
    falls back to :func:`module_shapes` of the config for a model whose layers are not found.
    """
    import torch

    shapes: dict[str, tuple[int, int]] = {}
    for name, mod in model.named_modules():
        parts = name.split(".")
        if (isinstance(mod, torch.nn.Linear) and "layers" in parts[:-2]
                and parts[parts.index("layers") + 1] == "0"):
            shapes.setdefault(parts[-1], (int(mod.out_features), int(mod.in_features)))
    return shapes or module_shapes(model.config)
