"""Evaluation: padding-free batching oracles, PEFT as the oracle for the merged adapter, metric definitions."""

from __future__ import annotations

import math

import pytest
import torch

from lorafleet import tasks
from lorafleet.edge_client.data import IGNORE_INDEX, encode_example
from lorafleet.export.formats.adapter import write_adapter
from lorafleet.export.formats.errors import AdapterError, ConfigError
from lorafleet.fleet.evaluate import (
    EvalConfig,
    applied,
    evaluate,
    evaluate_splits,
    exact_match,
    flat_metrics,
    generate_answers,
    generate_ids,
    normalize,
    response_nll,
    rouge_l,
)
from tests.fleet_helpers import random_adapter, tiny  # noqa: F401  (fixture)

EXAMPLES = tasks.generate("reverse_word", 3, seed=0) + tasks.generate("sort_ascending", 3, seed=0)


def test_exact_match_normalizes_case_space_and_end_punctuation():
    assert normalize("  The  Capital.  ") == "the capital"
    assert exact_match("Paris.", "paris") and exact_match('"yes"', "yes")
    assert not exact_match("Paris is", "Paris")
    assert not exact_match("o-y", "o y")


def test_rouge_l_is_the_lcs_f_measure():
    assert rouge_l("Paris", "Paris") == 1.0
    assert rouge_l("", "Paris") == 0.0
    # LCS 1 of 4 predicted and 1 reference token: P = 1/4, R = 1, F = 2PR/(P+R) = 0.4
    assert rouge_l("The capital is Paris", "Paris") == pytest.approx(0.4)
    assert rouge_l("12, 30, 42", "12, 42, 30") == pytest.approx(2 / 3)


def test_batched_generation_equals_one_at_a_time(tiny):  # noqa: F811
    model, tok = tiny.model, tiny.tokenizer
    with applied(model, random_adapter(tiny, 8, seed=3, std=0.6)):  # varied, non-degenerate outputs
        batched = generate_ids(model, tok, EXAMPLES, max_new_tokens=8, batch_size=6)
        single = [generate_ids(model, tok, [ex], max_new_tokens=8, batch_size=1)[0] for ex in EXAMPLES]
    assert batched == single
    assert len({tuple(r) for r in batched}) > 1


def test_response_nll_matches_transformers_loss_per_example(tiny):  # noqa: F811
    model, tok = tiny.model, tiny.tokenizer
    sums, counts = response_nll(model, tok, EXAMPLES, seq_len=256, batch_size=4)
    for ex, total, n in zip(EXAMPLES, sums, counts, strict=True):
        ids, labels = encode_example(tok, ex, 256)
        end = max(i for i, x in enumerate(labels) if x != IGNORE_INDEX) + 1  # no padding at all
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids[:end]]), labels=torch.tensor([labels[:end]])).loss
        assert n == sum(1 for x in labels[1:] if x != IGNORE_INDEX) > 0
        assert total / n == pytest.approx(float(ref), rel=1e-5)


def test_merged_adapter_loss_equals_peft_and_weights_are_restored(tiny, tmp_path):  # noqa: F811
    from peft import PeftModel

    model, tok = tiny.model, tiny.tokenizer
    adapter = random_adapter(tiny, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with applied(model, adapter):
        merged, _ = response_nll(model, tok, EXAMPLES, seq_len=256, batch_size=6)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    base, _ = response_nll(model, tok, EXAMPLES, seq_len=256, batch_size=6)
    peft = PeftModel.from_pretrained(model, str(write_adapter(adapter, tmp_path / "a")))
    ref, _ = response_nll(peft, tok, EXAMPLES, seq_len=256, batch_size=6)
    peft.unload()
    assert merged == pytest.approx(ref, rel=1e-4)
    assert merged != pytest.approx(base, rel=1e-3)  # the adapter matters


@pytest.mark.parametrize("quantize", ["int4:16", "int8"])
def test_a_quantized_base_is_evaluated_with_the_devices_weights(quantize):
    """The fleet's evaluation of a ``--quantize``d package (``lorafleet.fleet.server.Evaluator``): the base
    quantized as the package's, dequantized once into fp32 — the same weights as the quantized modules the
    devices train over, and a merged adapter scores like PEFT's LoRA over those quantized modules (the torch
    backend's model)."""
    from lorafleet.export.compiler.lora import attach_lora
    from lorafleet.export.compiler.models import load_model
    from lorafleet.export.compiler.quantize import QuantizedLinear, dequantize_model, quantize_model
    from lorafleet.export.formats.program import LoraSpec
    from lorafleet.export.formats.quantization import Quantization

    q = Quantization.parse(quantize)
    loaded = load_model("random:tiny")
    tok = loaded.tokenizer
    quantized = loaded.model
    quantize_model(quantized, q)
    fp32_nll = response_nll(load_model("random:tiny").model, tok, EXAMPLES, seq_len=256, batch_size=6)[0]
    device_nll = response_nll(quantized, tok, EXAMPLES, seq_len=256, batch_size=6)[0]
    adapter = random_adapter(loaded, 4, seed=5)
    peft = attach_lora(quantized, LoraSpec(4, ("q_proj", "v_proj"), 16.0), adapter)
    peft.eval()
    assert all(isinstance(m, QuantizedLinear) for n, m in peft.named_modules() if n.endswith("base_layer"))
    ref = response_nll(peft, tok, EXAMPLES, seq_len=256, batch_size=6)[0]
    ref_answers = generate_answers(peft, tok, EXAMPLES, max_new_tokens=6, batch_size=6)

    evaluated = load_model("random:tiny").model
    quantize_model(evaluated, q)
    dequantize_model(evaluated)
    assert not any(isinstance(m, QuantizedLinear) for m in evaluated.modules())
    assert evaluated.get_output_embeddings().weight is evaluated.get_input_embeddings().weight  # still tied
    base = response_nll(evaluated, tok, EXAMPLES, seq_len=256, batch_size=6)[0]
    assert base == pytest.approx(device_nll, rel=1e-6)
    assert base != pytest.approx(fp32_nll, rel=1e-4)  # not the fp32 model's weights
    with applied(evaluated, adapter):
        merged = response_nll(evaluated, tok, EXAMPLES, seq_len=256, batch_size=6)[0]
        answers = generate_answers(evaluated, tok, EXAMPLES, max_new_tokens=6, batch_size=6)
    assert merged == pytest.approx(ref, rel=1e-5)
    assert merged != pytest.approx(base, rel=1e-3)  # the adapter matters
    assert answers == ref_answers


def test_evaluate_caps_families_and_macro_averages(tiny):  # noqa: F811
    model, tok = tiny.model, tiny.tokenizer
    sets = {"add": tasks.generate("add", 5, seed=0), "parity": tasks.generate("parity", 5, seed=0), "empty": []}
    cfg = EvalConfig(per_family=2, max_new_tokens=4, batch_size=3)
    result = evaluate(model, tok, sets, config=cfg)
    assert set(result.families) == {"add", "parity"}
    assert all(s.n == 2 for s in result.families.values()) and result.overall.n == 4
    for metric in ("rouge_l", "exact_match", "loss"):
        per = [getattr(s, metric) for s in result.families.values()]
        assert getattr(result.overall, metric) == pytest.approx(sum(per) / 2)
    answers = generate_answers(model, tok, sets["add"][:2], max_new_tokens=4, batch_size=2)
    rouge = sum(rouge_l(a, ex.output) for a, ex in zip(answers, sets["add"], strict=False)) / 2
    assert result.families["add"].rouge_l == pytest.approx(rouge)
    assert math.isfinite(result.overall.loss) and result.overall.loss > 0
    # each example's scores, in family order, add up to the families' figures
    assert [e.family for e in result.examples] == ["add", "add", "parity", "parity"]
    for fam, s in result.families.items():
        mine = [e for e in result.examples if e.family == fam]
        assert sum(e.rouge_l for e in mine) / len(mine) == pytest.approx(s.rouge_l)
        assert sum(e.exact_match for e in mine) / len(mine) == pytest.approx(s.exact_match)
        assert sum(e.nll for e in mine) / sum(e.tokens for e in mine) == pytest.approx(s.loss)


def test_evaluate_splits_flattens_to_report_metrics(tiny):  # noqa: F811
    splits = tasks.eval_sets(1, seed=0)
    splits = {s: dict(list(fams.items())[:2]) for s, fams in splits.items()}
    cfg = EvalConfig(per_family=1, max_new_tokens=2)
    results = evaluate_splits(tiny.model, tiny.tokenizer, splits, adapter=random_adapter(tiny, 2), config=cfg)
    flat = flat_metrics(results)
    assert set(flat) == {f"{s}/{m}" for s in ("seen", "heldout") for m in ("rouge_l", "exact_match", "loss")}
    assert flat["seen/loss"] == results["seen"].overall.loss


def test_training_the_adapter_lowers_the_evaluated_loss(tiny):  # noqa: F811
    """A few Adam steps on the LoRA factors of the merged model must show up in evaluate()'s loss."""
    model, tok = tiny.model, tiny.tokenizer
    adapter = random_adapter(tiny, 4, seed=1, std=0.05)
    data = tasks.generate("reverse_word", 8, seed=0)
    cfg = EvalConfig(per_family=8, max_new_tokens=2)
    before = evaluate(model, tok, {"r": data}, adapter=adapter, config=cfg).overall.loss
    params = [t.requires_grad_() for p in adapter.modules.values() for t in (p.lora_A, p.lora_B)]
    opt = torch.optim.Adam(params, lr=2e-2)
    ids, labels = (torch.tensor(x) for x in zip(*(encode_example(tok, ex, 256) for ex in data), strict=True))
    end = int((labels != IGNORE_INDEX).any(dim=0).nonzero().max()) + 1  # drop all-padding columns
    for _ in range(25):
        opt.zero_grad()
        _lora_loss(model, adapter, ids[:, :end], labels[:, :end]).backward()
        opt.step()
    for t in params:
        t.requires_grad_(False)
    after = evaluate(model, tok, {"r": data}, adapter=adapter, config=cfg).overall.loss
    assert after < before - 0.3


def _lora_loss(model, adapter, ids, labels):
    from torch.func import functional_call

    weights = {f"{n}.weight": model.get_submodule(n).weight + p.scaling * p.lora_B @ p.lora_A
               for n, p in adapter.modules.items()}
    return functional_call(model, weights, kwargs={"input_ids": ids, "labels": labels}).loss


def test_config_and_adapter_errors(tiny, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="EvalConfig.per_family must be a positive integer, got 0"):
        EvalConfig(per_family=0)
    with pytest.raises(ConfigError, match="EvalConfig.batch_size must be a positive integer, got True"):
        EvalConfig(batch_size=True)
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        evaluate(tiny.model, tiny.tokenizer, {"add": []})
    wrong = random_adapter(tiny, 2)
    name = next(iter(wrong.modules))
    wrong.modules[name.replace("q_proj", "nope")] = wrong.modules.pop(name)
    with pytest.raises(AdapterError, match="is not a linear layer of this model"):
        evaluate(tiny.model, tiny.tokenizer, {"add": EXAMPLES[:1]}, adapter=wrong)
    bad = random_adapter(tiny, 2, targets=("q_proj",))
    bad.modules = {n.replace("q_proj", "v_proj"): p for n, p in bad.modules.items()}
    with pytest.raises(AdapterError, match=r"has shape \(64, 64\), the model's weight \(32, 64\)"):
        evaluate(tiny.model, tiny.tokenizer, {"add": EXAMPLES[:1]}, adapter=bad)
