"""A package's manifest is not trusted blindly: edits are detected, every field is bounded, and what the
programs fix (rank, lora_alpha, rsLoRA, targets, input shape) is cross-checked when they are loaded."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from lorafleet.export.formats.errors import PackageError
from lorafleet.export.formats.manifest import DIGEST_FIELD, MANIFEST_FILE, manifest_digest
from lorafleet.export.formats.package import open_package, sha256_file


@pytest.fixture
def pkg(tiny_package, tmp_path):
    out = tmp_path / "pkg"
    shutil.copytree(tiny_package, out)
    return out


def edit(pkg, mutate, *, resign: bool):
    """Change manifest.json; with ``resign`` also recompute its digest, as a careful forger would."""
    path = pkg / MANIFEST_FILE
    data = json.loads(path.read_text())
    mutate(data)
    if resign:
        data[DIGEST_FIELD] = manifest_digest(data)
    path.write_text(json.dumps(data, indent=2))


def rehash(pkg, rel):
    """Record a changed file's new size and hash in the manifest and re-sign it."""
    def mutate(data):
        entry = {"size": (pkg / rel).stat().st_size, "sha256": sha256_file(pkg / rel)}
        for art in data["artifacts"].values():
            if rel in art["files"]:
                art["files"][rel] = entry
    edit(pkg, mutate, resign=True)


@pytest.mark.parametrize(("field", "value"), [("lora_alpha", 32.0), ("seq_len", 8), ("use_rslora", True)])
def test_an_edit_of_the_manifest_is_detected(pkg, field, value):
    edit(pkg, lambda d: d.update({field: value}), resign=False)
    with pytest.raises(PackageError, match="was edited after export"):
        open_package(pkg, verify=False)


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda d: d.update(seq_len=1_000_000_000), r"seq_len must be >= 2 and <= 131072, got 1000000000"),
    (lambda d: d.update(batch_size=10**6), "batch_size must be"),
    (lambda d: d.update(lora_alpha=1e300), "lora_alpha must be a positive number at most"),
    (lambda d: d.update(ranks=[2, 4, 8, 99999], artifacts={**d["artifacts"], "99999": d["artifacts"]["8"]}),
     "ranks must be"),
    (lambda d: d["model"].update(vocab_size=1 << 40), "vocab_size must be"),
    (lambda d: d["model"]["module_shapes"].update(q_proj=[0, 64]), r"module_shapes.q_proj must be"),
    (lambda d: d["artifacts"]["2"]["estimates"].update(training_peak_memory_bytes=-1), "training_peak_memory"),
    (lambda d: d.update(target_modules=["q_proj", "lm_head"]), r"target_modules \['lm_head'\] are not among"),
])
def test_every_field_is_bounded_even_when_re_signed(pkg, mutate, match):
    edit(pkg, mutate, resign=True)
    with pytest.raises(PackageError, match=match):
        open_package(pkg, verify=False)


def test_a_re_signed_lora_alpha_disagrees_with_the_packaged_adapters(pkg):
    edit(pkg, lambda d: d.update(lora_alpha=32.0), resign=True)
    open_package(pkg, verify=False)  # the manifest alone is consistent now...
    with pytest.raises(PackageError, match=r"rank 2's adapter says .*16.*, the manifest .*32.0"):
        open_package(pkg)  # ...but not with the adapters it lists


@pytest.mark.parametrize("runtime", ["onnxruntime", "executorch"])
def test_a_program_compiled_otherwise_than_the_manifest_says_is_refused(pkg, runtime):
    """A forger who also rewrites every adapter config and rehashes still meets the programs."""
    from lorafleet.edge_client.backends import make_backend
    from lorafleet.edge_client.backends.base import OptimizerConfig

    edit(pkg, lambda d: d.update(lora_alpha=32.0), resign=True)
    for r in (2, 4, 8):
        rel = f"adapters/rank-{r}/adapter_config.json"
        cfg = json.loads((pkg / rel).read_text())
        cfg["lora_alpha"] = 32.0
        (pkg / rel).write_text(json.dumps(cfg))
        rehash(pkg, rel)
    package = open_package(pkg)  # hashes, digest and adapters all agree now
    with pytest.raises(PackageError, match=r"compiled with lora_alpha 16.0, the manifest says 32.0"):
        make_backend(runtime, package, 4, OptimizerConfig())


def test_the_digest_is_canonical(pkg):
    path = pkg / MANIFEST_FILE
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data, indent=None, sort_keys=True))  # reformatting is not an edit
    assert open_package(pkg).manifest.manifest_sha256 == data[DIGEST_FIELD]
    assert len(data[DIGEST_FIELD]) == 64 and data[DIGEST_FIELD] != hashlib.sha256(path.read_bytes()).hexdigest()
