"""The package format: manifest round trip and validation, checksums on open, atomic writing."""

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.export.formats.errors import LorafleetError, PackageError
from lorafleet.export.formats.manifest import FORMAT_VERSION, MANIFEST_FILE, manifest_from_dict, manifest_from_json
from lorafleet.export.formats.package import open_package, write_package
from tests.export_helpers import fake_package, random_adapter


def _manifest_dict(pkg):
    return json.loads((pkg / MANIFEST_FILE).read_text())


def test_open_package_reads_back_what_was_written(tmp_path):
    pkg = open_package(fake_package(tmp_path / "pkg", ranks=(2, 4)))
    m = pkg.manifest
    assert m.format_version == FORMAT_VERSION
    assert m.ranks == [2, 4] and set(m.artifacts) == {"2", "4"}
    assert m.model.vocab_size == 272 and m.target_modules == ["q_proj", "v_proj"]
    assert m.executorch_foundation == "executorch/foundation.ptd"
    assert m.onnx_foundation == "onnx/foundation.data"
    assert pkg.path_of(4, "executorch_training").read_bytes() == b"pte training 4"
    assert (pkg.path_of(2, "onnx_training") / "checkpoint").is_file()
    assert pkg.foundation("executorch").is_file()
    # every file is listed once: shared or owned by exactly one rank
    listed = set(m.all_files())
    on_disk = {str(p.relative_to(pkg.path)) for p in pkg.path.rglob("*") if p.is_file()} - {MANIFEST_FILE}
    assert listed == on_disk
    assert set(m.shared_files) == {"executorch/foundation.ptd", "onnx/foundation.data"}
    assert m.rank(4).size_bytes == sum(e.size for e in m.rank(4).files.values())


def test_initial_adapter_is_the_written_adapter(tmp_path):
    pkg = open_package(fake_package(tmp_path / "pkg", ranks=(4,)))
    got, want = pkg.initial_adapter(4), random_adapter(4)
    assert set(got.modules) == set(want.modules)
    for name, pair in want.modules.items():
        assert torch.equal(got.modules[name].lora_A, pair.lora_A)
        assert torch.equal(got.modules[name].lora_B, pair.lora_B)
        assert got.modules[name].scaling == pytest.approx(pair.scaling)


def test_files_for_one_rank_and_runtime(tmp_path):
    pkg = open_package(fake_package(tmp_path / "pkg", ranks=(2, 4)))
    onnx_files = pkg.files_for(4, "onnx")
    assert "onnx/foundation.data" in onnx_files and "executorch/foundation.ptd" not in onnx_files
    assert all("rank-2" not in f for f in onnx_files)
    assert "adapters/rank-4/adapter_model.safetensors" in onnx_files
    assert "executorch/rank-4/inference.pte" in pkg.files_for(4)


def test_onnx_only_package_has_no_executorch_paths(tmp_path):
    pkg = open_package(fake_package(tmp_path / "pkg", ranks=(2,), runtimes=("onnx",)))
    assert pkg.manifest.executorch_foundation is None and pkg.foundation("executorch") is None
    with pytest.raises(PackageError, match="rank 2 has no executorch_inference"):
        pkg.path_of(2, "executorch_inference")
    with pytest.raises(PackageError, match="has no rank 8"):
        pkg.path_of(8, "adapter")
    with pytest.raises(PackageError, match="unknown artifact kind 'weights'"):
        pkg.path_of(2, "weights")


def test_corrupt_file_is_detected(tmp_path):
    pkg = fake_package(tmp_path / "pkg")
    target = pkg / "executorch/rank-4/training.pte"
    target.write_bytes(b"pte trainIng 4")  # same size, different bytes
    with pytest.raises(PackageError, match="executorch/rank-4/training.pte is corrupt"):
        open_package(pkg)
    open_package(pkg, ranks=[2])  # a device holding only rank 2 does not care
    assert open_package(pkg, verify=False).ranks == [2, 4]


def test_truncated_and_missing_files_are_detected(tmp_path):
    pkg = fake_package(tmp_path / "pkg")
    (pkg / "onnx/foundation.data").write_bytes(b"short")
    with pytest.raises(PackageError, match="onnx/foundation.data has 5 bytes"):
        open_package(pkg)
    pkg2 = fake_package(tmp_path / "pkg2")
    os.remove(pkg2 / "onnx/rank-2/checkpoint")
    with pytest.raises(PackageError, match="onnx/rank-2/checkpoint listed in the manifest is missing"):
        open_package(pkg2)
    with pytest.raises(PackageError, match="is not an edge package"):
        open_package(tmp_path)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format_version=99), "format_version 99 is not supported"),
    (lambda d: d.pop("seq_len"), "missing field 'seq_len'"),
    (lambda d: d.update(lora_alpha="16"), "field 'lora_alpha' must be a number"),
    (lambda d: d.update(ranks=[2, 4, 8]), r"artifacts keys \['2', '4'\] do not match ranks \[2, 4, 8\]"),
    (lambda d: d.update(runtimes=["executorch", "tflite"]), "unknown runtime 'tflite'"),
    (lambda d: d.update(onnx_labels="flat"), "onnx_labels must be one of"),
    (lambda d: d.update(executorch_foundation="../../etc/passwd"), "must be relative and stay inside"),
    (lambda d: d["artifacts"]["2"]["files"].update({"/abs": {"size": 1, "sha256": "0" * 64}}),
     "must be relative"),
    (lambda d: d["artifacts"]["2"]["files"].update({"x": {"size": 1, "sha256": "XYZ"}}), "64 lowercase hex"),
    (lambda d: d["artifacts"]["2"].update(r=3), "artifacts.2 says r = 3"),
    (lambda d: d["artifacts"]["4"].update(onnx_training=None), "artifacts.4: onnx_training is missing"),
    (lambda d: d["artifacts"]["4"].update(adapter="adapters/rank-9"), "adapter path 'adapters/rank-9' is not among"),
    (lambda d: d.update(target_modules=[]), "target_modules is empty"),
    (lambda d: d.update(seq_len=1), "seq_len must be >= 2"),
])
def test_manifest_validation_names_the_field(tmp_path, mutate, message):
    d = _manifest_dict(fake_package(tmp_path / "pkg"))
    mutate(d)
    with pytest.raises(PackageError, match=message):
        manifest_from_dict(d)


def test_manifest_json_errors(tmp_path):
    with pytest.raises(PackageError, match="not valid JSON"):
        manifest_from_json("{nope")
    with pytest.raises(PackageError, match="must hold a JSON object"):
        manifest_from_json("[1, 2]")


@settings(max_examples=15, deadline=None)
@given(ranks=st.lists(st.integers(1, 32), min_size=1, max_size=4, unique=True),  # 32: min(in, out) of v_proj
       runtimes=st.sampled_from([("executorch",), ("onnx",), ("executorch", "onnx")]))
def test_manifest_round_trip(tmp_path_factory, ranks, runtimes):
    pkg = fake_package(tmp_path_factory.mktemp("rt") / "pkg", ranks=tuple(ranks), runtimes=runtimes)
    m = open_package(pkg).manifest
    assert manifest_from_json(m.to_json()) == m
    assert m.ranks == ranks and m.runtimes == list(runtimes)


def test_existing_output_is_refused_and_kept(tmp_path):
    pkg = fake_package(tmp_path / "pkg", ranks=(2,))
    before = (pkg / MANIFEST_FILE).read_text()
    with pytest.raises(PackageError, match="already exists .*--force"):
        fake_package(pkg, ranks=(4,))
    assert (pkg / MANIFEST_FILE).read_text() == before
    fake_package(pkg, ranks=(4,), overwrite=True)
    assert open_package(pkg).ranks == [4]
    (tmp_path / "notes").mkdir()
    with pytest.raises(PackageError, match="not an edge package; refusing"):
        fake_package(tmp_path / "notes", overwrite=True)


def test_failure_while_staging_leaves_nothing(tmp_path):
    out = tmp_path / "a" / "b" / "pkg"
    with pytest.raises(RuntimeError, match="boom"), write_package(out) as w:
        w.foundation("onnx").write_bytes(b"x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PackageError, match="never finished"), write_package(out):
        pass
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_one_clean_error(tmp_path):
    (tmp_path / "file").write_text("a file, not a directory")  # unwritable as a parent, even for root
    with pytest.raises(LorafleetError, match="cannot write to"):
        fake_package(tmp_path / "file" / "pkg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
