"""Checking every device reply before anything in it is aggregated: client updates are untrusted.

A train reply must hold exactly two records — ``arrays`` (the adapter) and ``metrics`` — and nothing else.
It is checked cheapest first, and nothing is deserialized before its metadata passed:

1. metrics: only the protocol's keys (:data:`lorafleet.export.formats.protocol.TRAIN_REPLY_METRICS`); ``num-examples`` a
   positive integer (how much it weighs is capped later, :mod:`lorafleet.server.replies`); ``rank`` one of the
   package's ranks, equal to the rank the device was sent (HetLoRA may shrink it by self-pruning, never grow
   it); other values finite numbers;
2. array names: exactly the PEFT keys of every target module at that rank — none missing, none extra;
3. array metadata: ``numpy.ndarray`` serialization, a float dtype (float16/32/64, native byte order), the
   declared shape equal to the model's (lora_A r × in, lora_B out × r), the payload no larger than that
   shape needs (so an oversized reply is refused before it is parsed);
4. values: deserialized with ``numpy.load(allow_pickle=False)`` (never unpickled), the parsed dtype and
   shape equal to the declared ones, every value finite.

A failing reply raises :class:`RejectedUpdate` with a one-line reason; the strategy logs it, counts it in the
round's metrics and leaves the reply out. Limits come from the package (:meth:`ReplyLimits.from_adapter`).
How large a valid update may be is :mod:`lorafleet.server.replies`' concern.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorafleet.export.formats import protocol as P
from lorafleet.export.formats.errors import AdapterError, ConfigError, LorafleetError

if TYPE_CHECKING:
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    from lorafleet.export.formats.adapter import Adapter

NPY_HEADER_MAX = 4096  # numpy's .npy header (magic, version, dict) is far smaller; a bigger payload is padding
MAX_INT64 = 2**63 - 1


class RejectedUpdate(LorafleetError):
    """A device reply that failed validation; ``str(exc)`` is the reason."""


@dataclass(frozen=True)
class ReplyLimits:
    """What a valid reply can hold: the model's LoRA module shapes, the package's ranks and scaling."""

    module_shapes: dict[str, tuple[int, int]]  # full module name (model.layers.0.self_attn.q_proj) -> (out, in)
    ranks: tuple[int, ...]
    lora_alpha: float
    use_rslora: bool = False
    target_modules: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.module_shapes:
            raise ConfigError("ReplyLimits.module_shapes is empty")
        if not self.ranks or any(r <= 0 for r in self.ranks):
            raise ConfigError(f"ReplyLimits.ranks must be positive integers, got {self.ranks}")

    @classmethod
    def from_adapter(cls, adapter: Adapter, ranks: tuple[int, ...], lora_alpha: float, *,
                     use_rslora: bool = False) -> ReplyLimits:
        """Limits for a package whose adapters have ``adapter``'s modules (e.g. its initial adapter)."""
        shapes = {name: p.shape for name, p in adapter.modules.items()}
        targets = tuple(sorted({name.rsplit(".", 1)[-1] for name in shapes}))
        return cls(shapes, tuple(sorted(ranks)), lora_alpha, use_rslora, targets)


@dataclass(frozen=True)
class Update:
    """A reply that passed validation."""

    adapter: Adapter  # at ``rank``, the package's scaling
    num_examples: int
    rank: int
    metrics: dict[str, float]


def validate_train_reply(content: RecordDict, sent_rank: int, limits: ReplyLimits, *,
                         may_shrink: bool = False) -> Update:
    """Check a train reply against the rank it was sent; raise :class:`RejectedUpdate` with the reason."""
    _check_records(content, {P.ARRAYS: "ArrayRecord", P.METRICS: "MetricRecord"})
    metrics = _numbers(content.metric_records[P.METRICS], P.TRAIN_REPLY_METRICS, required=(P.NUM_EXAMPLES, P.RANK))
    num_examples = _integer(metrics, P.NUM_EXAMPLES, 1, MAX_INT64)
    rank = _integer(metrics, P.RANK, 1, max(limits.ranks))
    if rank not in limits.ranks:
        raise RejectedUpdate(f"rank {rank} is not one of the package's ranks {list(limits.ranks)}")
    if rank > sent_rank or (rank < sent_rank and not may_shrink):
        raise RejectedUpdate(f"rank {rank} differs from the rank {sent_rank} the device was sent"
                             + (" (ranks never grow)" if may_shrink else ""))
    arrays = _check_arrays(content.array_records[P.ARRAYS], P.expected_shapes(limits.module_shapes, rank))
    try:
        adapter = P.adapter_from_arrays(arrays, rank, limits.lora_alpha, use_rslora=limits.use_rslora,
                                        target_modules=limits.target_modules or None, origin="reply",
                                        check_finite=False)  # every value was checked above
    except AdapterError as exc:
        raise RejectedUpdate(str(exc)) from None
    return Update(adapter, num_examples, rank, metrics)


def validate_query_reply(content: RecordDict, limits: ReplyLimits) -> int:
    """The rank a device announced in reply to the rank query (``0``: no packaged rank fits it)."""
    _check_records(content, {P.METRICS: "MetricRecord"})
    metrics = _numbers(content.metric_records[P.METRICS], P.QUERY_REPLY_METRICS, required=(P.RANK,))
    rank = _integer(metrics, P.RANK, 0, max(limits.ranks))
    if rank != P.NO_RANK and rank not in limits.ranks:
        raise RejectedUpdate(f"rank {rank} is not one of the package's ranks {list(limits.ranks)}")
    return rank


# --- the checks -----------------------------------------------------------------------------------------

def _check_records(content: Any, expected: dict[str, str]) -> None:
    """Exactly the ``expected`` record names, each of the expected record type."""
    try:
        names = set(content.keys())
    except AttributeError:
        raise RejectedUpdate("the reply has no content") from None
    if names != set(expected):
        extra, missing = sorted(names - set(expected)), sorted(set(expected) - names)
        raise RejectedUpdate(f"the reply must hold records {sorted(expected)}"
                             + (f"; unexpected {extra}" if extra else "") + (f"; missing {missing}" if missing else ""))
    for name, kind in expected.items():
        if type(content[name]).__name__ != kind:
            raise RejectedUpdate(f"record {name!r} must be a {kind}, got {type(content[name]).__name__}")


def _numbers(record: MetricRecord, allowed: frozenset[str], required: tuple[str, ...]) -> dict[str, float]:
    keys = set(record.keys())
    if extra := sorted(keys - allowed):
        raise RejectedUpdate(f"unexpected metrics {extra} (allowed: {sorted(allowed)})")
    if missing := [k for k in required if k not in keys]:
        raise RejectedUpdate(f"missing metrics {missing}")
    out: dict[str, float] = {}
    for key in sorted(keys):
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RejectedUpdate(f"metric {key!r} must be a finite number, got {value!r}")
        out[key] = value
    return out


def _integer(metrics: Mapping[str, float], key: str, low: int, high: int) -> int:
    value = metrics[key]
    if not isinstance(value, int) or not low <= value <= high:
        raise RejectedUpdate(f"{key} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _check_arrays(record: ArrayRecord, shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Names, then every array's metadata, then values; returns name -> numpy array."""
    names = set(record.keys())
    if names != set(shapes):
        extra, missing = sorted(names - set(shapes)), sorted(set(shapes) - names)
        raise RejectedUpdate("arrays do not match the model's LoRA modules at this rank"
                             + (f"; unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''}" if extra else "")
                             + (f"; missing {missing[:3]}{' ...' if len(missing) > 3 else ''}" if missing else ""))
    for name in sorted(shapes):
        _check_metadata(name, record[name], shapes[name])
    return {name: _values(name, record[name], shapes[name]) for name in sorted(shapes)}


def _check_metadata(name: str, array: Array, shape: tuple[int, int]) -> None:
    import numpy as np

    if array.stype != "numpy.ndarray":
        raise RejectedUpdate(f"{name}: serialization {array.stype!r} is not numpy.ndarray")
    if array.dtype not in P.FLOAT_DTYPES:
        raise RejectedUpdate(f"{name}: dtype {array.dtype!r} is not one of {list(P.FLOAT_DTYPES)}")
    if tuple(array.shape) != shape:
        raise RejectedUpdate(f"{name}: shape {tuple(array.shape)} is not the expected {shape}")
    limit = shape[0] * shape[1] * np.dtype(array.dtype).itemsize + NPY_HEADER_MAX
    if len(array.data) > limit:
        raise RejectedUpdate(f"{name}: {len(array.data)} bytes exceed the {limit} its shape needs")


def _values(name: str, array: Array, shape: tuple[int, int]) -> Any:
    import numpy as np

    try:
        values = array.numpy()  # numpy.load(..., allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise RejectedUpdate(f"{name}: unreadable array data ({str(exc).splitlines()[0][:120]})") from None
    if values.dtype != np.dtype(array.dtype) or values.shape != shape:
        raise RejectedUpdate(f"{name}: the data holds {values.dtype} {values.shape}, not the declared "
                             f"{array.dtype} {shape}")
    if not np.isfinite(values).all():
        raise RejectedUpdate(f"{name}: NaN or Inf values")
    return values
