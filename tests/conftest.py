"""Shared test set-up. Area-specific fixtures live next to their tests (tests/<area>_helpers.py)."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp; see lorafleet/cli.py
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402

# The edge package other areas' tests share: `random:tiny`, ranks 2/4/8 on q_proj,v_proj, 16-token sequences.
TINY_PACKAGE = {"model": "random:tiny", "ranks": (2, 4, 8), "target_modules": ("q_proj", "v_proj"),
                "lora_alpha": 16.0, "seq_len": 16, "batch_size": 1, "runtimes": ("executorch", "onnx")}


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory):
    """Path of a verified edge package of `random:tiny` (see TINY_PACKAGE), exported once per test session.

    Open it with `lorafleet.export.formats.package.open_package(path)`; do not modify it (copy it first).
    """
    from filelock import FileLock

    from lorafleet.export.compiler.pipeline import ExportConfig, run_export

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers: they share one export
        root = root.parent
    out = root / "tiny-package" / "pkg"
    with FileLock(str(root / "tiny-package.lock")):
        if not (out / "manifest.json").is_file():  # the export renames a verified package into place
            run_export(ExportConfig(out=out, **TINY_PACKAGE))
    return out


# Files whose fixtures take minutes (a real export, Flower processes, a simulated fleet) go first, so that with
# two workers (`make test --dist loadfile --no-loadscope-reorder`) the two longest start at once and the quick
# files fill in around them. xdist hands each worker one file, then a second to a worker with ≤ 2 tests
# pending: the one-test real export gets the quick test_stack.py queued behind it, not another long file.
LONG_FILES = ("test_export_real.py", "test_federation_deploy.py", "test_stack.py", "test_backends.py",
              "test_readme_sections.py", "test_readme.py",
              "test_fleet_run.py", "test_executorch.py", "test_native.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: the order within a file and among the other files is kept
