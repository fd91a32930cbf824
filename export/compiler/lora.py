"""Attach PEFT LoRA heads to a foundation model, and move LoRA weights between PEFT models and adapters.

LoRA (Hu et al., 2021, arXiv:2106.09685): a frozen linear ``W`` (out × in) becomes
``W x + scaling · B (A x)`` with ``lora_A`` (r × in), ``lora_B`` (out × r) and ``scaling = lora_alpha / r``
(rsLoRA: ``lora_alpha / sqrt(r)``). PEFT's default initialization draws ``lora_A`` (Kaiming-uniform) and
zeroes ``lora_B``, so ΔW = 0 at the start. An ``--adapter`` of rank R initializes rank ``r ≤ R`` with its
first ``r`` components (HetLoRA truncation, Cho et al. 2024), rescaled to the package's ``lora_alpha``.
"""

from __future__ import annotations

import warnings
from typing import Any

from lorafleet.export.formats.adapter import Adapter, LoraPair, check_same_modules, conform, peft_config
from lorafleet.export.formats.errors import AdapterError, ConfigError
from lorafleet.export.formats.program import LoraSpec


def target_shapes(model: Any, target_modules: tuple[str, ...] | list[str]) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every ``nn.Linear`` of ``model`` that a target name selects, keyed by module name.

    Raises :class:`ConfigError` naming a target that matches no linear layer, and the names that would.
    """
    import torch

    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    shapes: dict[str, tuple[int, int]] = {}
    for target in target_modules:
        hits = {n: m for n, m in linears.items() if n == target or n.endswith("." + target)}
        if not hits:
            known = sorted({n.rsplit(".", 1)[-1] for n in linears} - {"lm_head"})
            raise ConfigError(f"unknown target module {target!r} (this model's linear layers: {', '.join(known)})")
        shapes.update({n: (m.out_features, m.in_features) for n, m in hits.items()})
    return shapes


def check_ranks(shapes: dict[str, tuple[int, int]], ranks: list[int]) -> None:
    """Every rank must be positive and at most ``min(in, out)`` of every targeted linear."""
    for r in ranks:
        if r <= 0:
            raise ConfigError(f"rank must be positive, got {r}")
        for name, (out, inp) in shapes.items():
            if r > min(out, inp):
                raise ConfigError(f"rank {r} exceeds min(in, out) = {min(out, inp)} of {name} ({out} × {inp})")


def trainable_parameters(shapes: dict[str, tuple[int, int]], r: int) -> int:
    """``r · Σ (in + out)`` over the targeted linears: the LoRA parameter count."""
    return sum(r * (out + inp) for out, inp in shapes.values())


def attach_lora(model: Any, spec: LoraSpec, init: Adapter | None = None, *, seed: int = 0) -> Any:
    """Wrap ``model`` in a PEFT ``PeftModel`` with LoRA heads of ``spec`` (in place; undo with :func:`detach_lora`).

    Without ``init`` the heads get PEFT's default initialization (deterministic in ``seed``); with it, the
    adapter's tensors (which must be rank ``spec.r`` on exactly the targeted modules) are loaded.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha,  # type: ignore[arg-type]  # PEFT accepts floats
                     target_modules=list(spec.target_modules), lora_dropout=0.0, bias="none",
                     use_rslora=spec.use_rslora, init_lora_weights=True)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 deprecations PEFT 0.21 still calls
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, cfg)
    if init is not None:
        load_lora(peft_model, spec, init)
    return peft_model


def detach_lora(peft_model: Any) -> Any:
    """The base model with the LoRA heads removed (PEFT ``unload``), ready for the next rank."""
    return peft_model.unload()


def lora_modules(peft_model: Any) -> dict[str, Any]:
    """LoRA layers by module name inside the base model (``model.layers.0.self_attn.q_proj``)."""
    inner = peft_model.base_model.model
    return {name: mod for name, mod in inner.named_modules()
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {})}


def read_lora(peft_model: Any, spec: LoraSpec, *, base_model: str | None = None) -> Adapter:
    """The PEFT model's current LoRA weights as an :class:`Adapter` (tensors copied to the CPU)."""
    mods = {}
    for name, mod in lora_modules(peft_model).items():
        a = mod.lora_A["default"].weight.detach().to("cpu", copy=True)  # (r, in)
        b = mod.lora_B["default"].weight.detach().to("cpu", copy=True)  # (out, r)
        mods[name] = LoraPair(a, b, spec.scaling)
    cfg = peft_config(list(spec.target_modules), spec.r, spec.lora_alpha, use_rslora=spec.use_rslora,
                      base_model=base_model)
    return Adapter(mods, cfg)


def load_lora(peft_model: Any, spec: LoraSpec, adapter: Adapter) -> None:
    """Copy ``adapter``'s factors into the PEFT model, rescaled to ``spec``'s scaling (ΔW unchanged)."""
    import torch

    adapter = conform(adapter, spec, expected=None)
    layers = lora_modules(peft_model)
    check_same_modules(set(adapter.modules), set(layers), "the PEFT model")
    with torch.no_grad():
        for name, mod in layers.items():
            pair = adapter.modules[name]
            a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            if tuple(pair.lora_A.shape) != tuple(a.shape) or tuple(pair.lora_B.shape) != tuple(b.shape):
                raise AdapterError(f"adapter module {name} has lora_A {tuple(pair.lora_A.shape)}, lora_B "
                                   f"{tuple(pair.lora_B.shape)}; the model expects {tuple(a.shape)}, {tuple(b.shape)}")
            a.copy_(pair.lora_A)
            b.copy_(pair.lora_B)
