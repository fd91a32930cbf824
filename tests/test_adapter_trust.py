"""Adapters read from disk are untrusted: each case is a one-line error (or handled as PEFT handles it), never
accepted wrongly; offline `aggregate` / `distribute` apply the same bounds as the server; nothing saved is
overwritten or left half-written."""

from __future__ import annotations

import json
import time

import pytest
import torch
from agg_helpers import make_adapter, tree_digest, write_raw

from lorafleet.cli import main
from lorafleet.export.formats.adapter import PEFT_DEFAULT_ALPHA, read_adapter, write_adapter
from lorafleet.export.formats.atomic import atomic_dir
from lorafleet.export.formats.errors import AdapterError, LorafleetError

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def raw_client(tmp_path, name="c", *, config=None, keys=None, scale=1.0):
    """A client directory with lora factors for q_proj (rank 2), optionally renamed keys / edited config."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 20, generator=g) * scale, torch.randn(24, 2, generator=g) * scale
    tensors = keys(a, b) if keys else {f"base_model.model.{Q}.lora_A.weight": a,
                                       f"base_model.model.{Q}.lora_B.weight": b}
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 16, "target_modules": ["q_proj"], **(config or {})}
    return write_raw(tmp_path / name, tensors, cfg)


@pytest.mark.parametrize(("config", "match"), [
    ({"target_modules": ["v_proj"]}, r"module model.layers.0.self_attn.q_proj is not covered by target_modules"),
    ({"target_modules": r".*\.k_proj"}, "is not covered by target_modules"),
    ({"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, "is not covered by target_modules"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save \['lm_head'\] is not supported"),
    ({"rank_pattern": {"q_proj[": 4}}, r"rank_pattern 'q_proj\[' is not a valid regular expression"),
    ({"alpha_pattern": {"(": 4}}, r"alpha_pattern '\(' is not a valid regular expression"),
    ({"target_modules": "(("}, "target_modules '\\(\\(' is not a valid regular expression"),
])
def test_configs_peft_would_misread_are_refused(tmp_path, config, match):
    with pytest.raises(AdapterError, match=match):
        read_adapter(raw_client(tmp_path, config=config))


def test_targets_are_matched_as_peft_matches_them(tmp_path):
    for i, targets in enumerate((["q_proj"], [Q], r".*\.q_proj", "all-linear", ["self_attn.q_proj"])):
        assert Q in read_adapter(raw_client(tmp_path, f"c{i}", config={"target_modules": targets})).modules


def test_a_pathological_pattern_is_refused_quickly(tmp_path):
    client = raw_client(tmp_path, config={"rank_pattern": {r"(.*?){25}\d": 4}})  # exponential backtracking
    start = time.monotonic()
    with pytest.raises(AdapterError, match="pathological regular expression"):
        read_adapter(client)
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("other", [f"{Q}.lora_A.weight", f"base_model.model.{Q}.lora_A.default.weight"])
def test_a_module_stored_under_two_keys_is_refused(tmp_path, other):
    def keys(a, b):
        return {f"base_model.model.{Q}.lora_A.weight": a, other: a.clone() * 2,
                f"base_model.model.{Q}.lora_B.weight": b}

    with pytest.raises(AdapterError, match=r"lora_A is stored under two keys"):
        read_adapter(raw_client(tmp_path, keys=keys))


def test_a_config_without_lora_alpha_gets_peft_s_default(tmp_path):
    from peft import LoraConfig

    client = raw_client(tmp_path)
    cfg = json.loads((client / "adapter_config.json").read_text())
    del cfg["lora_alpha"]
    (client / "adapter_config.json").write_text(json.dumps(cfg))
    assert LoraConfig().lora_alpha == PEFT_DEFAULT_ALPHA
    assert read_adapter(client).modules[Q].scaling == LoraConfig().lora_alpha / 2


@pytest.mark.parametrize("scale", [1e19, 1e30])
def test_offline_aggregate_refuses_huge_clients(tmp_path, capsys, scale):
    good = [write_adapter(make_adapter(2, seed=i), tmp_path / f"g{i}") for i in range(2)]
    bad = write_adapter(make_adapter(2, seed=5), tmp_path / "bad")
    adapter = read_adapter(bad)
    for pair in adapter.modules.values():
        pair.lora_A.mul_(scale)
    write_adapter(adapter, bad, overwrite=True)
    before = tree_digest(tmp_path)
    for method in ("fedavg", "hetlora", "flexlora"):
        code, _, err = run_cli(capsys, "aggregate", "--method", method, "--out", tmp_path / "out", *good, bad)
        assert code == 1 and err.count("\n") == 1 and "above the bound" in err and str(bad) in err, err
    assert not (tmp_path / "out").exists() and tree_digest(tmp_path) == before


def test_offline_aggregate_refuses_factors_whose_product_overflows(tmp_path, capsys):
    good = write_adapter(make_adapter(2, seed=1), tmp_path / "g")
    bad = make_adapter(2, seed=2)
    for pair in bad.modules.values():
        pair.lora_A.fill_(1e20)
        pair.lora_B.fill_(1e20)
    bad_dir = write_adapter(bad, tmp_path / "bad")
    code, _, err = run_cli(capsys, "aggregate", "--method", "flexlora", "--out", tmp_path / "out", good, bad_dir)
    assert code == 1 and "above the bound" in err and not (tmp_path / "out").exists()
    # with the bound lifted, the overflowing aggregate itself is refused: nothing is written
    code, _, err = run_cli(capsys, "aggregate", "--method", "flexlora", "--max-update-norm", "1e300",
                           "--out", tmp_path / "out", good, bad_dir)
    assert code == 1 and "not finite" in err and not (tmp_path / "out").exists()


def test_offline_distribute_refuses_a_huge_global_adapter(tmp_path, capsys):
    glob = make_adapter(4, seed=1)
    for pair in glob.modules.values():
        pair.lora_B.mul_(1e25)
    path = write_adapter(glob, tmp_path / "global")
    code, _, err = run_cli(capsys, "distribute", "--rank", "2", "--out", tmp_path / "out", path)
    assert code == 1 and "above the bound" in err and not (tmp_path / "out").exists()
    code, _, err = run_cli(capsys, "distribute", "--rank", "2", "--max-update-norm", "nope", "--out",
                           tmp_path / "out", path)
    assert code == 1 and "--max-update-norm must be auto or a positive number" in err


def test_huge_weights_are_normalized_without_overflow(tmp_path, capsys):
    dirs = [write_adapter(make_adapter(2, seed=i), tmp_path / f"c{i}") for i in range(2)]
    code, _, err = run_cli(capsys, "aggregate", "--method", "fedavg", "--weights", "1e308,1e308", "--out",
                           tmp_path / "a", *dirs)
    assert code == 0, err
    code, _, err = run_cli(capsys, "aggregate", "--method", "fedavg", "--out", tmp_path / "b", *dirs)
    a, b = read_adapter(tmp_path / "a"), read_adapter(tmp_path / "b")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_each_client_file_is_opened_once(tmp_path, monkeypatch):
    """Aggregation cost must not grow with modules × modules: one open (and header parse) per client."""
    import safetensors

    from lorafleet.server.aggregation import aggregate_dirs

    shapes = {f"model.layers.{i}.self_attn.q_proj": (8, 8) for i in range(40)}
    dirs = [write_adapter(make_adapter(2, seed=i, shapes=shapes), tmp_path / f"c{i}") for i in range(3)]
    opened = []
    original = safetensors.safe_open

    def counting(path, *args, **kwargs):
        opened.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", counting)
    aggregate_dirs("flexlora", dirs)
    assert sorted(opened) == sorted(str(d / "adapter_model.safetensors") for d in dirs)


def test_an_output_that_appears_while_writing_is_left_alone(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LorafleetError, match="appeared while it was being written; it was left untouched"), \
            atomic_dir(out) as tmp:
        (tmp / "new").write_text("new")
        out.mkdir()
        (out / "theirs").write_text("keep me")
    assert [p.name for p in out.iterdir()] == ["theirs"] and (out / "theirs").read_text() == "keep me"
    with pytest.raises(LorafleetError, match="appeared while it was being written"), \
            atomic_dir(tmp_path / "empty") as tmp:
        (tmp / "new").write_text("new")
        (tmp_path / "empty").mkdir()  # even an empty directory is somebody's
    assert list((tmp_path / "empty").iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_a_profile_with_absurd_figures_is_one_line(tmp_path, capsys):
    from lorafleet.edge_client.profiles import PROFILES_DIR

    text = (PROFILES_DIR / "pixel-8.toml").read_text()
    import re

    bad = tmp_path / "huge.toml"
    bad.write_text(re.sub(r"(?m)^memory_total_gib = .*$", "memory_total_gib = 1e300", text))
    code, _, err = run_cli(capsys, "profile", "--profile", bad)
    assert code == 1 and err.count("\n") == 1 and "field 'memory_total_gib': must be at most" in err, err
