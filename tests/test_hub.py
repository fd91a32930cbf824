"""Adapters Hugging Face tools load: a real ``base_model_name_or_path`` (the lorafleet spec kept in the
safetensors metadata) and a model card, for the global adapter a run writes and for `lorafleet train`'s."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import random_adapter

from lorafleet.export.formats.adapter import CONFIG_FILE, for_base_model, read_adapter, write_adapter
from lorafleet.export.formats.hub import CARD_FILE, SPEC_KEY, hf_base_model
from lorafleet.server.checkpoint import Checkpoint, ServerState


@pytest.fixture
def hf_dir(tmp_path):
    """A 2-layer LLaMA saved with `save_pretrained`, shaped like random:tiny (q_proj 64×64, v_proj 32×64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny-llama")
    return tmp_path / "tiny-llama"


def test_a_run_s_global_adapter_loads_with_auto_peft_and_holds_the_same_weights(hf_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    adapter = random_adapter(4)
    state = ServerState(method="flexlora", rounds=3, round=3, global_rank=4, node_ranks={"1": 2, "2": 4},
                        history=[{"loss": 3.0}, {"loss": 2.75}, {"loss": 2.5}])
    Checkpoint(tmp_path / "state", base_model=str(hf_dir)).save(state, adapter)
    global_dir = tmp_path / "state" / "global"
    config = json.loads((global_dir / CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == str(hf_dir.resolve())
    assert read_adapter(global_dir).metadata == {SPEC_KEY: str(hf_dir)}
    model = AutoPeftModelForCausalLM.from_pretrained(str(global_dir))
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == 2 * len(adapter.modules)
    for name, pair in adapter.modules.items():
        assert torch.equal(loaded[f"base_model.model.{name}.lora_A.default.weight"], pair.lora_A)
        assert torch.equal(loaded[f"base_model.model.{name}.lora_B.default.weight"], pair.lora_B)
        layer = model.get_submodule(f"base_model.model.{name}")
        assert layer.scaling["default"] == pytest.approx(pair.scaling)
    card = (global_dir / CARD_FILE).read_text()
    for fact in ("flexlora, 3 federated rounds", f"`{hf_dir.resolve()}`", "rank 4 (devices trained ranks 2, 4)",
                 "lora_alpha 16", "q_proj, v_proj", "| devices' mean training loss, round 3 | 2.5 |"):
        assert fact in card, card
    state_after, reread = Checkpoint(tmp_path / "state").load()  # the card and metadata do not upset a resume
    assert state_after.round == 3 and torch.equal(reread.modules[next(iter(adapter.modules))].lora_A,
                                                  adapter.modules[next(iter(adapter.modules))].lora_A)


@pytest.mark.parametrize("spec, want", [
    ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("random:tiny", None),
    ("model.gguf", None),
    ("HuggingFaceTB/SmolLM2-360M-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct"),
])
def test_base_model_of_a_spec(spec, want):
    assert hf_base_model(spec) == want


def test_a_model_in_the_hub_cache_is_named_by_its_hub_id(tmp_path):
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert hf_base_model(str(snapshot)) == "HuggingFaceTB/SmolLM2-135M"
    (tmp_path / "plain").mkdir()
    assert hf_base_model(str(tmp_path / "plain")) is None  # no config.json: nothing transformers loads


def test_a_random_weight_adapter_says_so_and_keeps_its_spec(tmp_path):
    out = write_adapter(for_base_model(random_adapter(2), "random:tiny"), tmp_path / "a")
    assert json.loads((out / CONFIG_FILE).read_text())["base_model_name_or_path"] is None
    from lorafleet.export.formats.hub import CardFacts, model_card

    card = model_card(CardFacts("random:tiny", "hetlora", 2, [2], 1, ["q_proj"], 16.0, {}))
    assert "base_model:" not in card and "PeftModel.from_pretrained(base" in card and "| metric" not in card
    assert read_adapter(out).metadata == {SPEC_KEY: "random:tiny"}
