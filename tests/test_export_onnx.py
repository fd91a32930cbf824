"""ONNX Runtime training artifacts of the shared tiny package, checked against eager transformers + PEFT."""

import json
import math

import numpy as np
import onnx
import pytest
import torch

from lorafleet.export.compiler.lora import attach_lora, load_lora, lora_modules
from lorafleet.export.compiler.loss import CausalLMLoss, example_batch
from lorafleet.export.compiler.models import load_model
from lorafleet.export.formats.adapter import read_adapter, write_adapter
from lorafleet.export.formats.errors import AdapterError, ConfigError, PackageError
from lorafleet.export.formats.package import open_package
from lorafleet.export.formats.program import LoraSpec
from lorafleet.export.runtime.onnx import ADAMW, OnnxTrainer
from tests.export_helpers import random_adapter


def _eager(rank, adapter):
    """The eager PEFT model the package was exported from, holding ``adapter``."""
    base = load_model("random:tiny", attn_implementation="eager", with_tokenizer=False).model
    spec = LoraSpec(rank, ("q_proj", "v_proj"), 16.0)
    model = attach_lora(base, spec)
    load_lora(model, spec, adapter)
    return model


def _hf_adamw(params, grads, state, lr, betas=ADAMW["betas"], eps=ADAMW["eps"]):
    """Hugging Face AdamW (ORT's adam_mode=1): step = lr·sqrt(1-β2^t)/(1-β1^t), denom = sqrt(v) + eps."""
    state["t"] = state.get("t", 0) + 1
    t, (b1, b2) = state["t"], betas
    for name, g in grads.items():
        m = state.setdefault(("m", name), torch.zeros_like(g))
        v = state.setdefault(("v", name), torch.zeros_like(g))
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        params[name] = params[name] - step * m / (v.sqrt() + eps)


def _batch(pkg):
    m = pkg.manifest
    return example_batch(m.model.vocab_size, m.batch_size, m.seq_len, seed=7)


def test_package_verification_covers_every_rank(tiny_package):
    pkg = open_package(tiny_package)
    v = pkg.manifest.verification
    assert v["passed"] is True
    seen = {(c["rank"], c["metric"]) for c in v["checks"] if c["artifact"] == "onnx_training"}
    for r in pkg.ranks:
        assert {(r, "loss_abs_diff"), (r, "grad_rel_max_abs_diff"), (r, "lora_max_abs_diff")} <= seen
    assert all(c["passed"] and c["value"] <= c["limit"] for c in v["checks"])


def test_frozen_weights_are_stored_once(tiny_package):
    pkg = open_package(tiny_package)
    m = pkg.manifest
    foundation = pkg.foundation("onnx")
    params = m.model.num_parameters * 4  # the base model's, fp32
    # every frozen tensor exactly once (the tied embedding too: a second copy would add 19 %), 64-byte
    # aligned; tensors under 1 KB (RMSNorm weights here) stay inline in the graphs
    assert 0.99 * params <= foundation.stat().st_size <= params + 64 * 64
    for r in pkg.ranks:
        d = pkg.path_of(r, "onnx_training")
        own = sum(e.size for f, e in m.rank(r).files.items() if f.startswith("onnx/"))
        assert own < foundation.stat().st_size / 2
        for name in ("training_model.onnx", "eval_model.onnx"):
            model = onnx.load(str(d / name), load_external_data=False)
            locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
            assert locations == {"../foundation.data"}
            assert not any(".lora_" in t.name for t in model.graph.initializer)  # LoRA lives in the checkpoint
            assert not any(n.op_type == "Transpose" and n.input[0] in {t.name for t in model.graph.initializer}
                           for n in model.graph.node)  # weights stored in the layout the MatMul reads


def test_initial_lora_matches_the_package_adapter(tiny_package):
    pkg = open_package(tiny_package)
    for r in pkg.ranks:
        got, want = OnnxTrainer.from_package(pkg, r).get_lora(), pkg.initial_adapter(r)
        assert set(got.modules) == set(want.modules)
        for name, pair in want.modules.items():
            assert torch.equal(got.modules[name].lora_A, pair.lora_A)
            assert torch.equal(got.modules[name].lora_B, pair.lora_B)  # PEFT init: zeros
            assert got.modules[name].scaling == pytest.approx(16.0 / r)


def test_two_adamw_steps_match_eager(tiny_package):
    pkg = open_package(tiny_package)
    probe = random_adapter(4, seed=5)
    trainer = OnnxTrainer.from_package(pkg, 4, lr=1e-2)
    trainer.set_lora(probe)
    model = _eager(4, probe)
    loss_fn = CausalLMLoss(model)
    layers = lora_modules(model)
    params = {(n, w): getattr(layers[n], f"lora_{w}")["default"].weight for n in layers for w in "AB"}
    values = {k: p.detach().clone() for k, p in params.items()}
    state: dict = {}
    ids, labels = _batch(pkg)
    for _ in range(2):
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(values[k])
        for p in params.values():
            p.grad = None
        eager_loss = loss_fn(ids, labels)
        eager_loss.backward()
        _hf_adamw(values, {k: p.grad for k, p in params.items()}, state, lr=1e-2)
        assert trainer.step(ids, labels) == pytest.approx(eager_loss.item(), abs=1e-5)
    got = trainer.get_lora()
    for (name, which), want in values.items():
        have = getattr(got.modules[name], f"lora_{which}")
        torch.testing.assert_close(have, want, atol=2e-5, rtol=1e-4)


def test_set_lora_restarts_adamw(tiny_package):
    pkg = open_package(tiny_package)
    probe = random_adapter(2, seed=9)
    ids, labels = _batch(pkg)
    trainer = OnnxTrainer.from_package(pkg, 2, lr=1e-2)
    trainer.set_lora(probe)
    trainer.step(ids, labels)
    first = trainer.get_lora()
    trainer.step(ids, labels)
    trainer.step(ids, labels)
    trainer.set_lora(probe)  # a new round: same weights, fresh moments and step count
    trainer.step(ids, labels)
    again = trainer.get_lora()
    for name, pair in first.modules.items():
        assert torch.equal(again.modules[name].lora_A, pair.lora_A)
    trainer.set_lora(probe, reset_optimizer=False)
    trainer.step(ids, labels)
    kept = trainer.get_lora()
    assert any(not torch.equal(kept.modules[n].lora_A, p.lora_A) for n, p in first.modules.items())


def test_set_lora_truncates_and_rescales_a_larger_adapter(tiny_package):
    pkg = open_package(tiny_package)
    big = random_adapter(8, lora_alpha=32.0, seed=11)  # scaling 4, rank 8
    trainer = OnnxTrainer.from_package(pkg, 4)
    trainer.set_lora(big)
    got = trainer.get_lora()
    assert got.r == 4 and got.config["lora_alpha"] == 16.0
    for name, pair in big.modules.items():
        want = pair.scaling * pair.lora_B[:, :4] @ pair.lora_A[:4]  # first 4 components of ΔW
        torch.testing.assert_close(got.modules[name].delta(), want, atol=1e-6, rtol=1e-5)


def test_set_lora_rejects_bad_adapters(tiny_package):
    pkg = open_package(tiny_package)
    trainer = OnnxTrainer.from_package(pkg, 8)
    with pytest.raises(AdapterError, match="rank 4, below the requested rank 8"):
        trainer.set_lora(random_adapter(4))
    one_layer = random_adapter(8, layers=1)
    with pytest.raises(AdapterError, match="modules do not match the package .*missing"):
        trainer.set_lora(one_layer)
    ids, labels = _batch(pkg)
    with pytest.raises(ConfigError, match=r"input_ids must have shape \(1, 16\), got \(1, 8\)"):
        trainer.step(ids[:, :8], labels[:, :8])
    with pytest.raises(PackageError, match="lacks ORT training artifacts"):
        OnnxTrainer(pkg.path_of(8, "adapter"), LoraSpec(8, ("q_proj",), 16.0))


def test_trained_weights_load_in_peft(tiny_package, tmp_path):
    from peft import PeftModel

    pkg = open_package(tiny_package)
    trainer = OnnxTrainer.from_package(pkg, 4, lr=5e-2)
    trainer.set_lora(random_adapter(4, seed=2))
    ids, labels = _batch(pkg)
    losses = [trainer.step(ids, labels) for _ in range(8)]
    assert losses[-1] < losses[0]
    trained = trainer.get_lora()
    write_adapter(trained, tmp_path / "trained")
    assert json.loads((tmp_path / "trained" / "adapter_config.json").read_text())["r"] == 4
    base = load_model("random:tiny", attn_implementation="eager", with_tokenizer=False).model
    peft = PeftModel.from_pretrained(base, str(tmp_path / "trained"))
    with torch.no_grad():
        eager = float(CausalLMLoss(peft)(ids, labels))
    assert trainer.loss(ids, labels) == pytest.approx(eager, abs=1e-5)
    assert read_adapter(tmp_path / "trained").r == 4


def test_eval_graph_gives_the_training_loss(tiny_package):
    pkg = open_package(tiny_package)
    ids, labels = _batch(pkg)
    probe = random_adapter(2, seed=4)
    with_eval = OnnxTrainer.from_package(pkg, 2, with_eval=True)
    plain = OnnxTrainer.from_package(pkg, 2)
    for t in (with_eval, plain):
        t.set_lora(probe)
    assert with_eval.loss(ids, labels) == pytest.approx(plain.loss(ids, labels), abs=1e-6)
    assert np.isfinite(plain.loss(ids, labels))
