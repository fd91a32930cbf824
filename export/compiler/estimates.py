"""Per-rank training cost estimates stored in the manifest: peak memory and FLOPs of one training step.

Memory follows the LoRA training-memory formula of docs/device-sources.md §3b (LLaMA-style decoder, SwiGLU, GQA), at
the precision the package's programs run in (fp32 weights and activations, no activation checkpointing)::

    M = M_W + M_LoRA(r) + M_act(s, b, r) + M_attn(s, b) + M_logits(s, b) + M_runtime
    M_W      = P_base · 4                                    frozen fp32 weights
    M_LoRA   = P_lora(r) · 16                                fp32 adapter + grad + AdamW m, v
    P_lora   = r · L · Σ_targets (in + out)
    M_act    = s·b·L · [(4h + 2·nh·hd + 2·nkv·hd + 2h) + (2h + 4I) + n_targets·r] · 4
               (the §3b per-layer tensors, fp32; the n_targets·r term keeps A·x for dB)
    M_attn   = s²·b·L·nh · 2 · 4                              eager attention keeps scores and probabilities
    M_logits = s·b·V · 12                                    fp32 logits, log-softmax, logits grad
    M_runtime = 10 % of the rest                             allocator and framework overhead

FLOPs follow the usual count (Kaplan et al. 2020, arXiv:2001.08361; docs/device-sources.md §3b: ≈ 4·P + 6·P_lora per
token for LoRA, frozen weights need no weight gradient)::

    FLOPs/step = s·b · (4·P_matmul + 6·P_lora(r) + 12·L·s·nh·hd)

with ``P_matmul`` the weights used in matrix products (every decoder linear plus the LM head; the embedding
lookup costs none) and the last term the two attention products (QKᵀ and AV: 4·s·nh·hd per token and layer
forward, twice that backward). ``tests/test_export_lora.py`` checks it against ``torch.utils.flop_counter``
(it over-counts by the layer-0 input gradient autograd skips, ~1/L of the backward). These are
estimates for planning (rank choice); ``bench/export.py`` measures real steps. For ExecuTorch the manifest also
records a prediction read from the lowered program (:mod:`lorafleet.export.compiler.executorch.memory`), which
the profiler prefers for the ExecuTorch and native backends: with delegated fp32 linears this formula misses
XNNPACK's second packed copy of every frozen weight (docs/BENCHMARKS.md, "Device memory of a training step").
"""

from __future__ import annotations

from lorafleet.export.formats.manifest import Estimates, ModelSection

WEIGHT_BYTES = 4  # fp32 programs
ACT_BYTES = 4
LORA_BYTES_PER_PARAM = 16  # adapter 4 + grad 4 + AdamW moments 8
LOGITS_BYTES = 12
RUNTIME_OVERHEAD = 0.10


def lora_parameters(model: ModelSection, target_modules: list[str], r: int) -> int:
    """``r · L · Σ_targets (in + out)``: trainable parameters of rank ``r``."""
    return r * model.num_layers * sum(sum(model.module_shapes[t]) for t in target_modules)


def _head_dim(model: ModelSection) -> int:
    """``hd`` from the query projection's width (``qkv_proj``: fused ``(nh + 2·nkv)·hd`` outputs)."""
    shapes = model.module_shapes
    if "q_proj" in shapes:
        return shapes["q_proj"][0] // model.num_attention_heads
    if "qkv_proj" in shapes:
        return shapes["qkv_proj"][0] // (model.num_attention_heads + 2 * model.num_key_value_heads)
    return model.hidden_size // model.num_attention_heads


def training_memory(model: ModelSection, target_modules: list[str], r: int, seq_len: int,
                    batch_size: int, weight_bytes: int | None = None) -> dict[str, int]:
    """The terms of the peak-memory formula, in bytes (see the module docstring). ``weight_bytes`` replaces
    ``M_W`` for a quantized base (its stored bytes, the fp32 rest and one dequantized working set:
    :class:`lorafleet.export.compiler.quantize.QuantizedSummary`)."""
    h, inter, L = model.hidden_size, model.intermediate_size, model.num_layers
    nh, nkv, hd = model.num_attention_heads, model.num_key_value_heads, _head_dim(model)
    tokens = seq_len * batch_size
    per_layer = (4 * h + 2 * nh * hd + 2 * nkv * hd + 2 * h) + (2 * h + 4 * inter) + len(target_modules) * r
    terms = {
        "weights": model.num_parameters * WEIGHT_BYTES if weight_bytes is None else int(weight_bytes),
        "lora": lora_parameters(model, target_modules, r) * LORA_BYTES_PER_PARAM,
        "activations": tokens * L * per_layer * ACT_BYTES,
        "attention": seq_len * seq_len * batch_size * L * nh * 2 * ACT_BYTES,
        "logits": tokens * model.vocab_size * LOGITS_BYTES,
    }
    terms["runtime"] = int(RUNTIME_OVERHEAD * sum(terms.values()))
    return terms


def flops_per_step(model: ModelSection, target_modules: list[str], r: int, seq_len: int, batch_size: int) -> int:
    """Forward + backward FLOPs of one training step (see the module docstring)."""
    shapes = model.module_shapes
    linear = model.num_layers * sum(out * inp for out, inp in shapes.values())
    p_matmul = linear + model.hidden_size * model.vocab_size
    attention = 12 * model.num_layers * seq_len * model.num_attention_heads * _head_dim(model)
    per_token = 4 * p_matmul + 6 * lora_parameters(model, target_modules, r) + attention
    return seq_len * batch_size * per_token


def estimate(model: ModelSection, target_modules: list[str], r: int, seq_len: int, batch_size: int, *,
             weight_bytes: int | None = None) -> Estimates:
    """The manifest's ``estimates`` entry for rank ``r``."""
    terms = training_memory(model, target_modules, r, seq_len, batch_size, weight_bytes)
    return Estimates(training_peak_memory_bytes=sum(terms.values()),
                     flops_per_step=flops_per_step(model, target_modules, r, seq_len, batch_size),
                     memory_breakdown=terms)
