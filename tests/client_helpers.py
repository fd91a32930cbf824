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
