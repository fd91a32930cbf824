"""Shared test set-up. Area-specific fixtures live next to their tests (tests/<area>_helpers.py)."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402

# The edge package other areas' tests share: `random:tiny`, ranks 2/4/8 on q_proj,v_proj, 16-token sequences.
TINY_PACKAGE = {"model": "random:tiny", "ranks": (2, 4, 8), "target_modules": ("q_proj", "v_proj"),
                "lora_alpha": 16.0, "seq_len": 16, "batch_size": 1, "runtimes": ("executorch", "onnx")}


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory):
    """Path of a verified edge package of `random:tiny` (see TINY_PACKAGE), exported once per test session.

    Open it with `export.package.open_package(path)`; do not modify it (copy it first).
    """
    from export.pipeline import ExportConfig, run_export

    out = tmp_path_factory.mktemp("tiny-package") / "pkg"
    run_export(ExportConfig(out=out, **TINY_PACKAGE))
    return out
