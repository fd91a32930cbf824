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
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    base = {"--ranks": "2", "--target-modules": "q_proj,v_proj", "--runtimes": "onnx", "--seq-len": "8"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    flat = [x for kv in base.items() for x in kv]
    code, out, err = _run(capsys, "random:tiny", *flat, "--out", str(tmp_path / "pkg"))
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
