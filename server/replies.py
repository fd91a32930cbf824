"""What the server does with a round's valid replies before one of them touches the global adapter.

Validation (:mod:`lorafleet.server.validation`) has made each reply a well-formed :class:`Update`. Here, in order:

1. **Bound** — a reply that changed any LoRA parameter of the adapter it was sent by more than AdamW can
   in the round's local steps at its learning rate (:func:`lorafleet.server.bounds.adamw_step_limit`; the default),
   or — with a fixed ``max_update_norm`` — whose weight change ‖ΔW_reply − ΔW_sent‖_F exceeds it, is dropped.
2. **Cap the weight** — a reply's example count counts at most ``max_examples`` (the claim is recorded).
3. **Clip** (``clip_updates`` = K > 0) — each parameter update is clipped to K × the round's median norm.
4. **Aggregate, finitely** — :func:`aggregate_finite` aggregates; if the result is not finite
   (:func:`lorafleet.server.bounds.finite_adapter`), the reply with the largest change is dropped and the rest
   re-aggregated, until the result is finite or nothing is left (then the global adapter is kept).

Everything that happened to a reply is a typed field of :class:`RoundResult` (the history entry is rendered
from it); nothing here raises for a bad reply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from lorafleet.export.formats.adapter import truncate
from lorafleet.export.formats.errors import ConfigError
from lorafleet.server import bounds as B

if TYPE_CHECKING:
    from lorafleet.export.formats.adapter import Adapter
    from lorafleet.server.validation import Update

DEFAULT_MAX_EXAMPLES = 10_000


@dataclass(frozen=True)
class ReplyBounds:
    """How much one reply may do. ``max_update_norm`` 0: derived from lr and local steps per reply."""

    max_update_norm: float = 0.0
    max_examples: int = DEFAULT_MAX_EXAMPLES
    clip_updates: float = 0.0  # K: clip parameter updates to K × the round's median norm; 0: off

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_update_norm) and self.max_update_norm >= 0):
            raise ConfigError(f"max_update_norm must be 0 (derived) or a positive number, got {self.max_update_norm}")
        if isinstance(self.max_examples, bool) or not isinstance(self.max_examples, int) or self.max_examples < 1:
            raise ConfigError(f"max_examples must be a positive integer, got {self.max_examples!r}")
        if not (math.isfinite(self.clip_updates) and (self.clip_updates == 0 or self.clip_updates >= 1)):
            raise ConfigError(f"clip_updates must be 0 (off) or a multiple of the median >= 1, got {self.clip_updates}")


@dataclass(frozen=True)
class Training:
    """What the devices were told to do this round (what an honest update can amount to)."""

    lr: float
    local_steps: int
    prune_lambda: float = 0.0  # HetLoRA self-pruning's λ when it is on, else 0


@dataclass
class Screened:
    """The round's updates after :func:`screen` (keys: node ids)."""

    updates: dict[int, Update]
    dropped: dict[int, str] = field(default_factory=dict)
    notes: dict[int, list[str]] = field(default_factory=dict)
    change_norms: dict[int, float] = field(default_factory=dict)  # the bounded size of each reply's change


def screen(updates: Mapping[int, Update], sent: Mapping[int, Adapter], bounds: ReplyBounds,
           training: Training) -> Screened:
    """Steps 1–3 of the module docstring. ``sent[node]``: the adapter that node was sent."""
    out = Screened({})
    references: dict[int, B.Reference] = {}  # one per adapter sent (per rank), prepared once
    for node, u in sorted(updates.items()):
        ref = references.setdefault(id(sent[node]), B.Reference(sent[node]))
        if bounds.max_update_norm:
            size, limit = ref.change_norm(u.adapter), bounds.max_update_norm
            what = "changes the weights by ‖ΔW − ΔW_sent‖_F ="
        else:
            size = B.max_abs_change(u.adapter, sent[node])
            limit = ref.step_limit(training.lr, training.local_steps, training.prune_lambda)
            what = "moves a LoRA parameter by"
        out.change_norms[node] = size
        if not size <= limit:
            out.dropped[node] = (f"its update {what} {size:.3g}, above the bound {limit:.3g} for lr "
                                 f"{training.lr:g} × {training.local_steps} steps")
            continue
        if u.num_examples > bounds.max_examples:
            out.notes.setdefault(node, []).append(f"claimed {u.num_examples} examples, weighted as "
                                                  f"{bounds.max_examples} (--max-examples)")
            u = replace(u, num_examples=bounds.max_examples)
        out.updates[node] = u
    if bounds.clip_updates and out.updates:
        _clip(out, sent, bounds.clip_updates)
    return out


def _clip(out: Screened, sent: Mapping[int, Adapter], multiple: float) -> None:
    base = {n: truncate(sent[n], u.rank) if u.rank < sent[n].r else sent[n] for n, u in out.updates.items()}
    norms = {n: B.parameter_update_norm(u.adapter, base[n]) for n, u in out.updates.items()}
    limit = B.clip_limit(list(norms.values()), multiple)
    for node, u in out.updates.items():
        clipped, c = B.clip_update(u.adapter, base[node], limit)
        if c < 1.0:
            out.updates[node] = replace(u, adapter=clipped)
            out.notes.setdefault(node, []).append(f"update clipped by {c:.3g} to {multiple:g} × the median norm")


def aggregate_finite(method: str, updates: Mapping[int, Update], rank: int,
                     change_norms: Mapping[int, float]) -> tuple[Adapter | None, dict[int, str], float]:
    """Aggregate ``updates`` (step 4): the result (``None``: nothing finite), the nodes dropped for it, and
    the seconds the finiteness checks took."""
    import time

    from lorafleet.server.aggregation import aggregate

    kept = dict(updates)
    dropped: dict[int, str] = {}
    checking = 0.0
    while kept:
        ordered = sorted(kept.items(), key=lambda kv: _digest(kv[1]))  # arrival order and node ids never matter
        result = aggregate(method, [u.adapter for _, u in ordered], [u.num_examples for _, u in ordered], rank=rank)
        t0 = time.perf_counter()
        check = B.finite_adapter(result)
        checking += time.perf_counter() - t0
        if check.finite:
            return result, dropped, checking
        worst = max(kept, key=lambda n: (change_norms.get(n, math.inf), n))
        dropped[worst] = f"with it the aggregate is not finite ({check.reason}); dropped and re-aggregated"
        del kept[worst]
    return None, dropped, checking


def _digest(update: Update) -> str:
    import hashlib

    h = hashlib.sha256()
    for key, t in sorted(update.adapter.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class RoundResult:
    """One round, as data: what was sent, accepted, dropped (and why), and what happened to each reply."""

    round: int
    global_rank: int
    sent: dict[int, int]  # node -> rank sent
    valid: dict[int, Update]
    dropped: dict[int, str]
    aggregated: bool
    notes: dict[int, list[str]] = field(default_factory=dict)
    change_norms: dict[int, float] = field(default_factory=dict)  # the bounded size of each change
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> float | None:
        from lorafleet.export.formats import protocol as P

        losses = [(u.metrics[P.LOSS], u.num_examples) for u in self.valid.values() if P.LOSS in u.metrics]
        total = sum(n for _, n in losses)
        return sum(v * n for v, n in losses) / total if total else None

    def history_entry(self) -> dict[str, Any]:
        """The round's entry in ``state.json``'s history."""
        return {
            "round": self.round, "aggregated": self.aggregated, "global_rank": self.global_rank,
            "sent": {str(n): r for n, r in sorted(self.sent.items())},
            "valid": {str(n): {"rank": u.rank, "num_examples": u.num_examples} for n, u in sorted(self.valid.items())},
            "update_sizes": {str(n): _finite_or_none(x) for n, x in sorted(self.change_norms.items())},
            "dropped": {str(n): why for n, why in sorted(self.dropped.items())},
            "notes": {str(n): list(v) for n, v in sorted(self.notes.items())},
            "loss": self.loss,
            "seconds": {k: round(v, 6) for k, v in self.seconds.items()},
        }


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(f"{x:.6g}")
