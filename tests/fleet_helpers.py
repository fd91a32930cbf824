"""Fixtures and builders for the fleet area's tests (tasks, partition, evaluation, report)."""

from __future__ import annotations

import pytest
import torch

from export.adapter import Adapter, LoraPair, peft_config, scaling_for
from export.models import LoadedModel, load_model

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
