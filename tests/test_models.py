"""The foundation-model loader: every spec kind, and every bad-spec path."""

import struct
from pathlib import Path

import pytest
import torch

from lorafleet.export.compiler.models import EMBEDDED_NAME, check_gguf, list_models, load_model, parse_spec
from lorafleet.export.formats.errors import ModelSpecError


def test_random_tiny_is_seeded_and_described():
    a = load_model("random:tiny")
    b = load_model("random:tiny")
    c = load_model("random:tiny", seed=1)
    pa, pb, pc = (dict(m.model.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)
    info = a.info
    assert (info.num_layers, info.hidden_size, info.architecture) == (2, 64, "LlamaForCausalLM")
    assert info.num_parameters == sum(p.numel() for p in a.model.parameters())
    assert info.module_shapes["q_proj"] == (64, 64) and info.module_shapes["k_proj"] == (32, 64)


def test_random_tiny_tokenizer_round_trips_and_formats_chat():
    tok = load_model("random:tiny").tokenizer
    text = "Grüße, 12 + 30 = 42!"
    ids = tok(text)["input_ids"]
    assert max(ids) < 256 and tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") == 258


@pytest.mark.parametrize("arch,layers,hidden,vocab", [
    ("smollm2-360m", 32, 960, 49152), ("smollm2-1.7b", 24, 2048, 49152),
    ("llama-3.2-1b", 16, 2048, 128256), ("qwen2.5-0.5b", 24, 896, 151936),
])
def test_published_architectures_build_with_their_shapes(arch, layers, hidden, vocab):
    from transformers import AutoConfig

    from lorafleet.export.compiler.architectures import ARCHITECTURES

    cfg = AutoConfig.for_model(ARCHITECTURES[arch].model_type, **ARCHITECTURES[arch].hf_config_dict())
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (layers, hidden, vocab)


def test_every_published_shape_matches_the_model_it_builds():
    """The config-only shapes (what planning uses) equal the linears of the model built on the meta device,
    fused Phi-3 projections included; parameter counts are the published sizes' (e.g. Llama-3.1-8B 8.03B)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorafleet.export.compiler.architectures import ARCHITECTURES, FAMILIES, layer_shapes, module_shapes
    from lorafleet.export.compiler.models import parameter_count

    for arch in ARCHITECTURES.values():
        assert arch.model_type in FAMILIES and arch.source
        cfg = AutoConfig.for_model(arch.model_type, **arch.hf_config_dict())
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        assert module_shapes(cfg) == layer_shapes(model), arch.name
        assert set(FAMILIES[arch.model_type].default_targets) <= set(module_shapes(cfg)), arch.name
    published = {"llama-3.1-8b": 8.03e9, "qwen3-8b": 8.19e9, "gemma-2-2b": 2.61e9, "phi-3.5-mini": 3.82e9,
                 "qwen2.5-7b": 7.62e9, "mistral-7b": 7.25e9, "gemma-3-1b": 1.00e9, "smollm3-3b": 3.08e9}
    for name, n in published.items():
        assert abs(parameter_count(name) - n) < 0.006e9, name


def test_an_fp32_model_larger_than_free_memory_is_refused_in_one_line(monkeypatch):
    import psutil

    from lorafleet.export.compiler import models

    class Small:
        available = 2 * 2**30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Small())
    with pytest.raises(ModelSpecError, match=r"random:qwen3-8b has 8.19B parameters: 30.5 GiB in fp32") as exc:
        models.load_model("random:qwen3-8b")
    assert "\n" not in str(exc.value)
    models.load_model("random:tiny")  # 0.3 MB fits


def test_a_directory_too_large_for_memory_is_refused_before_loading(tmp_path, monkeypatch):
    import psutil

    from lorafleet.export.compiler import models

    src = load_model("random:tiny")
    src.model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    assert models.checkpoint_parameters(tmp_path / "m") == src.info.num_parameters  # tied head stored once

    class Small:
        available = 100_000

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Small())
    with pytest.raises(ModelSpecError, match=r"has 0.09M parameters: 0.0 GiB in fp32, more than 85% of"):
        load_model(str(tmp_path / "m"))
    shard = sorted((tmp_path / "m").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:5])  # truncated: no header
    with pytest.raises(ModelSpecError, match=rf"^corrupt safetensors file {shard}: [^\n]*$"):
        models.checkpoint_parameters(tmp_path / "m")


def test_a_hub_id_resolves_from_the_local_hugging_face_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelSpecError, match=r"^acme/tiny-lm is not in the local Hugging Face cache .*"
                                             r"`hf download acme/tiny-lm`"):
        parse_spec("acme/tiny-lm")
    snap = tmp_path / "hub" / "models--acme--tiny-lm" / "snapshots" / "0123abcd"
    src = load_model("random:tiny")
    src.model.save_pretrained(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0123abcd")
    spec = parse_spec("acme/tiny-lm")
    assert spec.kind == "hf_dir" and spec.path == snap and spec.text == "acme/tiny-lm"
    back = load_model("acme/tiny-lm", with_tokenizer=False)
    assert back.info.spec == "acme/tiny-lm" and back.info.num_parameters == src.info.num_parameters


def test_hf_directory_round_trip(tmp_path):
    src = load_model("random:tiny")
    src.model.save_pretrained(tmp_path / "m")
    src.tokenizer.save_pretrained(tmp_path / "m")
    back = load_model(str(tmp_path / "m"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(src.model(ids).logits, back.model(ids).logits)
    assert back.tokenizer is not None


def test_list_models_names_every_required_spec():
    specs = {row["spec"] for row in list_models()}
    for s in [EMBEDDED_NAME, "random:tiny", "random:smollm2-135m", "random:smollm2-360m",
              "random:smollm2-1.7b", "random:llama-3.2-1b", "random:qwen2.5-0.5b", "random:llama-3.2-3b",
              "random:llama-3.1-8b", "random:qwen3-0.6b", "random:qwen3-8b", "random:gemma-2-2b",
              "random:gemma-3-1b", "random:phi-3.5-mini", "random:phi-4-mini", "random:smollm3-3b",
              "random:mistral-7b", "random:ministral-8b"]:
        assert s in specs
    rows = {row["spec"]: row for row in list_models()}
    assert rows["random:phi-4-mini"]["family"].startswith("Phi") and rows["random:phi-4-mini"]["parameters"] == "3.84B"
    assert "executorch: fp32" in rows["random:phi-4-mini"]["verified"]


# --- bad specs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,match", [
    ("", "empty model spec"),
    ("gpt-17", "unknown model spec 'gpt-17'"),
    ("random:gpt-17", "unknown architecture 'gpt-17'"),
    ("/no/such/dir", "model path not found"),
    ("/no/such/model.gguf", "GGUF file not found"),
])
def test_bad_specs_name_the_problem(spec, match):
    with pytest.raises(ModelSpecError, match=match):
        parse_spec(spec)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelSpecError, match="no config.json"):
        parse_spec(str(tmp_path))


def test_file_that_is_not_gguf_is_refused(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"hello")
    with pytest.raises(ModelSpecError, match="neither a .gguf file nor"):
        parse_spec(str(f))


def test_gguf_with_bad_magic_is_corrupt(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"NOTGGUF" + bytes(100))
    with pytest.raises(ModelSpecError, match="bad magic"):
        parse_spec(str(f))


def test_gguf_with_garbage_header_is_corrupt(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\xff" * 64)
    with pytest.raises(ModelSpecError, match="corrupt"):
        parse_spec(str(f))


def _write_small_gguf(path: Path) -> None:
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.ones((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_truncated_gguf_is_detected(tmp_path):
    good = tmp_path / "good.gguf"
    _write_small_gguf(good)
    check_gguf(good)  # complete: no error
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ModelSpecError, match="truncated"):
        parse_spec(str(cut))


def test_a_model_of_no_decoder_family_is_refused_in_one_line(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "gpt2")
    with pytest.raises(ModelSpecError, match=r"GPT2LMHeadModel is not a decoder lorafleet exports") as exc:
        load_model(str(tmp_path / "gpt2"), with_tokenizer=False)
    assert "\n" not in str(exc.value)
