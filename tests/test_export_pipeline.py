"""The export pipeline: bad input fails early with one clear error and leaves nothing; --adapter init;
failed verification writes no package; the manifest describes what was built."""

import pytest
import torch

from lorafleet.export.compiler.pipeline import ExportConfig, run_export
from lorafleet.export.formats.adapter import write_adapter
from lorafleet.export.formats.errors import AdapterError, ConfigError, ExportError, LorafleetError, PackageError
from lorafleet.export.formats.package import open_package
from tests.export_helpers import random_adapter

BASE = {"model": "random:tiny", "target_modules": ("q_proj", "v_proj"), "seq_len": 8, "runtimes": ("onnx",)}


def _cfg(tmp_path, **kw):
    args = {**BASE, "ranks": (2,), "out": tmp_path / "pkg", **kw}
    return ExportConfig(**args)


@pytest.mark.parametrize("kw, error, message", [
    ({"ranks": ()}, ConfigError, "ranks is empty"),
    ({"ranks": (4, 0)}, ConfigError, "positive integer, got 0"),
    ({"ranks": (-2,)}, ConfigError, "positive integer, got -2"),
    ({"ranks": (4, 4)}, ConfigError, "duplicate rank"),
    ({"runtimes": ("onnx", "tflite")}, ConfigError, "unknown runtime 'tflite'"),
    ({"runtimes": ()}, ConfigError, "runtimes is empty"),
    ({"quantize": "int3"}, ConfigError, "quantize: unknown mode 'int3'"),
    ({"seq_len": 1}, ConfigError, "seq_len must be at least 2"),
    ({"batch_size": 0}, ConfigError, "batch_size must be at least 1"),
    ({"lora_alpha": float("nan")}, ConfigError, "lora_alpha must be a positive number"),
    ({"target_modules": ()}, ConfigError, "target_modules must be non-empty"),
])
def test_config_validation_names_field_and_value(tmp_path, kw, error, message):
    with pytest.raises(error, match=message):
        _cfg(tmp_path, **kw)


@pytest.mark.parametrize("kw, error, message", [
    ({"target_modules": ("q_proj", "qkv")}, ConfigError, "unknown target module 'qkv' .*q_proj"),
    ({"ranks": (2, 33)}, ConfigError, r"rank 33 exceeds min\(in, out\) = 32 of model.layers.0.self_attn.v_proj"),
    ({"seq_len": 4096}, ConfigError, "exceeds the model's max_position_embeddings 2048"),
])
def test_model_dependent_errors_leave_nothing(tmp_path, kw, error, message):
    with pytest.raises(error, match=message):
        run_export(_cfg(tmp_path, **kw))
    assert list(tmp_path.iterdir()) == []


def test_existing_and_unwritable_outputs(tmp_path):
    (tmp_path / "pkg").mkdir()
    with pytest.raises(PackageError, match="already exists"):
        run_export(_cfg(tmp_path))
    with pytest.raises(PackageError, match="not an edge package; refusing"):
        run_export(_cfg(tmp_path, force=True))
    (tmp_path / "file").write_text("x")
    with pytest.raises(LorafleetError, match="cannot write to"):
        run_export(_cfg(tmp_path, out=tmp_path / "file" / "pkg"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "pkg"]
    assert list((tmp_path / "pkg").iterdir()) == []


def test_adapter_errors(tmp_path):
    write_adapter(random_adapter(4), tmp_path / "a4")
    with pytest.raises(AdapterError, match="requested rank 8 is above the rank 4 of --adapter"):
        run_export(_cfg(tmp_path, ranks=(2, 8), adapter=tmp_path / "a4"))
    with pytest.raises(AdapterError, match="adapter directory not found"):
        run_export(_cfg(tmp_path, adapter=tmp_path / "nope"))
    write_adapter(random_adapter(4, layers=1), tmp_path / "one-layer")
    with pytest.raises(AdapterError, match="modules do not match the package"):
        run_export(_cfg(tmp_path, adapter=tmp_path / "one-layer"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a4", "one-layer"]


def test_failed_verification_writes_nothing(tmp_path, monkeypatch):
    import lorafleet.export.compiler.verify

    monkeypatch.setitem(lorafleet.export.compiler.verify.TOLERANCES, "grad_rel_max_abs_diff", -1.0)
    with pytest.raises(ExportError, match="verification failed: rank 2 onnx_training grad_rel_max_abs_diff"):
        run_export(_cfg(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_adapter_initializes_every_rank_truncated(tmp_path):
    source = random_adapter(8, lora_alpha=32.0, seed=3)
    write_adapter(source, tmp_path / "a8")
    result = run_export(_cfg(tmp_path, ranks=(2, 8), adapter=tmp_path / "a8"))
    pkg = open_package(result.path)
    assert pkg.manifest.verification["passed"]
    for r in (2, 8):
        got = pkg.initial_adapter(r)
        assert got.r == r and got.config["lora_alpha"] == 16.0
        for name, pair in source.modules.items():
            want = pair.scaling * pair.lora_B[:, :r] @ pair.lora_A[:r]
            torch.testing.assert_close(got.modules[name].delta(), want, atol=1e-6, rtol=1e-5)
    # a second export over it needs --force, and then replaces it
    with pytest.raises(PackageError, match="already exists"):
        run_export(_cfg(tmp_path, ranks=(4,)))
    run_export(_cfg(tmp_path, ranks=(4,), force=True))
    assert open_package(tmp_path / "pkg").ranks == [4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a8", "pkg"]


def test_manifest_describes_the_model_and_ranks(tiny_package):
    from peft import LoraConfig, get_peft_model

    from lorafleet.export.compiler.models import load_model

    m = open_package(tiny_package).manifest
    assert (m.model.spec, m.model.architecture, m.model.num_layers, m.model.hidden_size) == \
        ("random:tiny", "LlamaForCausalLM", 2, 64)
    assert m.target_modules == ["q_proj", "v_proj"] and m.lora_alpha == 16.0 and m.onnx_labels == "unshifted"
    base = load_model("random:tiny", with_tokenizer=False).model
    assert m.model.num_parameters == sum(p.numel() for p in base.parameters())
    for r in m.ranks:
        peft = get_peft_model(load_model("random:tiny", with_tokenizer=False).model,
                              LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))
        assert m.rank(r).trainable_parameters == sum(p.numel() for p in peft.parameters() if p.requires_grad)
        est = m.rank(r).estimates
        assert est.training_peak_memory_bytes == sum(est.memory_breakdown.values())
        assert est.flops_per_step > 0
    peaks = [m.rank(r).estimates.training_peak_memory_bytes for r in m.ranks]
    assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)
