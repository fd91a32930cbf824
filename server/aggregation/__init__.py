"""Heterogeneous-rank LoRA aggregation: pure functions over :class:`lorafleet.export.formats.adapter.Adapter`.

* :func:`aggregate` — in memory (what the Flower server calls): ``aggregate("flexlora", adapters, n_k)``.
* :func:`aggregate_dirs` — streamed from PEFT adapter directories, one module at a time (what
  ``lorafleet aggregate`` uses; memory bounded by one module's factors for all clients).
* :func:`distribute` — the rank-r adapter a client of rank r receives (truncation).
* :data:`METHODS` — the registry. A new method is one module defining ``METHOD`` (an
  :class:`AggregationMethod`: a per-module function returning ``(B, A)`` at scaling 1, a global-rank rule and
  its option names) plus its entry in :data:`_MODULES` below.

Methods: ``fedavg`` (FedIT), ``hetlora`` (Cho et al., 2024, arXiv:2401.06432), ``flexlora`` (Bai et al., 2024,
arXiv:2402.11505), ``raflora``
(Wu et al., 2026); their modules' docstrings say exactly how PEFT scalings are treated. Errors:
:class:`lorafleet.export.formats.errors.AdapterError` for a bad client adapter,
:class:`lorafleet.export.formats.errors.AggregationError` for clients that do not fit together, bad weights, ranks or
options.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorafleet.export.formats.adapter import Adapter, LoraPair, truncate
from lorafleet.export.formats.errors import AdapterError, AggregationError
from lorafleet.server.aggregation import engine, fedavg, flexlora, hetlora, raflora
from lorafleet.server.aggregation.common import AggregationMethod, check_finite, specs_of
from lorafleet.server.aggregation.streaming import LazyAdapter, open_clients

_MODULES = (fedavg, hetlora, flexlora, raflora)
METHODS: dict[str, AggregationMethod] = {m.METHOD.name: m.METHOD for m in _MODULES}

__all__ = ["METHODS", "AggregationMethod", "LazyAdapter", "aggregate", "aggregate_dirs", "distribute",
           "get_method"]


def get_method(name: str) -> AggregationMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise AggregationError(f"unknown aggregation method {name!r} (known: {', '.join(METHODS)})") from None


def aggregate(method: str, adapters: Sequence[Adapter], weights: Sequence[float] | None = None, *,
              rank: int | None = None, **options: Any) -> Adapter:
    """Aggregate client adapters (ranks and ``lora_alpha`` may differ) into the global adapter.

    ``weights`` are the clients' n_k (e.g. example counts; normalized here; ``None`` = equal). ``rank`` is the
    global rank (default: the method's, max r_k for hetlora/flexlora/raflora). ``options`` are the method's
    keyword options: hetlora ``use_weights`` (multiply sparsity weights by n_k), flexlora and raflora ``solver``.
    """
    m = get_method(method)
    origins = [f"client {i + 1}" for i in range(len(adapters))]
    for adapter, origin in zip(adapters, origins, strict=True):
        check_finite(adapter, origin)
    return engine.run(m, [specs_of(a) for a in adapters], origins, [a.config for a in adapters],
                      lambda name: [a.modules[name] for a in adapters], weights, rank, options)


def aggregate_dirs(method: str, paths: Sequence[str | Path], weights: Sequence[float] | None = None, *,
                   rank: int | None = None, max_update_norm: float | None = None, **options: Any) -> Adapter:
    """:func:`aggregate` over PEFT adapter directories, streamed module by module (see
    :mod:`lorafleet.server.aggregation.streaming`). Every client is validated from its header before any value is read.

    Clients are untrusted: one whose ‖ΔW‖_F (over all its modules) exceeds ``max_update_norm`` is refused —
    by default a root-mean-square change of :data:`lorafleet.server.bounds.DEFAULT_MAX_DELTA_RMS` per base weight,
    ``math.inf`` to switch the bound off — and a result that is not finite is never returned
    (:func:`lorafleet.server.bounds.finite_adapter`)."""
    from contextlib import ExitStack

    from lorafleet.server import bounds

    m = get_method(method)
    if not paths:
        raise AggregationError("no client adapters to aggregate")
    with ExitStack() as stack:
        clients = open_clients(paths, stack)
        sizes = sum(s.shape[0] * s.shape[1] for s in clients[0].specs.values())
        limit = bounds.DEFAULT_MAX_DELTA_RMS * math.sqrt(sizes) if max_update_norm is None else max_update_norm
        squares = [0.0] * len(clients)

        def load(name: str) -> list[LoraPair]:
            pairs = [c.pair(name) for c in clients]
            for i, (client, pair) in enumerate(zip(clients, pairs, strict=True)):
                squares[i] += bounds.change_sq_norm(pair, None)
                if not math.sqrt(squares[i]) <= limit:
                    raise AdapterError(f"{client.path}: its update has ‖ΔW‖_F above the bound {limit:.3g} "
                                       f"(--max-update-norm; at least {math.sqrt(squares[i]):.3g})")
            return pairs

        result = engine.run(m, [c.specs for c in clients], [str(c.path) for c in clients],
                            [c.config for c in clients], load, weights, rank, options)
    check_output(result)
    return result


def check_output(adapter: Adapter) -> None:
    """Raise :class:`AggregationError` unless ``adapter`` is finite (factors and every ΔW in float32)."""
    from lorafleet.server.bounds import finite_adapter

    verdict = finite_adapter(adapter)
    if not verdict.finite:
        raise AggregationError(f"the aggregate is not finite ({verdict.reason}); nothing was written")


def distribute(global_adapter: Adapter, r: int) -> Adapter:
    """The rank-``r`` adapter a client of rank r receives: the first r components of every module (HetLoRA's
    and FlexLoRA's distribution; for FlexLoRA and raFLoRA it is the rank-r truncated SVD of the aggregate),
    same ΔW scaling per component. Modules below rank r (``rank_pattern``) are kept whole."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise AggregationError(f"rank must be an integer, got {r!r}")
    return truncate(global_adapter, r)
