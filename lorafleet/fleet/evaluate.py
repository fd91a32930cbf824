"""Evaluation of a base model + LoRA adapter on instruction examples: Rouge-L, exact match, response loss.

Generation is greedy and batched (left padding), answers are scored against the reference with Rouge-L F
(Lin, 2004; the ``rouge-score`` package, as in the Natural-Instructions / FlexLoRA evaluations, Bai et al.,
NeurIPS 2024) and normalized exact match; the loss is the mean negative log-likelihood of the reference
response tokens under teacher forcing (prompt tokens masked, as in training). Scores are macro-averaged:
every task family counts equally. Prompts come from the one formatter the client trains with.

The adapter is applied by adding ΔW = scaling · B @ A to each target weight and restoring the saved weight
afterwards — exactly PEFT's merged forward, without wrapping the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorafleet.edge_client.data import IGNORE_INDEX, Example, encode_example, pad_id, prompt_text
from lorafleet.export.formats.adapter import Adapter
from lorafleet.export.formats.errors import AdapterError, ConfigError

if TYPE_CHECKING:
    import torch

METRICS = ("rouge_l", "exact_match", "loss")


@dataclass(frozen=True)
class EvalConfig:
    """How much to evaluate: ``per_family`` caps the examples of each family (CI stays fast)."""

    per_family: int = 8
    max_new_tokens: int = 16
    batch_size: int = 16
    seq_len: int = 256

    def __post_init__(self) -> None:
        for name in ("per_family", "max_new_tokens", "batch_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"EvalConfig.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Scores:
    """Mean Rouge-L F (0–1), exact-match rate (0–1), loss (nats per response token), over ``n`` examples."""

    rouge_l: float
    exact_match: float
    loss: float
    n: int


@dataclass(frozen=True)
class ExampleScore:
    """One evaluated example: its family, Rouge-L F and exact match of the greedy answer, and the summed NLL
    (nats) of its ``tokens`` response tokens — what paired comparisons of two adapters resample."""

    family: str
    rouge_l: float
    exact_match: bool
    nll: float
    tokens: int


@dataclass(frozen=True)
class SplitResult:
    """Scores of one split (e.g. held-out families): the macro average, each family's, and each example's
    (in family order, then the examples' order)."""

    overall: Scores
    families: dict[str, Scores]
    examples: tuple[ExampleScore, ...] = ()


def normalize(text: str) -> str:
    """Lowercase, collapse whitespace, strip surrounding quotes and end punctuation (for exact match)."""
    text = " ".join(text.lower().split())
    return text.strip(" \"'`").rstrip(".!?;:").strip()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F-measure of ``prediction`` against ``reference`` (rouge-score's tokenizer, no stemming)."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


@contextmanager
def applied(model: Any, adapter: Adapter | None) -> Iterator[Any]:
    """``model`` with ``adapter`` merged into its weights for the duration of the block, then restored."""
    import torch

    if adapter is None:
        yield model
        return
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, pair in adapter.modules.items():
                weight = _target_weight(model, name, pair.shape)
                saved[name] = weight.detach().clone()
                weight.add_(pair.delta().to(device=weight.device, dtype=weight.dtype))  # (out, in)
        yield model
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                model.get_submodule(name).weight.copy_(original)


def evaluate(model: Any, tokenizer: Any, examples: Mapping[str, Sequence[Example]], *,
             adapter: Adapter | None = None, config: EvalConfig | None = None) -> SplitResult:
    """Score ``model`` (+ ``adapter``) on ``{family: examples}``, at most ``config.per_family`` per family."""
    cfg = config or EvalConfig()
    picked = {fam: list(exs)[: cfg.per_family] for fam, exs in examples.items() if exs}
    if not picked:
        raise ConfigError("nothing to evaluate: every family is empty")
    flat = [ex for exs in picked.values() for ex in exs]
    with applied(model, adapter):
        predictions = generate_answers(model, tokenizer, flat, max_new_tokens=cfg.max_new_tokens,
                                       batch_size=cfg.batch_size)
        nll, tokens = response_nll(model, tokenizer, flat, seq_len=cfg.seq_len, batch_size=cfg.batch_size)
    families: dict[str, Scores] = {}
    start = 0
    for fam, exs in picked.items():
        stop = start + len(exs)
        families[fam] = _scores(exs, predictions[start:stop], nll[start:stop], tokens[start:stop])
        start = stop
    fams = [fam for fam, exs in picked.items() for _ in exs]
    scored = tuple(ExampleScore(fam, rouge_l(p, ex.output), exact_match(p, ex.output), float(n), int(t))
                   for fam, ex, p, n, t in zip(fams, flat, predictions, nll, tokens, strict=True))
    return SplitResult(_macro(families), families, scored)


def evaluate_splits(model: Any, tokenizer: Any, splits: Mapping[str, Mapping[str, Sequence[Example]]], *,
                    adapter: Adapter | None = None, config: EvalConfig | None = None) -> dict[str, SplitResult]:
    """:func:`evaluate` for each split (``{"seen": {...}, "heldout": {...}}``), the adapter merged once."""
    with applied(model, adapter):
        return {split: evaluate(model, tokenizer, exs, config=config) for split, exs in splits.items()}


def flat_metrics(results: Mapping[str, SplitResult]) -> dict[str, float]:
    """``{"heldout/rouge_l": ..., "seen/loss": ...}``: one number per split and metric, for reports."""
    return {f"{split}/{m}": float(getattr(r.overall, m)) for split, r in results.items() for m in METRICS}


def generate_answers(model: Any, tokenizer: Any, examples: Sequence[Example], *, max_new_tokens: int,
                     batch_size: int) -> list[str]:
    """Greedy answers to each example's prompt (special tokens dropped, surrounding space stripped)."""
    ids = generate_ids(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [str(tokenizer.decode(row, skip_special_tokens=True)).strip() for row in ids]


def generate_ids(model: Any, tokenizer: Any, examples: Sequence[Example], *, max_new_tokens: int,
                 batch_size: int) -> list[list[int]]:
    """Greedy new token ids for each example's prompt, in batches with left padding (up to the first eos)."""
    import torch

    rows: list[list[int]] = []
    pad, eos = pad_id(tokenizer), tokenizer.eos_token_id
    for batch in _batches(examples, batch_size):
        # the prompt tokenized exactly as encode_example tokenizes it for training
        prompts = [list(tokenizer(prompt_text(tokenizer, ex), add_special_tokens=False)["input_ids"])
                   for ex in batch]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)  # (B, T), left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=eos)
        for row in out[:, width:].tolist():
            rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def response_nll(model: Any, tokenizer: Any, examples: Sequence[Example], *, seq_len: int,
                 batch_size: int) -> tuple[list[float], list[int]]:
    """Per example: summed NLL (nats) of its response tokens and how many there are (teacher forcing)."""
    import torch
    import torch.nn.functional as F

    sums: list[float] = []
    counts: list[int] = []
    for batch in _batches(examples, batch_size):
        # right-padded to seq_len, labels -100 on prompt and padding: a causal model's logits at a position
        # never see the padding after it, so no attention mask is needed; columns after the last response
        # token of the batch are dropped (exact, and cheaper)
        encoded = [encode_example(tokenizer, ex, seq_len) for ex in batch]
        ids = torch.tensor([e[0] for e in encoded], device=model.device)  # (B, seq_len)
        labels = torch.tensor([e[1] for e in encoded], device=model.device)  # (B, seq_len)
        scored = (labels != IGNORE_INDEX).any(dim=0).nonzero()
        width = int(scored.max()) + 1 if len(scored) else 1
        ids, labels = ids[:, :width], labels[:, :width]
        with torch.inference_mode():
            logits = model(input_ids=ids).logits.float()  # (B, T, V)
        target = labels[:, 1:]  # token t is predicted from position t - 1
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
        sums += nll.sum(dim=1).tolist()
        counts += (target != IGNORE_INDEX).sum(dim=1).tolist()
    return sums, counts


# --- internals ------------------------------------------------------------------------------------------

_SCORER: Any = None


def _scorer() -> Any:
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _SCORER


def _scores(examples: Sequence[Example], predictions: Sequence[str], nll: Sequence[float],
            tokens: Sequence[int]) -> Scores:
    n = len(examples)
    rouge = sum(rouge_l(p, ex.output) for p, ex in zip(predictions, examples, strict=True)) / n
    em = sum(exact_match(p, ex.output) for p, ex in zip(predictions, examples, strict=True)) / n
    loss = sum(nll) / sum(tokens) if sum(tokens) else math.nan
    return Scores(rouge, em, loss, n)


def _macro(families: Mapping[str, Scores]) -> Scores:
    k = len(families)
    losses = [s.loss for s in families.values() if not math.isnan(s.loss)]
    return Scores(sum(s.rouge_l for s in families.values()) / k, sum(s.exact_match for s in families.values()) / k,
                  sum(losses) / len(losses) if losses else math.nan, sum(s.n for s in families.values()))


def _target_weight(model: Any, name: str, shape: tuple[int, int]) -> torch.Tensor:
    try:
        weight = model.get_submodule(name).weight
    except AttributeError:
        raise AdapterError(f"adapter module {name} is not a linear layer of this model") from None
    if tuple(weight.shape) != shape:
        raise AdapterError(f"adapter module {name} has shape {shape}, the model's weight {tuple(weight.shape)}")
    return weight


def _batches(items: Sequence[Example], size: int) -> Iterator[Sequence[Example]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
