"""Fixtures and builders for the fleet area's tests (tasks, partition, evaluation, report)."""

from __future__ import annotations

import pytest
import torch

from lorafleet.export.compiler.models import LoadedModel, load_model
from lorafleet.export.formats.adapter import Adapter, LoraPair, peft_config, scaling_for

TARGETS = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    """``random:tiny`` with its byte tokenizer, loaded once per test module."""
    return load_model("random:tiny")


def random_adapter(loaded: LoadedModel, r: int, *, seed: int = 0, std: float = 0.2, lora_alpha: float = 16.0,
                   targets: tuple[str, ...] = TARGETS) -> Adapter:
    """A rank-``r`` adapter on every layer's ``targets`` with random (non-zero) A and B."""
    gen = torch.Generator().manual_seed(seed)
    info = loaded.info
    modules = {}
    for layer in range(info.num_layers):
        for t in targets:
            out, inp = info.module_shapes[t]
            name = f"model.layers.{layer}.{'mlp' if t in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{t}"
            modules[name] = LoraPair(torch.randn(r, inp, generator=gen) * std,
                                     torch.randn(out, r, generator=gen) * std, scaling_for(r, lora_alpha))
    return Adapter(modules, peft_config(list(targets), r, lora_alpha))


PROFILE_DEFAULTS = {"memory_total_gib": 8.0, "app_memory_gib": 4.0, "cpu_cores": 4, "sustained_gflops": 100.0,
                    "memory_bandwidth_gbs": 20.0, "network_up_mbps": 100.0, "network_down_mbps": 100.0,
                    "availability": 1.0}


def write_profile(directory, name: str, **figures) -> None:
    """A valid device profile ``directory/name.toml`` (every figure sourced "[U] test"), with ``figures``
    overriding :data:`PROFILE_DEFAULTS`."""
    values = {**PROFILE_DEFAULTS, **figures}
    lines = [f'name = "{name}"', 'kind = "host"', *(f"{k} = {v}" for k, v in values.items()),
             'runtimes = ["onnxruntime", "torch"]', "", "[sources]",
             *(f'{k} = "[U] test figure"' for k in values)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.toml").write_text("\n".join(lines) + "\n")
