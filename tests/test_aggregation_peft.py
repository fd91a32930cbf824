"""Against PEFT itself: clients saved by PEFT, the global adapter loaded by ``PeftModel.from_pretrained``, and
FlexLoRA checked against PEFT's ``add_weighted_adapter(combination_type="svd")``."""

import pytest
import torch
from agg_helpers import rel_err

from lorafleet.cli import main
from lorafleet.export.compiler.models import load_model
from lorafleet.export.formats.adapter import read_adapter

pytestmark = pytest.mark.slow
CLIENTS = [{"r": 2, "lora_alpha": 16}, {"r": 8, "lora_alpha": 8}, {"r": 4, "lora_alpha": 4, "use_rslora": True}]
WEIGHTS = [3.0, 1.0, 2.0]


def _base():
    return load_model("random:tiny", with_tokenizer=False).model


def _peft_deltas(model, adapter_name):
    return {name: mod.get_delta_weight(adapter_name).double()
            for name, mod in model.base_model.model.named_modules()
            if hasattr(mod, "lora_A") and adapter_name in mod.lora_A}


@pytest.fixture(scope="module")
def peft_clients(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("peft_clients")
    dirs = []
    for i, kw in enumerate(CLIENTS):
        torch.manual_seed(i)
        cfg = LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, **kw)
        get_peft_model(_base(), cfg).save_pretrained(root / f"c{i}")
        dirs.append(root / f"c{i}")
    return dirs


def test_flexlora_matches_peft_svd_merge_and_loads_in_peft(tmp_path, peft_clients):
    from peft import PeftModel

    assert main(["aggregate", "--method", "flexlora", "--weights", "3,1,2", "--out", str(tmp_path / "g"),
                 *map(str, peft_clients)]) == 0
    ours = _peft_deltas(PeftModel.from_pretrained(_base(), str(tmp_path / "g"), adapter_name="g"), "g")

    model = PeftModel.from_pretrained(_base(), str(peft_clients[0]), adapter_name="c0")
    for i, d in enumerate(peft_clients[1:], start=1):
        model.load_adapter(str(d), adapter_name=f"c{i}")
    total = sum(WEIGHTS)
    model.add_weighted_adapter(["c0", "c1", "c2"], [w / total for w in WEIGHTS], "svd", combination_type="svd",
                               svd_rank=8)
    theirs = _peft_deltas(model, "svd")
    assert ours.keys() == theirs.keys() and len(ours) == 6
    for name in ours:
        assert rel_err(ours[name], theirs[name]) < 1e-4, name


@pytest.mark.parametrize("method", ["hetlora", "flexlora"])
def test_peft_applies_the_written_scalings_exactly(tmp_path, peft_clients, method):
    """Mixed ranks, alphas and rsLoRA in; PEFT's ΔW of the written global adapter equals ours."""
    from peft import PeftModel

    assert main(["aggregate", "--method", method, "--out", str(tmp_path / "g"), *map(str, peft_clients)]) == 0
    ours = read_adapter(tmp_path / "g")
    peft = _peft_deltas(PeftModel.from_pretrained(_base(), str(tmp_path / "g"), adapter_name="g"), "g")
    for name, pair in ours.modules.items():
        assert rel_err(peft[name], pair.delta()) < 1e-6
    assert main(["distribute", "--rank", "2", "--out", str(tmp_path / "d"), str(tmp_path / "g")]) == 0
    cut = _peft_deltas(PeftModel.from_pretrained(_base(), str(tmp_path / "d"), adapter_name="d"), "d")
    for name, pair in ours.modules.items():
        assert rel_err(cut[name], pair.scaling * pair.lora_B[:, :2] @ pair.lora_A[:2]) < 1e-6
