"""`lorafleet export`: the exact command line works end to end; bad input is one line on stderr, exit ≠ 0."""

import re

import pytest

from lorafleet.cli import main
from lorafleet.export.formats.package import open_package


def _run(capsys, *args):
    code = main(["export", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_command_writes_a_verified_package(tmp_path, capsys):
    code, out, err = _run(capsys, "random:tiny", "--ranks", "4,2", "--target-modules", "q_proj,v_proj",
                          "--lora-alpha", "8", "--seq-len", "8", "--batch-size", "2", "--runtimes", "onnx",
                          "--quantize", "none", "--out", str(tmp_path / "pkg"))
    assert code == 0, err
    m = open_package(tmp_path / "pkg").manifest
    assert m.ranks == [2, 4] and m.lora_alpha == 8.0 and (m.batch_size, m.seq_len) == (2, 8)
    assert m.runtimes == ["onnx"] and m.executorch_foundation is None
    assert "onnx/foundation.data" in out and "verified against eager PEFT" in out
    assert "[export] rank 4: export ONNX Runtime training artifacts" in err
    assert re.search(r"\[export\] rank 2 compiled in \d+ s \(1/2 ranks, about \d+ s left for the rest\)", err), err
    assert re.search(r"\[export\] rank 4 compiled in \d+ s \(2/2 ranks\)", err), err


@pytest.mark.parametrize("args, message", [
    (["--ranks", "4,x"], "--ranks: 'x' is not an integer"),
    (["--ranks", "4,,8"], "--ranks: expected a comma-separated list"),
    (["--ranks", "0"], "ranks: every rank must be a positive integer, got 0"),
    (["--runtimes", "executorch,coreml"], "runtimes: unknown runtime 'coreml'"),
    (["--quantize", "int2"], "quantize: unknown mode 'int2'"),
    (["--target-modules", "q_proj,nope"], "unknown target module 'nope'"),
    (["--ranks", "64"], r"rank 64 exceeds min\(in, out\) = 32"),
])
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["export", "dry-run"])
def test_bad_input_is_one_line(tmp_path, capsys, args, message, dry_run):
    base = {"--ranks": "2", "--target-modules": "q_proj,v_proj", "--runtimes": "onnx", "--seq-len": "8"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    flat = [x for kv in base.items() for x in kv]
    code, out, err = _run(capsys, "random:tiny", *flat, "--out", str(tmp_path / "pkg"), *dry_run)
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("lorafleet: error: ") and len([x for x in lines if "error" in x]) == 1
    assert pytest.importorskip("re").search(message, lines[-1]), lines[-1]
    assert not (tmp_path / "pkg").exists() and list(tmp_path.iterdir()) == []


def test_existing_output_and_unknown_model(tmp_path, capsys):
    (tmp_path / "pkg").mkdir()
    code, _, err = _run(capsys, "random:tiny", "--ranks", "2", "--target-modules", "q_proj",
                        "--out", str(tmp_path / "pkg"))
    assert code == 1 and err.strip() == f"lorafleet: error: output {tmp_path / 'pkg'} already exists " \
                                        "(use --force to replace it)"
    code, _, err = _run(capsys, "random:gpt-9", "--ranks", "2", "--target-modules", "q_proj",
                        "--out", str(tmp_path / "other"))
    assert code == 1 and "unknown architecture 'gpt-9'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_dry_run_predicts_the_package_and_writes_nothing(tmp_path, capsys, tiny_package):
    """--dry-run loads no weights and writes nothing; its foundation sizes are what an export writes (fp32:
    4 bytes a parameter; int4: the quantizer's stored bytes), its package total is near the real one."""
    from conftest import TINY_PACKAGE

    from lorafleet.export.compiler.models import load_model
    from lorafleet.export.compiler.pipeline import ExportConfig
    from lorafleet.export.compiler.plan import plan_export
    from lorafleet.export.compiler.quantize import quantize_model
    from lorafleet.export.formats.quantization import Quantization

    ranks = ",".join(map(str, TINY_PACKAGE["ranks"]))
    code, out, err = _run(capsys, "random:tiny", "--ranks", ranks, "--target-modules", "q_proj,v_proj",
                          "--seq-len", str(TINY_PACKAGE["seq_len"]), "--out", str(tmp_path / "pkg"), "--dry-run")
    assert code == 0, err
    assert not (tmp_path / "pkg").exists() and list(tmp_path.iterdir()) == []
    assert "inputs checked, nothing loaded or written" in out and re.search(r"peak memory: about [\d.]+ GiB", out)
    assert re.search(r"time: about [\d.]+ min", out) and "shared: onnx foundation" in out

    plan = plan_export(ExportConfig(out=tmp_path / "pkg", **TINY_PACKAGE))
    m = open_package(tiny_package, verify=False).manifest
    for rel, entry in m.shared_files.items():  # the foundation files: the weights plus a little framing
        assert abs(plan.foundation_bytes[rel.split("/")[0]] - entry.size) <= 0.01 * entry.size, rel
    real = sum(e.size for e in m.shared_files.values()) + sum(m.rank(r).size_bytes for r in m.ranks)
    assert 0.75 * real <= plan.package_bytes <= 1.25 * real, (plan.package_bytes, real)
    assert plan.parameters == m.model.num_parameters and plan.fits
    assert plan.step_memory_bytes == {r: m.rank(r).estimates.training_peak_memory_bytes for r in m.ranks}

    q = Quantization.parse("int4:16")
    lm = load_model("random:tiny", with_tokenizer=False)
    summary = quantize_model(lm.model, q)
    quantized = plan_export(ExportConfig(out=tmp_path / "pkg", **{**TINY_PACKAGE, "quantize": str(q)}))
    assert set(quantized.foundation_bytes.values()) == {summary.stored_bytes + summary.unquantized_bytes}

    from test_families import family_dir  # a Hugging Face directory: only its config.json is read

    src, model = family_dir(tmp_path / "dirs", "phi3")
    fused = plan_export(ExportConfig(model=str(src), ranks=(4,), target_modules=("qkv_proj",), out=tmp_path / "p3"))
    assert fused.model_type == "phi3" and fused.parameters == sum(t.numel() for t in model.parameters())
    assert fused.rank_bytes[4]["adapter"] == 4 * 4 * (64 + 128) * 2  # fp32 A (4, 64), B (64 + 2 × 32, 4); 2 layers


def test_dry_run_of_a_model_larger_than_memory_says_it_does_not_fit(tmp_path, capsys, monkeypatch):
    import psutil

    class Free:
        available = 8 * 2**30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Free())
    code, out, err = _run(capsys, "random:llama-3.2-1b", "--ranks", "8", "--target-modules", "q_proj,v_proj",
                          "--quantize", "int4", "--out", str(tmp_path / "pkg"), "--dry-run")
    assert code == 0, err
    assert "1.24 B parameters, 16 layers" in out and "base int4:32" in out
    assert re.search(r"peak memory: about [\d.]+ GiB; 8.0 GiB free now: does NOT fit", out), out
