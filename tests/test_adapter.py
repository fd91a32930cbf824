"""PEFT adapter directories: exact round trips with PEFT itself, scaling rules, and untrusted input."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from lorafleet.export.compiler.models import load_model
from lorafleet.export.formats.adapter import (
    Adapter,
    LoraPair,
    read_adapter,
    rescale,
    scaling_for,
    truncate,
    write_adapter,
)
from lorafleet.export.formats.errors import AdapterError

IDS = torch.tensor([[5, 17, 42, 99, 3, 200, 7, 1]])


def _peft_model(**lora_kwargs):
    from peft import LoraConfig, get_peft_model

    base = load_model("random:tiny", with_tokenizer=False).model
    torch.manual_seed(0)
    cfg = LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, **lora_kwargs)
    return get_peft_model(base, cfg)


def _peft_deltas(model):
    """ΔW per module as PEFT computes it (its own scaling, its own factors)."""
    out = {}
    for name, mod in model.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            out[name] = mod.get_delta_weight("default")
    return out


@pytest.mark.parametrize("kwargs", [
    {"r": 4, "lora_alpha": 8},
    {"r": 4, "lora_alpha": 8, "use_rslora": True},
    {"r": 4, "lora_alpha": 8, "rank_pattern": {"layers.1.self_attn.q_proj": 2},
     "alpha_pattern": {"v_proj": 3}},
])
def test_read_matches_peft_scaling(tmp_path, kwargs):
    model = _peft_model(**kwargs)
    model.save_pretrained(tmp_path / "a")
    adapter = read_adapter(tmp_path / "a")
    deltas = _peft_deltas(model)
    assert set(adapter.modules) == set(deltas)
    for name, pair in adapter.modules.items():
        torch.testing.assert_close(pair.delta(), deltas[name], rtol=1e-6, atol=1e-7)


def test_write_then_peft_loads_identical_logits(tmp_path):
    from peft import PeftModel

    model = _peft_model(r=4, lora_alpha=8, rank_pattern={"layers.1.self_attn.q_proj": 2})
    model.save_pretrained(tmp_path / "a")
    write_adapter(read_adapter(tmp_path / "a"), tmp_path / "b")
    base = load_model("random:tiny", with_tokenizer=False).model
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "b"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits)


def _toy(r=4, alpha=8.0, rslora=False, out=6, inp=5, seed=0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    s = scaling_for(r, alpha, rslora)
    mods = {f"model.layers.{i}.self_attn.q_proj": LoraPair(torch.randn(r, inp, generator=g),
                                                           torch.randn(out, r, generator=g), s)
            for i in range(2)}
    return Adapter(mods, {"r": r, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": ["q_proj"]})


@pytest.mark.parametrize("rslora", [False, True])
def test_truncate_keeps_the_leading_components_at_the_same_scaling(tmp_path, rslora):
    a = _toy(r=6, rslora=rslora)
    t = truncate(a, 2)
    for name, p in a.modules.items():
        expect = p.scaling * p.lora_B[:, :2] @ p.lora_A[:2]
        torch.testing.assert_close(t.modules[name].delta(), expect)
    write_adapter(t, tmp_path / "t")
    back = read_adapter(tmp_path / "t")
    for name in a.modules:
        torch.testing.assert_close(back.modules[name].delta(), t.modules[name].delta())
    with pytest.raises(AdapterError, match="cannot truncate a rank-6 adapter to rank 7"):
        truncate(a, 7)


def test_rescale_preserves_delta():
    a = _toy(r=4, alpha=8)
    b = rescale(a, 32.0, use_rslora=True)
    for name in a.modules:
        assert math.isclose(b.modules[name].scaling, 32 / 2)
        torch.testing.assert_close(b.modules[name].delta(), a.modules[name].delta())


def test_mixed_ranks_and_scalings_round_trip_exactly(tmp_path):
    a = _toy(r=4, alpha=8)
    name = next(iter(a.modules))
    p = a.modules[name]
    a.modules[name] = LoraPair(p.lora_A[:3], p.lora_B[:, :3], 0.7)
    write_adapter(a, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["alpha_pattern"]
    back = read_adapter(tmp_path / "m")
    for n in a.modules:
        torch.testing.assert_close(back.modules[n].lora_A, a.modules[n].lora_A)
        torch.testing.assert_close(back.modules[n].delta(), a.modules[n].delta())


def test_write_is_atomic_and_refuses_to_clobber(tmp_path):
    a = _toy()
    write_adapter(a, tmp_path / "o")
    before = (tmp_path / "o" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(Exception, match="already exists"):
        write_adapter(_toy(seed=1), tmp_path / "o")
    assert (tmp_path / "o" / "adapter_model.safetensors").read_bytes() == before
    write_adapter(_toy(seed=1), tmp_path / "o", overwrite=True)
    assert (tmp_path / "o" / "adapter_model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


# --- untrusted input ------------------------------------------------------------------------------------

def _write_raw(d, tensors, config=None):
    d.mkdir()
    save_file(tensors, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps(config or {"r": 2, "lora_alpha": 4}))
    return d


def _pair(r=2):
    return {"base_model.model.m.q_proj.lora_A.weight": torch.ones(r, 3),
            "base_model.model.m.q_proj.lora_B.weight": torch.ones(4, r)}


def test_missing_directory(tmp_path):
    with pytest.raises(AdapterError, match="adapter directory not found"):
        read_adapter(tmp_path / "nope")


def test_pickle_only_directory_is_refused_unread(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n")  # would be dangerous to unpickle
    (d / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match="never unpickles"):
        read_adapter(d)


def test_truncated_safetensors(tmp_path):
    d = _write_raw(tmp_path / "t", _pair())
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(AdapterError, match="corrupt or truncated safetensors"):
        read_adapter(d)


def test_garbage_safetensors(tmp_path):
    d = _write_raw(tmp_path / "g", _pair())
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterError, match="corrupt or truncated safetensors"):
        read_adapter(d)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(tmp_path, bad):
    t = _pair()
    t["base_model.model.m.q_proj.lora_B.weight"][1, 1] = bad
    with pytest.raises(AdapterError, match="NaN or Inf"):
        read_adapter(_write_raw(tmp_path / "n", t))


def test_extra_key(tmp_path):
    t = {**_pair(), "base_model.model.lm_head.weight": torch.ones(2, 2)}
    with pytest.raises(AdapterError, match="unexpected tensor"):
        read_adapter(_write_raw(tmp_path / "x", t))


def test_missing_half(tmp_path):
    t = _pair()
    del t["base_model.model.m.q_proj.lora_B.weight"]
    with pytest.raises(AdapterError, match="lacks lora_B"):
        read_adapter(_write_raw(tmp_path / "h", t))


def test_inconsistent_shapes(tmp_path):
    t = {"base_model.model.m.q_proj.lora_A.weight": torch.ones(2, 3),
         "base_model.model.m.q_proj.lora_B.weight": torch.ones(4, 3)}
    with pytest.raises(AdapterError, match="inconsistent shapes"):
        read_adapter(_write_raw(tmp_path / "s", t))


def test_rank_disagrees_with_config(tmp_path):
    with pytest.raises(AdapterError, match="rank 2 but its config says 8"):
        read_adapter(_write_raw(tmp_path / "r", _pair(), {"r": 8, "lora_alpha": 16}))


def test_integer_tensors_are_refused(tmp_path):
    t = {k: v.to(torch.int32) for k, v in _pair().items()}
    with pytest.raises(AdapterError, match="not floating point"):
        read_adapter(_write_raw(tmp_path / "i", t))


def test_bad_config_json(tmp_path):
    d = _write_raw(tmp_path / "c", _pair())
    (d / "adapter_config.json").write_text("{nope")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_adapter(d)
