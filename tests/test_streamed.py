"""A quantized base streamed from its checkpoint (lorafleet.export.compiler.streamed): the bytes of the
fp32-then-quantize path, an fp32 reference computed module by module, and a peak memory that is the quantized
model's, not the fp32 one's."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_families import family_dir

from lorafleet.export.compiler.models import fp32_reference, load_model
from lorafleet.export.compiler.quantize import quantize_model
from lorafleet.export.formats.errors import ModelSpecError
from lorafleet.export.formats.quantization import Quantization


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])  # an untied head; a tied, scaled embedding
@pytest.mark.parametrize("scheme", ["int8", "int4:16"])
def test_a_streamed_base_holds_the_bytes_of_the_fp32_model_quantized(tmp_path, monkeypatch, model_type, scheme):
    from lorafleet.export.compiler import streamed as streaming

    monkeypatch.setattr(streaming, "QUANTIZE_ROWS", 24)  # every matrix read in pieces, the last one short
    path, _ = family_dir(tmp_path, model_type)
    q = Quantization.parse(scheme)
    streamed = load_model(str(path), attn_implementation="eager", quantization=q)
    whole = load_model(str(path), attn_implementation="eager")
    summary = quantize_model(whole.model, q)
    assert streamed.streamed and streamed.quantization == summary
    assert streamed.info == whole.info  # the fp32 model's shape and parameter count
    got, want = streamed.model.state_dict(), whole.model.state_dict()
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    if model_type == "gemma3_text":  # the tied head still shares the embedding's bytes
        assert streamed.model.lm_head.qweight is streamed.model.model.embed_tokens.qweight
    ids = torch.randint(0, 272, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed.model(input_ids=ids).logits, whole.model(input_ids=ids).logits)


def test_the_fp32_reference_is_the_fp32_model_computed_module_by_module(tmp_path):
    path, _ = family_dir(tmp_path, "gemma3_text")  # tied head: it reads the embedding's stored matrix
    ids = torch.randint(0, 272, (1, 16), generator=torch.Generator().manual_seed(1))
    whole = load_model(str(path), attn_implementation="eager").model
    live: list[int] = []
    with torch.no_grad(), fp32_reference(str(path), attn_implementation="eager") as ref:
        hooks = [m.register_forward_pre_hook(lambda *_: live.append(sum(not p.is_meta for p in ref.parameters())))
                 for m in ref.modules()]
        got = ref(input_ids=ids, use_cache=False).logits
        for h in hooks:
            h.remove()
        assert all(p.is_meta for p in ref.parameters())  # nothing kept after the forward
        assert torch.equal(got, whole(input_ids=ids, use_cache=False).logits)
    assert max(live) <= 1  # when a module starts, at most the one just loaded holds real weights


def test_a_checkpoint_without_a_tensor_the_config_needs_is_one_line(tmp_path):
    path, _ = family_dir(tmp_path, "llama")
    shard = next(f for f in sorted(path.glob("*.safetensors")) if "model.norm.weight" in load_file(f))
    tensors = load_file(shard)
    del tensors["model.norm.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ModelSpecError, match=r"has no tensor model\.norm\.weight$"):
        load_model(str(path), quantization=Quantization.parse("int8"))


PEAK = textwrap.dedent("""
    import json, sys
    import torch, torchao.quantization.quant_primitives  # noqa: F401 - imported before the baseline
    from lorafleet.export.compiler import models, quantize, streamed  # noqa: F401
    from lorafleet.export.formats.quantization import Quantization
    from lorafleet.export.runtime.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
    models.meta_model(sys.argv[1])  # the model's code imported (transformers loads it on first use)
    reset_peak_rss()
    before = current_rss_bytes()
    q = Quantization.parse(sys.argv[2])
    lm = models.load_model(sys.argv[1], with_tokenizer=False, quantization=q if q.enabled else None)
    total = sum(float(t.double().sum()) for t in lm.model.state_dict().values())  # every page touched
    print(json.dumps({"peak_above_start": peak_rss_bytes() - before, "streamed": lm.streamed}))
""")


@pytest.mark.slow
def test_a_streamed_load_never_holds_the_fp32_model(tmp_path):
    """A 420 MB (fp32) checkpoint of 24 small layers: loaded int4 (66 MB stored), the process's peak grows by
    well under half of that; loaded in fp32 (the control: what this measurement sees when the model is
    materialized), by all of it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=24,
                                  num_attention_heads=8, num_key_value_heads=8, vocab_size=4096)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path / "m", max_shard_size="50MB")
    del model

    def peak(scheme: str) -> dict:
        # every block of 64 KiB or more its own mapping, returned when freed: the peak counts live memory, not
        # what glibc's heap keeps after a free
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "m"), scheme], capture_output=True,
                              text=True, timeout=300, check=True, env=env)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    streamed, whole = peak("int4"), peak("none")
    assert streamed["streamed"] and not whole["streamed"]
    assert whole["peak_above_start"] > 0.9 * fp32_bytes
    assert streamed["peak_above_start"] < 0.4 * fp32_bytes, (streamed, fp32_bytes)


def test_a_random_checkpoint_is_written_module_by_module_and_seeded(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorafleet.export.compiler import streamed

    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=272,
                                  tie_word_embeddings=True, initializer_range=0.05)
    monkeypatch.setattr(streamed, "SHARD_BYTES", 40_000)  # several shards
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        streamed.write_random_checkpoint(config, tmp_path / name, seed)
    a, b, c = (AutoModelForCausalLM.from_pretrained(tmp_path / n, dtype=torch.float32).state_dict() for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["model.layers.0.mlp.up_proj.weight"],
                                                                       c["model.layers.0.mlp.up_proj.weight"])
    shards = sorted((tmp_path / "a").glob("*.safetensors"))
    assert len(shards) > 2 and not list(tmp_path.glob(".a.*"))  # shards, no staging left behind
    stored = {k for f in shards for k in load_file(f)}
    assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored  # a tied head: once
    assert torch.equal(a["model.norm.weight"], torch.ones(64))  # the model's own init: norms 1, linears N(0, σ)
    assert abs(float(a["model.layers.1.self_attn.q_proj.weight"].std()) - 0.05) < 0.005


def test_a_large_random_spec_streams_from_its_cache_checkpoint(tmp_path, monkeypatch):
    from lorafleet.export.compiler import models

    monkeypatch.setenv("LORAFLEET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "RANDOM_CHECKPOINT_ABOVE", 0)  # random:tiny counts as large here
    q = Quantization.parse("int4:16")
    streamed = load_model("random:tiny", attn_implementation="eager", quantization=q)
    assert streamed.streamed and models.checkpoint_dir("random:tiny") == tmp_path / "cache/models/random/tiny-seed0"
    assert streamed.tokenizer is not None  # a random model's byte tokenizer, as when it is built in memory
    whole = load_model("random:tiny", attn_implementation="eager")  # fp32: read from the same checkpoint
    quantize_model(whole.model, q)
    got, want = streamed.model.state_dict(), whole.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_an_eager_step_recomputes_dequantized_weights_for_the_backward():
    """Inside ``recomputed_dequantization`` the LoRA gradients are the plain autograd ones, while the graph
    keeps no fp32 weight: only the stored bytes and scales are saved for the backward."""
    from lorafleet.export.compiler.lora import attach_lora, lora_modules
    from lorafleet.export.compiler.quantize import recomputed_dequantization
    from lorafleet.export.formats.program import LoraSpec

    model = load_model("random:tiny", attn_implementation="eager", quantization=Quantization.parse("int4:16")).model
    peft = attach_lora(model, LoraSpec(4, ("q_proj", "v_proj"), 8.0, False), seed=0)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    params = [p for m in lora_modules(peft).values() for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]

    def step(recompute: bool) -> tuple[list[torch.Tensor], int]:
        saved: list[torch.Tensor] = []

        def keep(t: torch.Tensor) -> torch.Tensor:
            saved.append(t)
            return t

        recomputing = recomputed_dequantization() if recompute else contextlib.nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), recomputing:
            loss = peft(input_ids=ids, labels=ids, use_cache=False).loss
            grads = list(torch.autograd.grad(loss, params))
        float_weights = sum(t.numel() for t in saved if t.dtype == torch.float32 and t.dim() == 2
                            and t.shape[-1] == model.config.hidden_size and t.shape[0] in (
                                model.config.hidden_size, model.config.intermediate_size, model.config.vocab_size))
        return grads, float_weights

    plain, plain_saved = step(False)
    recomputed, recomputed_saved = step(True)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(plain, recomputed, strict=True))
    assert plain_saved > 0 and recomputed_saved < plain_saved / 4
