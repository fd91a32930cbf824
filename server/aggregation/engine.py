"""The module-by-module loop every method runs in, for in-memory adapters and for streamed directories.

Client factors are requested one module at a time through ``load(name)``, so a streamed source keeps only
that module's tensors (for every client) in memory; the global adapter is built up module by module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lorafleet.export.formats.adapter import Adapter, LoraPair
from lorafleet.export.formats.errors import AggregationError
from lorafleet.server.aggregation.common import (
    AggregationMethod,
    ModuleSpec,
    check_positive_rank,
    check_rank,
    check_specs,
    client_weights,
    output_scaling,
)


def run(method: AggregationMethod, specs: Sequence[Mapping[str, ModuleSpec]], origins: Sequence[str],
        configs: Sequence[Mapping[str, Any]], load: Callable[[str], Sequence[LoraPair]],
        weights: Sequence[float] | None, rank: int | None, options: Mapping[str, Any]) -> Adapter:
    """Aggregate every module with ``method``; ``load(name)`` returns the clients' pairs for one module."""
    unknown = sorted(set(options) - method.options)
    if unknown:
        allowed = ", ".join(sorted(method.options)) or "none"
        raise AggregationError(f"{method.name}: unknown option(s) {', '.join(unknown)} (allowed: {allowed})")
    if rank is not None:
        check_positive_rank(method.name, rank)  # its size is checked per module
    check_specs([dict(s) for s in specs], origins)
    w = client_weights(weights, len(specs))
    use_rslora = all(bool(c.get("use_rslora", False)) for c in configs)
    modules: dict[str, LoraPair] = {}
    for name in sorted(specs[0]):
        ms = [s[name] for s in specs]
        limit = min(ms[0].shape)
        r_out = check_rank(method.name, name, method.global_rank(name, [m.r for m in ms], rank, limit), limit)
        pairs = load(name)
        b, a = method.aggregate_module(pairs, w, r_out, **options)  # ΔW = b @ a, (out, r_out) @ (r_out, in)
        s_out = output_scaling(ms, r_out, use_rslora)
        dtype = _output_dtype(pairs)
        modules[name] = LoraPair(a.to(dtype).contiguous(), (b / s_out).to(dtype).contiguous(), s_out)
    return Adapter(modules, _output_config(configs[0], modules, use_rslora))


def _output_dtype(pairs: Sequence[LoraPair]) -> Any:
    import torch

    wide = any(p.lora_A.dtype == torch.float64 or p.lora_B.dtype == torch.float64 for p in pairs)
    return torch.float64 if wide else torch.float32


def _output_config(first: Mapping[str, Any], modules: Mapping[str, LoraPair], use_rslora: bool) -> dict[str, Any]:
    """The first client's PEFT metadata with ``r`` / ``lora_alpha`` of the largest module.

    Modules may differ in rank and scaling; :func:`lorafleet.export.formats.adapter.write_adapter` derives the exact
    ``r``, ``lora_alpha``, ``rank_pattern`` and ``alpha_pattern`` from the modules when the adapter is written.
    """
    big = max(modules.values(), key=lambda p: p.r)
    alpha = big.scaling * (big.r ** 0.5 if use_rslora else big.r)
    cfg = {k: v for k, v in first.items() if k not in ("rank_pattern", "alpha_pattern")}
    cfg.update(r=big.r, lora_alpha=alpha, use_rslora=use_rslora, rank_pattern={}, alpha_pattern={})
    return cfg
