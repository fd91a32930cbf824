"""manifest.json read through strict pydantic models: no bool or string is taken as a number, each problem is
one line naming the field, and the order problems are reported in (format_version first, the digest last) holds."""

import json

import pytest

from lorafleet.export.formats.errors import PackageError
from lorafleet.export.formats.manifest import DIGEST_FIELD, MANIFEST_FILE, manifest_digest, manifest_from_dict
from tests.export_helpers import fake_package


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    pkg = fake_package(tmp_path_factory.mktemp("m") / "pkg")
    return json.loads((pkg / MANIFEST_FILE).read_text())


def signed(d):
    return {**d, DIGEST_FIELD: manifest_digest(d)}


def fresh(manifest):
    return json.loads(json.dumps(manifest))


def refused(d, match):
    with pytest.raises(PackageError, match=match) as info:
        manifest_from_dict(signed(d))
    assert "\n" not in str(info.value)


def test_the_exported_manifest_is_read(manifest):
    m = manifest_from_dict(fresh(manifest))
    assert m.ranks == [2, 4] and m.model.module_shapes["q_proj"] == (64, 64)
    assert isinstance(m.lora_alpha, float) and m.artifacts["2"].estimates.memory_breakdown == {"weights": 1}


@pytest.mark.parametrize(("mutate", "match"), [
    # a bool is not a number anywhere, not even where the hand-written reader used to take one
    (lambda d: d.update(seq_len=True), r"^manifest.json: field 'seq_len' must be an integer, got True$"),
    (lambda d: d.update(lora_alpha=False), r"field 'lora_alpha' must be a number, got False$"),
    (lambda d: d["artifacts"]["2"]["files"]["adapters/rank-2/adapter_config.json"].update(size=True),
     r"^manifest.json: artifacts.2.files: entry 'adapters/rank-2/adapter_config.json': file size must be a "
     r"non-negative integer, got True$"),
    (lambda d: d["shared_files"]["onnx/foundation.data"].update(size=1.0), r"shared_files: entry .*got 1.0$"),
    (lambda d: d["model"]["module_shapes"].update(q_proj=[True, 64]),
     r"^manifest.json: model: module_shapes.q_proj must be \[out, in\], got \[True, 64\]$"),
    (lambda d: d["artifacts"]["4"]["estimates"]["memory_breakdown"].update(weights=True),
     r"^manifest.json: artifacts.4.estimates: memory_breakdown must map names to integers$"),
    (lambda d: d["artifacts"]["4"]["estimates"].update(device_memory={"executorch": {"planned": True}}),
     r"^manifest.json: artifacts.4.estimates: device_memory must map runtimes to \{term: bytes\} objects$"),
    (lambda d: d["artifacts"]["4"]["estimates"].update(device_memory={"executorch": 5}),
     r"^manifest.json: artifacts.4.estimates: device_memory must map runtimes to \{term: bytes\} objects$"),
    (lambda d: d["artifacts"]["4"]["estimates"].update(device_memory={"tflite": {"planned": 5}}),
     r"^manifest.json: artifacts.4.estimates.device_memory has runtime 'tflite', which the package does not "
     r"have \(runtimes: .*\)$"),
    # nor is a string, and a number too large for a float is refused, not an OverflowError
    (lambda d: d.update(batch_size="1"), r"field 'batch_size' must be an integer, got '1'$"),
    (lambda d: d.update(lora_alpha=10**400), r"field 'lora_alpha' must be a number"),
    (lambda d: d.update(ranks=[2, "4"]), r"field 'ranks' must be a list of int, got \[2, '4'\]$"),
    (lambda d: d["artifacts"]["2"].update(adapter=7), r"artifacts.2: field 'adapter' must be a relative path, got 7$"),
    (lambda d: d["artifacts"]["2"].update(onnx_training="/abs"), r"artifacts.2: onnx_training: path '/abs' must be"),
    (lambda d: d["artifacts"]["2"].pop("estimates"), r"^manifest.json: artifacts.2: missing field 'estimates'$"),
    (lambda d: d["artifacts"].update({"4": []}), r"^manifest.json: artifacts.4 must be an object$"),
    (lambda d: d["artifacts"]["4"]["estimates"].update(flops_per_step=-1),
     r"^manifest.json: artifacts.4.estimates: flops_per_step must be >= 0 and <= 1.18059e\+21, got -1$"),
    # unknown keys: refused in a file entry, as always
    (lambda d: d["shared_files"]["onnx/foundation.data"].update(extra=1),
     r"shared_files: entry 'onnx/foundation.data' must be \{'size': int, 'sha256': hex\}$"),
])
def test_a_bad_field_is_named(manifest, mutate, match):
    d = fresh(manifest)
    mutate(d)
    refused(d, match)


def test_unknown_keys_elsewhere_are_ignored_and_signed(manifest):
    d = fresh(manifest)
    d["future_field"] = {"x": 1}
    d["model"]["rope_theta"] = 1e4
    d["artifacts"]["2"]["estimates"]["note"] = "x"
    manifest_from_dict(signed(d))
    with pytest.raises(PackageError, match="was edited after export"):
        manifest_from_dict(d)


def test_format_version_comes_first_and_the_digest_last(manifest):
    d = fresh(manifest)
    d.update(format_version=1, ranks="all", model=None)  # an older package: told to re-export, whatever else
    refused(d, r"format_version 1 is not supported .* re-export the package")
    d = fresh(manifest)
    d.update(seq_len="8")  # a wrong field in an unsigned manifest names the field, not the digest
    with pytest.raises(PackageError, match="field 'seq_len' must be an integer"):
        manifest_from_dict(d)


def test_within_a_rank_its_own_sizes_are_reported_before_its_estimates(manifest):
    d = fresh(manifest)
    d["artifacts"]["2"]["estimates"]["training_peak_memory_bytes"] = "x"
    d["artifacts"]["2"]["size_bytes"] = -1
    refused(d, r"^manifest.json: artifacts.2: size_bytes must be >= 0 and <= 1.1259e\+15, got -1$")
    d["artifacts"]["2"]["estimates"]["memory_breakdown"] = []
    refused(d, r"artifacts.2.estimates: memory_breakdown must map names to integers$")
    d["model"]["num_layers"] = "2"  # the model section is read before the artifacts
    refused(d, r"^manifest.json: model: field 'num_layers' must be an integer, got '2'$")
