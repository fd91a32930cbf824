"""The lorafleet strategy: Flower's FedAvg with per-rank payloads and validated heterogeneous-rank aggregation.

A thin adapter over Flower (the pattern of Flower's own FedAdam and FlowerTune): :class:`FedAvg` samples
nodes and logs; this class

* learns each sampled node's rank once, with a rank query the device answers from its profiler (HetLoRA,
  Cho et al. 2024, gives every client the largest rank its resources allow);
* in :meth:`configure_train` sends every node the global adapter distributed to its rank
  (:func:`server.aggregation.distribute`: the first r components — HetLoRA's truncation, FlexLoRA's rank-r
  SVD slice, Bai et al. 2024), expressed at the package's ``lora_alpha`` so the device's compiled program
  takes it as is;
* in :meth:`aggregate_train` validates every reply (:mod:`server.validation`), drops and logs the bad ones,
  and calls the pure aggregation (:func:`server.aggregation.aggregate`) weighted by example counts; with
  fewer valid replies than the minimum the previous global adapter is kept;
* checkpoints after every round (:mod:`server.checkpoint`).

FedAvg needs one rank: every node trains the package's smallest rank (the one any device that can train at
all can train). HetLoRA, FlexLoRA and raFLoRA keep the global adapter at the package's largest rank; FlexLoRA's
and raFLoRA's devices receive its rank-r truncated SVD.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from export import protocol as P
from export.adapter import rescale
from export.errors import ConfigError
from server.aggregation import METHODS, aggregate, distribute
from server.validation import RejectedUpdate, ReplyLimits, Update, validate_query_reply, validate_train_reply

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from export.adapter import Adapter
    from server.checkpoint import Checkpoint, ServerState


@dataclass(frozen=True)
class TrainSettings:
    """What every device is told to do in a round (sent in the train message's config)."""

    local_steps: int = 10
    lr: float = 1e-3
    batch_size: int = 0  # 0: the package's compiled batch size
    self_prune: bool = True  # HetLoRA only
    prune_gamma: float = 0.99
    round_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ConfigError(f"local_steps must be at least 1, got {self.local_steps}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.batch_size < 0:
            raise ConfigError(f"batch_size must be 0 (the package's) or positive, got {self.batch_size}")
        if not 0 < self.prune_gamma < 1:
            raise ConfigError(f"prune_gamma must be in (0, 1), got {self.prune_gamma}")
        if not self.round_timeout > 0:
            raise ConfigError(f"round_timeout must be positive, got {self.round_timeout}")


def global_rank_for(method: str, ranks: Iterable[int]) -> int:
    """The global adapter's rank: the smallest packaged rank for fedavg, the largest otherwise."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    return min(ranks) if method == "fedavg" else max(ranks)


class LoraFleetStrategy(FedAvg):
    """FedAvg's sampling with lorafleet's per-rank payloads, validation, aggregation and checkpoints."""

    def __init__(self, *, global_adapter: Adapter, state: ServerState, limits: ReplyLimits,
                 settings: TrainSettings, checkpoint: Checkpoint | None = None, min_clients: int = 2,
                 min_valid: int | None = None, fraction: float = 1.0) -> None:
        super().__init__(fraction_train=fraction, fraction_evaluate=0.0, min_train_nodes=min_clients,
                         min_available_nodes=min_clients)
        self.global_adapter = global_adapter
        self.state = state
        self.limits = limits
        self.settings = settings
        self.checkpoint = checkpoint
        self.min_valid = min_clients if min_valid is None else min_valid
        self.round_offset = state.round  # Flower counts rounds from 1 in every run; a resumed run continues
        self._sent: dict[int, int] = {}  # node id -> rank sent this round
        self._round_started = 0.0
        self._configure_seconds = 0.0

    # --- configure ------------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample (FedAvg), learn unknown nodes' ranks, and send each node the global adapter at its rank.

        ``arrays`` is ignored: the strategy keeps the global adapter itself, at full precision.
        """
        self._round_started = time.perf_counter()
        rnd = server_round + self.round_offset
        self._wait_for_nodes(grid)
        random.seed(self.state.seed * 1_000_003 + rnd)  # FedAvg samples with `random`: reproducible rounds
        sampled = [m.metadata.dst_node_id for m in super().configure_train(rnd, ArrayRecord(), config, grid)]
        self._learn_ranks(grid, sampled)
        start = time.perf_counter()
        payloads: dict[int, ArrayRecord] = {}
        messages, self._sent = [], {}
        for node in sampled:
            r = self._train_rank(node)
            if r is None:
                continue
            if r not in payloads:
                payloads[r] = P.adapter_record(self._distributed(r))
            content = RecordDict({P.ARRAYS: payloads[r], P.CONFIG: self._train_config(config, rnd, r)})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
            self._sent[node] = r
        self._configure_seconds = time.perf_counter() - start
        log(INFO, "configure_train: round %d sends ranks %s", rnd, _counts(self._sent.values()))
        return messages

    def _wait_for_nodes(self, grid: Grid) -> None:
        """Wait until the minimum number of nodes is connected, so FedAvg sizes its sample on all of them."""
        while len(list(grid.get_node_ids())) < self.min_available_nodes:
            time.sleep(1.0)

    def _learn_ranks(self, grid: Grid, nodes: list[int]) -> None:
        """Ask nodes whose rank is unknown which rank they train (their profiler decides)."""
        unknown = [n for n in nodes if str(n) not in self.state.node_ranks]
        if not unknown:
            return
        query = {P.PROTOCOL: P.PROTOCOL_VERSION, P.ROUND_TIMEOUT: self.settings.round_timeout,
                 P.LOCAL_STEPS: self.settings.local_steps}
        messages = [Message(RecordDict({P.CONFIG: ConfigRecord(dict(query))}), dst_node_id=n,
                            message_type=MessageType.QUERY) for n in unknown]
        for reply in grid.send_and_receive(messages, timeout=self.settings.round_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "node %d did not answer the rank query: %s", node, reply.error.reason)
                continue
            try:
                rank = validate_query_reply(reply.content, self.limits)
            except RejectedUpdate as exc:
                log(WARNING, "node %d: invalid rank reply dropped: %s", node, exc)
                continue
            self.state.node_ranks[str(node)] = rank
            log(INFO, "node %d trains rank %s", node, rank or "none (no packaged rank fits the device)")

    def _train_rank(self, node: int) -> int | None:
        known = self.state.node_ranks.get(str(node))
        if not known:  # unknown (no answer yet) or NO_RANK
            return None
        return self.state.global_rank if self.state.method == "fedavg" else min(known, self.state.global_rank)

    def _distributed(self, r: int) -> Adapter:
        """The global adapter at rank ``r``, at the package's scaling ``lora_alpha / r``."""
        return rescale(distribute(self.global_adapter, r), self.limits.lora_alpha,
                       use_rslora=self.limits.use_rslora)

    def _train_config(self, base: ConfigRecord, rnd: int, r: int) -> ConfigRecord:
        s = self.settings
        cfg: dict[str, Any] = dict(base)
        cfg.update({
            P.PROTOCOL: P.PROTOCOL_VERSION, P.SERVER_ROUND: rnd, P.RANK: r, P.METHOD: self.state.method,
            P.LORA_ALPHA: float(self.limits.lora_alpha), P.USE_RSLORA: self.limits.use_rslora,
            P.LOCAL_STEPS: s.local_steps, P.LEARNING_RATE: s.lr, P.BATCH_SIZE: s.batch_size,
            P.SEED: self.state.seed * 1_000_003 + rnd, P.ROUND_TIMEOUT: s.round_timeout,
            P.SELF_PRUNE: s.self_prune and self.state.method == "hetlora", P.PRUNE_GAMMA: s.prune_gamma,
        })
        return ConfigRecord(cfg)

    # --- aggregate ------------------------------------------------------------------------------------

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, aggregate the valid ones, checkpoint; see the module docstring."""
        rnd = server_round + self.round_offset
        start = time.perf_counter()
        updates, dropped = self._validated(list(replies))
        validated = time.perf_counter()
        aggregated = len(updates) >= self.min_valid
        if aggregated:
            ordered = sorted(updates.values(), key=_digest)  # arrival order and node ids never matter
            self.global_adapter = aggregate(self.state.method, [u.adapter for u in ordered],
                                            [u.num_examples for u in ordered], rank=self.state.global_rank)
            if self.state.method == "hetlora":  # self-pruned ranks stay pruned (ranks never grow)
                self.state.node_ranks.update({str(n): u.rank for n, u in updates.items()})
        else:
            log(WARNING, "round %d: %d valid replies, fewer than the minimum %d: the global adapter is kept",
                rnd, len(updates), self.min_valid)
        done = time.perf_counter()
        entry = self._history_entry(rnd, updates, dropped, aggregated,
                                    {"configure": self._configure_seconds, "validation": validated - start,
                                     "aggregation": done - validated, "round": done - self._round_started})
        self.state.round, self.state.finished = rnd, rnd >= self.state.rounds
        self.state.history.append(entry)
        if self.checkpoint is not None:
            self.checkpoint.save(self.state, self.global_adapter)
        metrics = MetricRecord({"valid-replies": len(updates), "dropped-replies": len(dropped),
                                "aggregated": int(aggregated), **({"loss": entry["loss"]} if entry["loss"] else {})})
        return P.adapter_record(self.global_adapter), metrics

    def _validated(self, replies: list[Message]) -> tuple[dict[int, Update], dict[int, str]]:
        """Valid updates and the reasons the others were dropped, by node id."""
        updates: dict[int, Update] = {}
        dropped: dict[int, str] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in self._sent:
                reason = "a reply to no message of this round"
            elif reply.has_error():
                reason = f"the device reported an error: {reply.error.reason}"
            elif node in updates or node in dropped:
                reason = "more than one reply"
            else:
                try:
                    may_shrink = self.state.method == "hetlora" and self.settings.self_prune
                    updates[node] = validate_train_reply(reply.content, self._sent[node], self.limits,
                                                         may_shrink=may_shrink)
                    continue
                except RejectedUpdate as exc:
                    reason = str(exc)
            updates.pop(node, None)
            dropped[node] = reason
            log(WARNING, "reply from node %d dropped: %s", node, reason)
        for node in self._sent.keys() - updates.keys() - dropped.keys():
            dropped[node] = f"no reply within the round timeout ({self.settings.round_timeout:g} s)"
            log(WARNING, "node %d: %s", node, dropped[node])
        return updates, dropped

    def _history_entry(self, rnd: int, updates: dict[int, Update], dropped: dict[int, str], aggregated: bool,
                       seconds: dict[str, float]) -> dict[str, Any]:
        losses = [(u.metrics[P.LOSS], u.num_examples) for u in updates.values() if P.LOSS in u.metrics]
        total = sum(n for _, n in losses)
        return {
            "round": rnd, "aggregated": aggregated, "global_rank": self.state.global_rank,
            "sent": {str(n): r for n, r in sorted(self._sent.items())},
            "valid": {str(n): {"rank": u.rank, "num_examples": u.num_examples} for n, u in sorted(updates.items())},
            "dropped": {str(n): why for n, why in sorted(dropped.items())},
            "loss": sum(v * n for v, n in losses) / total if total else None,
            "seconds": {k: round(v, 6) for k, v in seconds.items()},
        }


def _digest(update: Update) -> str:
    h = hashlib.sha256()
    for key, t in sorted(update.adapter.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _counts(ranks: Iterable[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in ranks:
        out[r] = out.get(r, 0) + 1
    return dict(sorted(out.items()))
