"""Weight-only quantization of a foundation model's frozen base: int8 per channel, int4 per group.

``lorafleet export --quantize none|int8|int4|int4:G`` stores every frozen matrix of the model quantized:

* every ``nn.Linear`` of the decoder layers (attention ``q/k/v/o`` and MLP ``gate/up/down`` projections, or a
  family's fused ``qkv_proj`` / ``gate_up_proj``), LoRA-targeted or not — they hold ~70–90 % of the weights;
* the token embedding and the LM head — the vocabulary matrix is 21 % of SmolLM2-135M and 21 % of
  Llama-3.2-1B; left in fp32 it alone would take 1 GiB of a 1B model's phone budget. A tied head shares the
  embedding's quantized tensors (one copy, as the fp32 model shares one matrix).

Norm weights and biases stay fp32 (they are vectors: < 0.1 % of the bytes). The LoRA factors stay fp32 and
are the only trainable tensors.

Numerics (both symmetric, zero point 0, scales fp32, computed by torchao's ``choose_qparams_affine`` and
``quantize_affine`` — the primitives its ``Int8WeightOnlyConfig`` / ``IntxWeightOnlyConfig`` use):

* ``int8`` — one scale per output row (block ``(1, in)``), values in [-128, 127], stored as ``int8``;
* ``int4:G`` — one scale per ``G`` consecutive inputs of a row (block ``(1, G)``, default ``G = 32``), values
  in [-8, 7], stored two per byte as ``uint8`` (``q + 8``: the low nibble holds the even column, the high
  nibble the odd one), so the stored bytes are half a byte per weight plus 4 bytes per group.

The dequantized weight ``W = q · s`` is computed inside each forward from the stored bytes
(:meth:`QuantizedLinear.dequantized`): a handful of element-wise ATen ops every runtime has (ExecuTorch's
portable kernels), the same ops in the torch backend and the ExecuTorch programs; the ONNX Runtime artifacts
compute the same values with ``uint8`` nibble ops and ONNX's ``DequantizeLinear``
(:func:`lorafleet.export.compiler.onnx.graph.lean_dequantizations`, bit-identical) — so each program computes
with exactly the eager model's weights. The
compilers then make sure a program never keeps the whole model dequantized: each use of a dequantized weight
(the forward product, and the backward product ``dL/dx = dL/dy · W``) recomputes it from the stored bytes
just before it (:func:`lorafleet.export.compiler.executorch.passes.rematerialize_constant_subgraphs`, and its
ONNX counterpart), so at most one layer's weight is dequantized at a time. The LM head, the largest matrix,
is dequantized :data:`HEAD_CHUNK_ROWS` vocabulary rows at a time.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorafleet.export.formats.quantization import DEFAULT_GROUP, Quantization

HEAD_CHUNK_ROWS = 8192  # LM-head rows dequantized at once: 8192 × 2048 fp32 = 64 MiB for a 1B-class model


# --- quantize / dequantize --------------------------------------------------------------------------------

def quantize_weight(weight: torch.Tensor, q: Quantization) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stored, scale)`` of a 2-D fp32 ``weight`` (out, in) with torchao's affine primitives.

    ``stored`` is int8 (out, in) for int8 and packed uint8 (out, in / 2) for int4; ``scale`` is fp32
    (out, in / block).
    """
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    w = weight.detach().to(torch.float32)
    out, inp = w.shape
    block = (1, q.block(inp))
    qmin, qmax = (-128, 127) if q.mode == "int8" else (-8, 7)
    scale, zero = choose_qparams_affine(w, MappingType.SYMMETRIC, block, torch.int8, quant_min=qmin, quant_max=qmax,
                                        eps=torch.finfo(torch.float32).eps, scale_dtype=torch.float32)
    scale = scale.reshape(out, inp // block[1])
    values = quantize_affine(w, block, scale, zero.reshape(scale.shape), torch.int8, quant_min=qmin, quant_max=qmax)
    if q.mode == "int8":
        return values.contiguous(), scale.contiguous()
    nibbles = (values.to(torch.int16) + 8).to(torch.uint8).reshape(out, inp // 2, 2)
    return (nibbles[..., 0] | (nibbles[..., 1] << 4)).contiguous(), scale.contiguous()


def dequantize(stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 (out, in) from :func:`quantize_weight`'s output (int8 or packed int4 told apart by dtype).

    Written with element-wise ATen ops only, so it traces into every runtime; equal to torchao's
    ``dequantize_affine`` of the same values (tests/test_quantize.py).
    """
    out = stored.shape[0]
    if stored.dtype == torch.uint8:  # packed int4: low nibble = even column, high nibble = odd column
        # in fp32 (exact for 0…255): integer shifts of uint8 do not translate alike in every exporter
        packed = stored.to(torch.float32)
        hi = torch.floor(packed * 0.0625)
        lo = packed - hi * 16.0
        values = torch.stack([lo, hi], dim=-1).reshape(out, -1) - 8.0
    else:
        values = stored.to(torch.float32)
    groups = scale.shape[1]
    return (values.reshape(out, groups, -1) * scale.unsqueeze(-1)).reshape(out, -1)


_RECOMPUTE = contextvars.ContextVar("lorafleet_recompute_dequantized", default=False)


@contextlib.contextmanager
def recomputed_dequantization() -> Iterator[None]:
    """Eager autograd inside the block keeps no dequantized weight for the backward: each quantized linear's
    backward dequantizes its weight again from the stored bytes, as the exported programs do, so an eager
    training step (the verification's oracle, the torch backend) holds one layer's weight at a time, not the
    whole model in fp32. The values are the same; tracing for export happens outside it and sees plain ops."""
    token = _RECOMPUTE.set(True)
    try:
        yield
    finally:
        _RECOMPUTE.reset(token)


class _RecomputedLinear(torch.autograd.Function):
    """``linear(x, q · s, bias)`` whose backward recomputes ``q · s`` for ``dL/dx = dL/dy · W`` instead of
    saving it (the stored bytes and scales are frozen: no gradient for them or the bias)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, stored: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(stored, scale)
        return nn.functional.linear(x, dequantize(stored, scale), bias)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        stored, scale = ctx.saved_tensors
        grad_x = grads[0].matmul(dequantize(stored, scale)) if ctx.needs_input_grad[0] else None  # (..., in)
        return grad_x, None, None, None


def _linear(x: torch.Tensor, stored: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if _RECOMPUTE.get() and torch.is_grad_enabled():
        out: torch.Tensor = _RecomputedLinear.apply(x, stored, scale, bias)
        return out
    return nn.functional.linear(x, dequantize(stored, scale), bias)


class QuantizedLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored quantized (buffers ``qweight``, ``scale``).

    Subclasses ``nn.Linear`` so PEFT wraps it with its own LoRA layer (``in_features`` / ``out_features``,
    ``base_layer(x)``); it has no ``weight`` parameter. ``chunk_rows`` > 0 dequantizes that many output rows at a
    time (the LM head).
    """

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, linear: nn.Linear, q: Quantization, *, shared: tuple[torch.Tensor, torch.Tensor] | None = None,
                 chunk_rows: int = 0) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        stored, scale = shared if shared is not None else quantize_weight(linear.weight, q)
        self.register_buffer("qweight", stored)
        self.register_buffer("scale", scale)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.chunk_rows = int(chunk_rows)
        self.quantization = str(q)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]  # PEFT reads the base layer's device and dtype here
        """The stored (quantized) weight: an integer tensor, so PEFT keeps the LoRA factors fp32."""
        return self.qweight

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.chunk_rows
        if rows <= 0 or rows >= self.out_features:
            return _linear(x, self.qweight, self.scale, self.bias)
        parts = []
        for start in range(0, self.out_features, rows):
            stop = min(start + rows, self.out_features)
            parts.append(_linear(x, self.qweight[start:stop], self.scale[start:stop],
                                 None if self.bias is None else self.bias[start:stop]))
        return torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quantize={self.quantization}"


class QuantizedEmbedding(nn.Module):
    """A frozen token embedding stored quantized; a lookup dequantizes only the rows it reads."""

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, embedding: nn.Embedding, q: Quantization) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        stored, scale = quantize_weight(embedding.weight, q)
        self.register_buffer("qweight", stored)
        self.register_buffer("scale", scale)
        self.padding_idx = embedding.padding_idx
        self.quantization = str(q)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = dequantize(self.qweight[flat], self.scale[flat])
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, quantize={self.quantization}"


# --- the whole model --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantizedSummary:
    """What :func:`quantize_model` did, for the manifest."""

    scheme: str
    linears: int
    embedding: bool
    lm_head: str  # "tied" | "quantized" | "none"
    quantized_parameters: int
    stored_bytes: int  # bytes of every quantized tensor with its scales (a tied head counted once)
    fp32_bytes: int  # what the same tensors take in fp32
    unquantized_bytes: int  # the fp32 tensors left (norms, biases)
    working_set_bytes: int  # the largest weight dequantized at once (one layer, or one LM-head chunk), fp32

    @property
    def weight_memory_bytes(self) -> int:
        """What a training step holds for the frozen base: the stored bytes, the fp32 rest, one working set."""
        return self.stored_bytes + self.unquantized_bytes + self.working_set_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "linears": self.linears, "embedding": self.embedding, "lm_head": self.lm_head,
                "quantized_parameters": self.quantized_parameters, "stored_bytes": self.stored_bytes,
                "fp32_bytes": self.fp32_bytes, "unquantized_bytes": self.unquantized_bytes,
                "working_set_bytes": self.working_set_bytes, "weight_memory_bytes": self.weight_memory_bytes}


def check_quantizable(model: Any, q: Quantization) -> None:
    """Every matrix to quantize has a width the scheme can group (before any work is done)."""
    if not q.enabled:
        return
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not isinstance(mod, QuantizedLinear):
            q.check(name, mod.in_features)
        elif isinstance(mod, nn.Embedding):
            q.check(name, mod.embedding_dim)


def quantize_model(model: Any, q: Quantization) -> QuantizedSummary | None:
    """Replace, in place, every frozen linear of ``model`` and its embedding / LM head by quantized modules.

    Must run before LoRA is attached (PEFT then wraps the quantized linears). Returns ``None`` for ``none``.
    Deterministic: the same fp32 weights give the same stored bytes, so every backend that quantizes the same
    checkpoint computes with the same weights.
    """
    if not q.enabled:
        return None
    check_quantizable(model, q)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = (head is not None and embed is not None and isinstance(head, nn.Linear)
            and head.weight is getattr(embed, "weight", None))
    counted: set[int] = set()
    stats = {"params": 0, "bytes": 0, "fp32": 0, "linears": 0}

    def count(stored: torch.Tensor, scale: torch.Tensor, numel: int) -> None:
        if id(stored) in counted:
            return
        counted.add(id(stored))
        stats["params"] += numel
        stats["bytes"] += stored.numel() * stored.element_size() + scale.numel() * scale.element_size()
        stats["fp32"] += numel * 4

    qembed: QuantizedEmbedding | None = None
    if isinstance(embed, nn.Embedding):
        qembed = QuantizedEmbedding(embed, q)
        model.set_input_embeddings(qembed)
        count(qembed.qweight, qembed.scale, embed.weight.numel())
    lm_head = "none"
    if isinstance(head, nn.Linear):
        shared = (qembed.qweight, qembed.scale) if (tied and qembed is not None) else None
        qhead = QuantizedLinear(head, q, shared=shared, chunk_rows=HEAD_CHUNK_ROWS)
        model.set_output_embeddings(qhead)
        count(qhead.qweight, qhead.scale, head.weight.numel())
        lm_head = "tied" if shared is not None else "quantized"
        if shared is not None:  # transformers re-ties on save/load; this model is never saved
            model.config.tie_word_embeddings = False
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not isinstance(child, QuantizedLinear):
                qlin = QuantizedLinear(child, q)
                setattr(parent, child_name, qlin)
                count(qlin.qweight, qlin.scale, child.weight.numel())
                stats["linears"] += 1
    for p in model.parameters():
        p.requires_grad_(False)
    fp32_rest = sum(p.numel() * p.element_size() for p in model.parameters())
    working = max((m.out_features if m.chunk_rows <= 0 else min(m.chunk_rows, m.out_features)) * m.in_features
                  for m in model.modules() if isinstance(m, QuantizedLinear)) * 4
    return QuantizedSummary(str(q), stats["linears"], qembed is not None, lm_head, stats["params"], stats["bytes"],
                            stats["fp32"], fp32_rest, working)


def dequantize_model(model: Any) -> Any:
    """Replace, in place, every quantized module of ``model`` by an fp32 one holding its dequantized weight
    (``q · s``: the exact values every program and backend computes with), and return ``model``.

    For a host that evaluates what devices trained over a quantized base (the fleet's evaluation): the weights
    are the quantized base's, held in fp32 so that a forward does not dequantize them again and an adapter can
    be merged into them. A tied LM head shares the embedding's dequantized matrix, as in the fp32 model."""
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    embed_weight: torch.Tensor | None = None
    if isinstance(embed, QuantizedEmbedding):
        embed_weight = dequantize(embed.qweight, embed.scale)
        plain = nn.Embedding(embed.num_embeddings, embed.embedding_dim, padding_idx=embed.padding_idx,
                             _weight=embed_weight, _freeze=True)
        model.set_input_embeddings(plain)
        embed_weight = plain.weight
    tied_bytes = embed.qweight if isinstance(embed, QuantizedEmbedding) else None
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, QuantizedLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device="meta")
                if child is head and tied_bytes is not None and child.qweight is tied_bytes:
                    linear.weight = embed_weight  # type: ignore[assignment]  # the tied head: one matrix
                else:
                    linear.weight = nn.Parameter(child.dequantized(), requires_grad=False)
                if child.bias is not None:
                    linear.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=False)
                setattr(parent, child_name, linear)
    return model


# --- what quantization costs ------------------------------------------------------------------------------

FIXED_TEXT = (
    "The committee met on Tuesday to review the budget for the new library. After a long discussion, the members "
    "agreed to spend most of the money on books and computers, and to keep the building open later in the evening "
    "so that students and workers could use it after school and work. The plan will be presented to the city "
    "council next month, where it is expected to pass without much opposition."
)


@dataclass
class QualityProbe:
    """fp32 next-token distributions on :data:`FIXED_TEXT`, taken before quantizing; :meth:`finish` compares."""

    ids: torch.Tensor  # (1, T)
    logp_fp32: torch.Tensor  # (T - 1, V) log-probabilities of the fp32 model
    source: str  # "text" (tokenized FIXED_TEXT) or "random-ids" (no tokenizer)

    def finish(self, model: Any) -> dict[str, Any]:
        logp = _next_token_logp(model, self.ids)
        target = self.ids[0, 1:]
        nll_fp32 = -self.logp_fp32.gather(1, target[:, None]).mean()
        nll = -logp.gather(1, target[:, None]).mean()
        kl = (self.logp_fp32.exp() * (self.logp_fp32 - logp)).sum(-1).mean()
        return {"tokens": int(self.ids.shape[1]), "text": self.source,
                "perplexity_fp32": float(nll_fp32.exp()), "perplexity": float(nll.exp()),
                "mean_kl_nats": float(kl), "top1_agreement": float((logp.argmax(-1) == self.logp_fp32.argmax(-1))
                                                                   .float().mean())}


def _next_token_logp(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].to(torch.float32)
    return torch.log_softmax(logits, dim=-1)


def quality_probe(model: Any, tokenizer: Any | None, seq_len: int) -> QualityProbe:
    """Take the fp32 model's distributions on the fixed text (at most ``max(seq_len, 64)`` tokens)."""
    limit = max(int(seq_len), 64)
    source = "text"
    ids: list[int] = []
    if tokenizer is not None:
        try:
            ids = list(tokenizer(FIXED_TEXT, add_special_tokens=False)["input_ids"])[:limit]
        except Exception:  # a tokenizer without __call__ (a byte tokenizer of a random model may differ)
            ids = []
    vocab = int(model.config.vocab_size)
    if len(ids) < 2 or max(ids) >= vocab:
        source = "random-ids"
        ids = torch.randint(0, vocab, (limit,), generator=torch.Generator().manual_seed(0)).tolist()
    t = torch.tensor([ids], dtype=torch.long)
    return QualityProbe(t, _next_token_logp(model, t), source)


__all__ = ["DEFAULT_GROUP", "FIXED_TEXT", "HEAD_CHUNK_ROWS", "QualityProbe", "QuantizedEmbedding", "QuantizedLinear",
           "QuantizedSummary", "quality_probe", "recomputed_dequantization",
           "Quantization", "check_quantizable", "dequantize", "quantize_model", "quantize_weight"]
