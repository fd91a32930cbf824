"""The lorafleet strategy: Flower's FedAvg with per-rank payloads and validated, bounded heterogeneous-rank
aggregation.

A thin adapter over Flower (the pattern of Flower's own FedAdam and FlowerTune): :class:`FedAvg` samples
nodes and logs; this class

* learns each sampled node's rank once, with a rank query the device answers from its profiler (HetLoRA,
  Cho et al. 2024, gives every client the largest rank its resources allow);
* in :meth:`configure_train` sends every node the global adapter distributed to its rank
  (:func:`lorafleet.server.aggregation.distribute`: the first r components — HetLoRA's truncation, FlexLoRA's rank-r
  SVD slice, Bai et al. 2024), expressed at the package's ``lora_alpha`` so the device's compiled program
  takes it as is;
* in :meth:`aggregate_train` validates every reply (:mod:`lorafleet.server.validation`), bounds, caps and optionally
  clips them against what each device was sent (:mod:`lorafleet.server.replies`), aggregates the rest with the pure
  aggregation weighted by example counts, and accepts the result only if it is finite; with fewer valid
  replies than the minimum the previous global adapter is kept;
* checkpoints after every round (:mod:`lorafleet.server.checkpoint`).

Subclasses (the emulated fleet) extend it through three hooks, never through its private state:
:meth:`eligible_nodes` (which connected nodes a round may sample), :meth:`screen_replies` (replies to drop
before validation, with the reason) and :meth:`round_finished` (a typed :class:`RoundResult` per round);
:attr:`sent` is the current round's node → rank.

FedAvg needs one rank: every node trains the package's smallest rank (the one any device that can train at
all can train). HetLoRA, FlexLoRA and raFLoRA keep the global adapter at the package's largest rank; FlexLoRA's
and raFLoRA's devices receive its rank-r truncated SVD.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from lorafleet.export.formats import protocol as P
from lorafleet.export.formats.adapter import rescale
from lorafleet.export.formats.errors import ConfigError
from lorafleet.server.aggregation import METHODS, distribute
from lorafleet.server.replies import ReplyBounds, RoundResult, Training, aggregate_finite, screen
from lorafleet.server.validation import RejectedUpdate, ReplyLimits, Update, validate_query_reply, validate_train_reply

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from lorafleet.export.formats.adapter import Adapter
    from lorafleet.server.checkpoint import Checkpoint, ServerState

__all__ = ["LoraFleetStrategy", "ReplyBounds", "RoundResult", "TrainSettings", "global_rank_for"]


@dataclass(frozen=True)
class TrainSettings:
    """What every device is told to do in a round (sent in the train message's config)."""

    local_steps: int = 10
    lr: float = 1e-3
    batch_size: int = 0  # 0: the package's compiled batch size
    self_prune: bool = True  # HetLoRA only
    prune_gamma: float = 0.99
    prune_lambda: float = 1.0
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
        if not 0 <= self.prune_lambda < float("inf"):
            raise ConfigError(f"prune_lambda must be a non-negative number, got {self.prune_lambda}")
        if not self.round_timeout > 0:
            raise ConfigError(f"round_timeout must be positive, got {self.round_timeout}")


def global_rank_for(method: str, ranks: Iterable[int]) -> int:
    """The global adapter's rank: the smallest packaged rank for fedavg, the largest otherwise."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    return min(ranks) if method == "fedavg" else max(ranks)


class LoraFleetStrategy(FedAvg):
    """FedAvg's sampling with lorafleet's per-rank payloads, validation, bounds, aggregation and checkpoints."""

    def __init__(self, *, global_adapter: Adapter, state: ServerState, limits: ReplyLimits,
                 settings: TrainSettings, bounds: ReplyBounds | None = None, checkpoint: Checkpoint | None = None,
                 min_clients: int = 2, min_valid: int | None = None, fraction: float = 1.0) -> None:
        super().__init__(fraction_train=fraction, fraction_evaluate=0.0, min_train_nodes=min_clients,
                         min_available_nodes=min_clients)
        self.global_adapter = global_adapter
        self.state = state
        self.limits = limits
        self.settings = settings
        self.bounds = bounds or ReplyBounds()
        self.checkpoint = checkpoint
        self.min_valid = min_clients if min_valid is None else min_valid
        self.round_offset = state.round  # Flower counts rounds from 1 in every run; a resumed run continues
        self._sent: dict[int, int] = {}  # node id -> rank sent this round
        self._payloads: dict[int, Adapter] = {}  # rank -> the adapter sent at that rank this round
        self._messages: list[Message] = []  # this round's train messages (Flower sets their ids when it pushes)
        self._round_started = 0.0
        self._configure_seconds = 0.0

    # --- hooks ----------------------------------------------------------------------------------------

    def eligible_nodes(self, grid: Grid, server_round: int) -> list[int] | None:
        """The connected nodes round ``server_round`` may sample (``None``: all of them)."""
        return None

    def screen_replies(self, server_round: int, replies: list[Message]) -> dict[int, str]:
        """Replies (by node) to drop before validation, with the reason; nothing by default."""
        return {}

    def round_finished(self, result: RoundResult) -> None:
        """Called after every round with what happened in it, before the round's checkpoint is written (so
        what a subclass adds to ``self.state`` — e.g. to ``self.state.history[-1]`` — is saved with it)."""

    @property
    def sent(self) -> Mapping[int, int]:
        """This round's node id → the rank it was sent."""
        return dict(self._sent)

    # --- configure ------------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample (FedAvg), learn unknown nodes' ranks, and send each node the global adapter at its rank.

        ``arrays`` is ignored: the strategy keeps the global adapter itself, at full precision.
        """
        self._round_started = time.perf_counter()
        self._sent, self._payloads, self._messages = {}, {}, []
        rnd = server_round + self.round_offset
        self._wait_for_nodes(grid)
        eligible = self.eligible_nodes(grid, rnd)
        if eligible is not None and not eligible:
            return []
        view: Any = grid if eligible is None else _NodesView(grid, eligible)
        random.seed(self.state.seed * 1_000_003 + rnd)  # FedAvg samples with `random`: reproducible rounds
        sampled = [m.metadata.dst_node_id for m in super().configure_train(rnd, ArrayRecord(), config, view)]
        self._learn_ranks(grid, sampled)
        start = time.perf_counter()
        records: dict[int, ArrayRecord] = {}
        messages = []
        for node in sampled:
            r = self._train_rank(node)
            if r is None:
                continue
            if r not in records:
                self._payloads[r] = self._distributed(r)
                records[r] = P.adapter_record(self._payloads[r])
            content = RecordDict({P.ARRAYS: records[r], P.CONFIG: self._train_config(config, rnd, r)})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
            self._sent[node] = r
        self._messages = messages
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
        unanswered: dict[int, str] = {}
        replies = _from_devices(messages, grid.send_and_receive(messages, timeout=self.settings.round_timeout),
                                unanswered)
        for node, why in unanswered.items():
            log(WARNING, "node %d did not answer the rank query: %s", node, why)
        for reply in replies:
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
            P.PROTOCOL: P.PROTOCOL_VERSION, P.SERVER_ROUND: rnd, P.NUM_ROUNDS: self.state.rounds, P.RANK: r,
            P.METHOD: self.state.method,
            P.LORA_ALPHA: float(self.limits.lora_alpha), P.USE_RSLORA: self.limits.use_rslora,
            P.LOCAL_STEPS: s.local_steps, P.LEARNING_RATE: s.lr, P.BATCH_SIZE: s.batch_size,
            P.SEED: self.state.seed * 1_000_003 + rnd, P.ROUND_TIMEOUT: s.round_timeout,
            P.SELF_PRUNE: self._self_prune, P.PRUNE_GAMMA: s.prune_gamma, P.PRUNE_LAMBDA: s.prune_lambda,
        })
        return ConfigRecord(cfg)

    @property
    def _self_prune(self) -> bool:
        return self.settings.self_prune and self.state.method == "hetlora"

    # --- aggregate ------------------------------------------------------------------------------------

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, bound and aggregate the round's replies, checkpoint; see the module docstring."""
        rnd = server_round + self.round_offset
        start = time.perf_counter()
        unanswered: dict[int, str] = {}
        replies = _from_devices(self._messages, replies, unanswered)
        dropped = {n: why for n, why in self.screen_replies(rnd, replies).items() if n in self._sent}
        dropped.update({n: why for n, why in unanswered.items() if n in self._sent})
        updates = self._validated([r for r in replies if r.metadata.src_node_id not in dropped], dropped)
        validated = time.perf_counter()
        s = self.settings
        training = Training(s.lr, s.local_steps, s.prune_lambda if self._self_prune else 0.0)
        screened = screen(updates, {n: self._payloads[self._sent[n]] for n in updates}, self.bounds, training)
        dropped.update(screened.dropped)
        bounded = time.perf_counter()
        accepted = screened.updates
        aggregated = len(accepted) >= self.min_valid
        finite_check = 0.0
        if aggregated:
            result, unfinite, finite_check = aggregate_finite(self.state.method, accepted, self.state.global_rank,
                                                              screened.change_norms)
            dropped.update(unfinite)
            accepted = {n: u for n, u in accepted.items() if n not in unfinite}
            aggregated = result is not None and len(accepted) >= self.min_valid
            if aggregated:
                assert result is not None
                self.global_adapter = result
                if self.state.method == "hetlora":  # self-pruned ranks stay pruned (ranks never grow)
                    self.state.node_ranks.update({str(n): u.rank for n, u in accepted.items()})
        if not aggregated:
            log(WARNING, "round %d: %d usable replies, fewer than the minimum %d: the global adapter is kept",
                rnd, len(accepted), self.min_valid)
        for node, why in sorted(dropped.items()):
            log(WARNING, "reply from node %d dropped: %s", node, why)
        done = time.perf_counter()
        outcome = RoundResult(rnd, self.state.global_rank, dict(self._sent), accepted, dropped, aggregated,
                              screened.notes, screened.change_norms,
                              {"configure": self._configure_seconds, "validation": validated - start,
                               "bounds": bounded - validated, "aggregation": done - bounded - finite_check,
                               "finite_check": finite_check, "round": done - self._round_started})
        self.state.round, self.state.finished = rnd, rnd >= self.state.rounds
        self.state.history.append(outcome.history_entry())
        self.round_finished(outcome)  # before the checkpoint: what a subclass records in the state is saved too
        if self.checkpoint is not None:
            self.checkpoint.save(self.state, self.global_adapter)
        loss = outcome.loss
        metrics = MetricRecord({"valid-replies": len(accepted), "dropped-replies": len(dropped),
                                "aggregated": int(aggregated), **({"loss": loss} if loss else {})})
        return P.adapter_record(self.global_adapter), metrics

    def _validated(self, replies: list[Message], dropped: dict[int, str]) -> dict[int, Update]:
        """Valid updates by node id; the reasons the others were dropped go into ``dropped``."""
        updates: dict[int, Update] = {}
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
                    updates[node] = validate_train_reply(reply.content, self._sent[node], self.limits,
                                                         may_shrink=self._self_prune)
                    continue
                except RejectedUpdate as exc:
                    reason = str(exc)
            updates.pop(node, None)
            dropped[node] = reason
        for node in self._sent.keys() - updates.keys() - dropped.keys():
            dropped[node] = f"no reply within the round timeout ({self.settings.round_timeout:g} s)"
        return updates


def _from_devices(sent: Iterable[Message], replies: Iterable[Message], unanswered: dict[int, str]) -> list[Message]:
    """The replies the devices sent; each reply the SuperLink made for a device goes into ``unanswered``.

    When a node's heartbeat lapses, or a reply expires, the SuperLink answers a message itself with an error
    whose source is the SuperLink (``SUPERLINK_NODE_ID``), not the node. It is attributed to the node the
    message went to (through ``reply_to_message_id``) and recorded only if that node sent no reply of its own:
    a device's own reply is what counts.
    """
    addressee = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    own, made = [], {}
    for reply in replies:
        if reply.metadata.src_node_id == SUPERLINK_NODE_ID and reply.has_error():
            node = addressee.get(reply.metadata.reply_to_message_id)
            if node is not None:
                made[node] = f"the SuperLink answered for the device: {reply.error.reason}"
        else:
            own.append(reply)
    answered = {r.metadata.src_node_id for r in own}
    unanswered.update({n: why for n, why in made.items() if n not in answered})
    return own


class _NodesView:
    """A Grid that shows only ``nodes`` to Flower's sampling."""

    def __init__(self, grid: Grid, nodes: list[int]):
        self._grid, self._nodes = grid, list(nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)


def _counts(ranks: Iterable[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in ranks:
        out[r] = out.get(r, 0) + 1
    return dict(sorted(out.items()))
