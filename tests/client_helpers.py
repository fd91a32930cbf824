"""Fixtures for the edge-client tests: a few instruction examples, JSONL files, initial adapters."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorafleet.edge_client.data import Example
from lorafleet.export.formats.adapter import Adapter, LoraPair, peft_config

EXAMPLES = [
    Example("Say hello.", "", "Hello!"),
    Example("Add the numbers.", "2 and 3", "5"),
    Example("Name a colour.", "", "Blue."),
    Example("Reverse the word.", "cat", "tac"),
]
TINY_SHAPES = {"q_proj": (64, 64), "v_proj": (32, 64)}  # random:tiny, (out, in)


def write_jsonl(path: Path, examples: list[Example] = EXAMPLES, extra_lines: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps({"instruction": e.instruction, "input": e.input, "output": e.output}) for e in examples]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n")
    return path


def nonzero_adapter(r: int, *, lora_alpha: float = 16.0, seed: int = 0, scale: float = 0.1) -> Adapter:
    """A rank-``r`` adapter for random:tiny's q_proj/v_proj with nonzero A and B (so ΔW ≠ 0 from step 1)."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for layer in range(2):
        for name, (out, inp) in TINY_SHAPES.items():
            mods[f"model.layers.{layer}.self_attn.{name}"] = LoraPair(
                torch.randn(r, inp, generator=g) * scale, torch.randn(out, r, generator=g) * scale, lora_alpha / r)
    return Adapter(mods, peft_config(sorted(TINY_SHAPES), r, lora_alpha))


def require_native() -> str:
    """The built native trainer's path; skips (naming why) only where there is no C++ toolchain to build it."""
    import shutil

    import pytest

    from lorafleet.edge_client.backends.native_backend import native_binary
    from lorafleet.export.formats.errors import ConfigError

    try:
        return str(native_binary())
    except ConfigError as exc:
        if shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++")):
            pytest.fail(f"{exc} (cmake and a C++ compiler are present: `make install` builds it)")
        pytest.skip(f"no C++ toolchain here to build the native trainer: {exc}")


def require_native_join() -> str:
    """The native tool, built with `join` (Flower's Fleet API); skips only where its libraries are absent."""
    import shutil
    import subprocess

    import pytest

    tool = require_native()
    proc = subprocess.run([tool, "join"], capture_output=True, text=True, timeout=30)
    if "no Fleet API client" not in proc.stderr:
        return tool
    def found(lib: str) -> bool:
        return subprocess.run(["pkg-config", "--exists", lib], capture_output=True).returncode == 0

    if shutil.which("protoc") and shutil.which("pkg-config") and all(map(found, ("libcurl", "openssl", "protobuf"))):
        pytest.fail("libcurl, OpenSSL, protobuf and protoc are present, yet lorafleet-native has no join: "
                    "see build/native-configure.log")
    pytest.skip("lorafleet-native is built without join: it needs libcurl, OpenSSL and protobuf development "
                "files and protoc (apt-get install libcurl4-openssl-dev libssl-dev libprotobuf-dev "
                "protobuf-compiler)")


def example_batches(pkg, steps: int, seed: int) -> list:
    """``steps`` batches of :data:`EXAMPLES` in ``pkg``'s compiled shape, as ``train_local`` draws them."""
    from lorafleet.edge_client.data import batches, encode_all
    from lorafleet.edge_client.tokenizer import load_tokenizer

    m = pkg.manifest
    return list(batches(encode_all(load_tokenizer(m.model.spec), EXAMPLES, m.seq_len), m.batch_size, steps, seed))
