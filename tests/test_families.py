"""Model families: each one lorafleet lists exports from a 2-layer Hugging Face directory and verifies.

Each family's directory is what ``save_pretrained`` writes for a real checkpoint (sharded safetensors and an
index), with the family's own features switched on at a small size: a sliding window shorter than the
sequence (Gemma 2/3, Mistral), a NoPE layer (SmolLM3), partial rotary embeddings and fused projections
(Phi-3). LoRA goes on every linear of the decoder, by the family's own names, so each projection's
gradient is checked. ``Family.verified`` (what ``lorafleet models`` prints) is what runs here, except the
Llama ExecuTorch pairs, which the export tests named in :data:`ELSEWHERE` run on ``random:tiny``.
"""

from __future__ import annotations

import json

import pytest

from lorafleet.export.compiler.architectures import FAMILIES, layer_shapes
from lorafleet.export.compiler.pipeline import ExportConfig, run_export
from lorafleet.export.formats.package import open_package

pytestmark = pytest.mark.slow

SEQ_LEN = 16
WINDOW = 8  # < SEQ_LEN: the sliding-window masks really cut
FEATURES = {  # per family: what makes the small model use the family's distinctive paths
    "gemma2": {"sliding_window": WINDOW, "query_pre_attn_scalar": 16},
    "gemma3_text": {"sliding_window": WINDOW, "sliding_window_pattern": 2, "query_pre_attn_scalar": 16},
    "mistral": {"sliding_window": WINDOW},
    "smollm3": {"no_rope_layer_interval": 2},
    "phi3": {"partial_rotary_factor": 0.5},
}


def family_dir(root, model_type: str, seed: int = 0, features: dict | None = None):
    """A 2-layer random model of ``model_type`` saved as a sharded Hugging Face directory (``features``: the
    family's settings instead of :data:`FEATURES`' entry)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=272,
                                  max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  **(FEATURES.get(model_type, {}) if features is None else features))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = root / model_type
    model.save_pretrained(path, max_shard_size="100KB")
    return path, model


ELSEWHERE = {("llama", "executorch", "none"): "test_export_targets.py",
             ("llama", "executorch", "int4"): "test_quantize.py"}


def runtimes(model_type: str, quantize: str) -> tuple[str, ...]:
    return tuple(rt for rt in FAMILIES[model_type].runtimes_verified(quantize)
                 if (model_type, rt, quantize) not in ELSEWHERE)


CASES = [(t, q) for t in sorted(FAMILIES) for q in ("none", "int4") if runtimes(t, q)]


def test_what_is_verified_elsewhere_is_exported_there():
    from pathlib import Path

    for (model_type, runtime, quantize), name in ELSEWHERE.items():
        assert (runtime, quantize) in FAMILIES[model_type].verified
        text = (Path(__file__).parent / name).read_text()
        assert "run_export(ExportConfig(model=\"random:tiny\"" in text and runtime in text
        assert quantize == "none" or f'quantize="{quantize}' in text


@pytest.mark.parametrize("model_type,quantize", CASES)
def test_every_family_exports_and_verifies(tmp_path, model_type, quantize):
    family = FAMILIES[model_type]
    rts = runtimes(model_type, quantize)
    src, model = family_dir(tmp_path, model_type)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the checkpoint is sharded, as a real one is"
    if "sliding_window" in FEATURES.get(model_type, {}):
        assert model.config.sliding_window == WINDOW
        assert "sliding_attention" in (getattr(model.config, "layer_types", None) or ["sliding_attention"])
    targets = tuple(layer_shapes(model))  # every linear of a layer, in the family's names
    assert set(family.default_targets) <= set(targets)
    out = tmp_path / "pkg"
    result = run_export(ExportConfig(model=str(src), ranks=(4,), target_modules=targets, out=out,
                                     seq_len=SEQ_LEN, runtimes=rts, quantize=f"{quantize}:16"
                                     if quantize == "int4" else quantize))
    m = result.manifest
    assert m.model.model_type == model_type and set(m.model.module_shapes) == set(targets)
    assert m.verification["passed"]
    grads = {c["artifact"] for c in m.verification["checks"] if c["metric"] == "grad_rel_max_abs_diff"}
    assert grads == {f"{rt}_training" for rt in rts}, m.verification["checks"]
    modules = set(open_package(out).initial_adapter(4).modules)
    assert {name.rsplit(".", 1)[-1] for name in modules} == set(targets) and len(modules) == 2 * len(targets)


def test_a_fleet_adapts_the_family_s_own_projections_by_default(tmp_path):
    from lorafleet.fleet.config import FleetConfig

    src, _ = family_dir(tmp_path, "phi3")

    def targets(model: str, **kw):
        return FleetConfig(devices=2, rounds=1, model=model, method="hetlora", seed=0, out=tmp_path / "o",
                           **kw).target_modules

    assert targets(str(src)) == ("qkv_proj",)
    assert targets("random:tiny") == ("q_proj", "v_proj") == targets("random:gemma-3-1b")
    assert targets(str(src), target_modules=("o_proj",)) == ("o_proj",)


def test_an_image_text_gemma3_checkpoint_loads_its_language_model(tmp_path):
    """Gemma 3 4B and up are published as image-text checkpoints: the text model is loaded from their
    language-model tensors (vision tower left out) and computes what the full model does on text."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from lorafleet.export.compiler.models import load_model

    cfg = Gemma3Config(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=272,
                                        sliding_window=WINDOW, max_position_embeddings=256),
                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=28, patch_size=14),
                       mm_tokens_per_image=4, image_token_index=271, boi_token_index=269, eoi_token_index=270)
    torch.manual_seed(0)
    full = Gemma3ForConditionalGeneration(cfg).eval()
    full.save_pretrained(tmp_path / "g3", max_shard_size="100KB")
    lm = load_model(str(tmp_path / "g3"), with_tokenizer=False)
    assert lm.info.model_type == "gemma3_text" and lm.info.architecture == "Gemma3ForCausalLM"
    assert lm.info.num_parameters < sum(p.numel() for p in full.parameters())  # no vision tower
    ids = torch.randint(3, 260, (1, SEQ_LEN))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, full(input_ids=ids).logits)
