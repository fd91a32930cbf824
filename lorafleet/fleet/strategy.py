"""The emulated fleet's strategy: lorafleet's Flower strategy plus availability, sampling and deadlines.

:class:`FleetStrategy` subclasses :class:`lorafleet.server.strategy.LoraFleetStrategy` (which keeps doing the per-rank
payloads, reply validation and heterogeneous-rank aggregation) and adds what an emulated fleet needs,
following :mod:`lorafleet.fleet.emulation`:

* once, before round 1: every node is asked which device it is (``query.fleet``), so the server can apply
  each device's profile;
* :meth:`eligible_nodes`: only online devices are sampled (``fraction`` of the fleet, seeded); sampled
  devices whose profile fits no packaged rank get no work and are dropped;
* :meth:`screen_replies`: each reply's emulated round time (the device's local steps at its emulated step
  time — from the step's FLOPs, or the host's training seconds scaled — plus the adapter down and up) is
  compared with the deadline; stragglers are dropped before the parent
  validates, bounds and aggregates the rest;
* :meth:`round_finished`: what happened is kept as a :class:`RoundOutcome` per round.

FedAvg trains one rank on every participant: the fleet's smallest (``fleet-min``: what every device can
train — the "bucket effect") or, as an upper bound that ignores device limits, its largest (``fleet-max``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, RecordDict

from lorafleet.export.formats import protocol as P
from lorafleet.export.formats.errors import ConfigError, LorafleetError
from lorafleet.fleet.client import DEVICE, IDENTIFY_ACTION
from lorafleet.fleet.emulation import online_mask, round_duration, round_seconds, sample_devices, split_stragglers
from lorafleet.fleet.plan import EmulatedDevice, ranked
from lorafleet.server.strategy import LoraFleetStrategy, RoundResult

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from flwr.app import ArrayRecord
    from flwr.serverapp import Grid

    from lorafleet.export.formats.adapter import Adapter

IDENTIFY_TIMEOUT = 3600.0
FLEET_KEY = "fleet"  # the round's RoundOutcome in the checkpoint's history entry
DEVICE_RANKS = "fleet-device-ranks"  # the checkpoint's config: device -> its current rank
REGISTER_TIMEOUT = 300.0  # seconds to wait for the simulation engine to register every node


@dataclass(frozen=True)
class Emulation:
    """The fleet's devices and the server's emulation settings."""

    devices: list[EmulatedDevice]  # index = device id
    fraction: float
    deadline: float | None
    seed: int
    adapter_bytes: dict[int, int]  # rank -> fp32 adapter bytes on the wire (one way)
    fedavg_rank: str = "fleet-min"


@dataclass
class RoundOutcome:
    """Who did what in one round (device ids; times in emulated seconds)."""

    round: int
    online: int
    sampled: list[int]
    participants: list[int] = field(default_factory=list)
    ranks: dict[int, int] = field(default_factory=dict)  # participant -> rank of its update (HetLoRA may prune)
    dropped: dict[int, str] = field(default_factory=dict)  # device -> why
    device_times: dict[int, float] = field(default_factory=dict)
    round_time: float = 0.0
    loss: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "online": self.online, "sampled": list(self.sampled),
                "participants": list(self.participants), "ranks": {str(d): r for d, r in self.ranks.items()},
                "dropped": {str(d): why for d, why in self.dropped.items()},
                "device_times": {str(d): t for d, t in self.device_times.items()}, "round_time": self.round_time,
                "loss": self.loss}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RoundOutcome:
        return cls(int(d["round"]), int(d["online"]), [int(x) for x in d["sampled"]],
                   [int(x) for x in d["participants"]], {int(k): int(v) for k, v in d["ranks"].items()},
                   {int(k): str(v) for k, v in d["dropped"].items()},
                   {int(k): float(v) for k, v in d["device_times"].items()}, float(d["round_time"]),
                   None if d["loss"] is None else float(d["loss"]))


class FleetStrategy(LoraFleetStrategy):
    """:class:`LoraFleetStrategy` over emulated devices (see the module docstring)."""

    def __init__(self, *, emulation: Emulation, initial_adapter: Callable[[int], Adapter],
                 on_round: Callable[[RoundOutcome], None] = lambda _o: None,
                 on_stage: Callable[[str], None] = lambda _s: None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.emulation = emulation
        self.initial_adapter = initial_adapter  # rank -> the package's initial adapter
        self.on_round, self.on_stage = on_round, on_stage
        self.node_of: dict[int, int] = {}  # device -> Flower node id
        self.device_of: dict[int, int] = {}
        self.outcomes: list[RoundOutcome] = []
        self._outcome: RoundOutcome | None = None

    # --- who is who -------------------------------------------------------------------------------------

    def identify(self, grid: Grid) -> None:
        """Ask every node which device it is; record its rank; fix FedAvg's one rank."""
        n = len(self.emulation.devices)
        nodes = _all_nodes(grid, n)
        self.on_stage(f"asking {n} devices which one each node is")
        query = ConfigRecord({P.PROTOCOL: P.PROTOCOL_VERSION})
        messages = [Message(RecordDict({P.CONFIG: query}), dst_node_id=node,
                            message_type=f"query.{IDENTIFY_ACTION}") for node in nodes]
        for reply in grid.send_and_receive(messages, timeout=IDENTIFY_TIMEOUT):
            self._record_identity(reply)
        if len(self.node_of) != n:
            raise LorafleetError(f"only {len(self.node_of)} of {n} devices answered who they are")
        saved = self.state.config.get(DEVICE_RANKS, {})  # a resumed fleet: ranks HetLoRA pruned before
        for d, node in self.node_of.items():
            if str(d) in saved:
                self.state.node_ranks[str(node)] = int(saved[str(d)])
        if self.state.method == "fedavg":
            ranks = ranked(self.emulation.devices)
            if not ranks:
                raise ConfigError("no device of the fleet fits any packaged rank: nobody can train")
            r = min(ranks) if self.emulation.fedavg_rank == "fleet-min" else max(ranks)
            self.state.global_rank = r
            if self.state.round == 0:  # a resumed fleet keeps the checkpoint's adapter
                self.global_adapter = self.initial_adapter(r)
        self.on_stage(f"round {self.state.round + 1}: training")

    def _record_identity(self, reply: Message) -> None:
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise LorafleetError(f"node {node} failed to say which device it is: {reply.error.reason}")
        metrics = reply.content.metric_records[P.METRICS]
        d, rank = metrics.get(DEVICE), metrics.get(P.RANK)
        if not isinstance(d, int) or not 0 <= d < len(self.emulation.devices) or d in self.node_of:
            raise LorafleetError(f"node {node} answered an invalid or repeated device id {d!r}")
        expected = self.emulation.devices[d].rank or P.NO_RANK
        if rank != expected:
            raise LorafleetError(f"device {d} announced rank {rank!r}, the fleet plan gave it {expected}")
        self.node_of[d], self.device_of[node] = node, d
        self.state.node_ranks[str(node)] = expected

    # --- sampling ---------------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if not self.node_of:
            self.identify(grid)
        return super().configure_train(server_round, arrays, config, grid)

    def eligible_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """The round's online, sampled devices that fit a packaged rank; the others are recorded as dropped."""
        e = self.emulation
        online = online_mask([d.availability for d in e.devices], server_round, e.seed)
        sampled = sample_devices(online, e.fraction, server_round, e.seed)
        self._outcome = out = RoundOutcome(server_round, int(online.sum()), sampled)
        trainable = []
        for d in sampled:
            dev = e.devices[d]
            if dev.rank is None:
                out.dropped[d] = dev.unable_reason
                if dev.unable_seconds is not None:
                    out.device_times[d] = dev.unable_seconds
            else:
                trainable.append(self.node_of[d])
        return trainable

    # --- deadlines --------------------------------------------------------------------------------------

    def screen_replies(self, server_round: int, replies: list[Message]) -> dict[int, str]:
        """Each reply's emulated round time against the deadline: stragglers are dropped."""
        e, out, sent = self.emulation, self._outcome, self.sent
        assert out is not None, "configure_train runs first"
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in sent:
                continue
            dev, rank = e.devices[self.device_of[node]], sent[node]
            if dev.step_seconds:  # flops emulation: the device's own step time, whatever this host's load
                seconds: float | None = self.settings.local_steps * dev.step_seconds[rank]
                scale = 1.0
            else:  # measured emulation: the host's training seconds, scaled to the device
                seconds, scale = _train_seconds(reply), dev.time_scale
            if seconds is not None:
                out.device_times[self.device_of[node]] = round_seconds(
                    seconds, scale, e.adapter_bytes[rank], dev.down_mbps, dev.up_mbps)
        _, late = split_stragglers(out.device_times, e.deadline)
        return {self.node_of[d]: f"straggler: {out.device_times[d]:.1f} s > deadline {e.deadline:g} s"
                for d in late if self.node_of[d] in sent}

    def round_finished(self, result: RoundResult) -> None:
        e, out = self.emulation, self._outcome
        assert out is not None, "configure_train runs first"
        on_time, late = split_stragglers(out.device_times, e.deadline)
        out.participants = sorted(self.device_of[n] for n in result.valid)
        out.ranks = {self.device_of[n]: u.rank for n, u in result.valid.items()}
        out.dropped.update({self.device_of[n]: why for n, why in result.dropped.items()})
        out.round_time = round_duration([out.device_times[d] for d in on_time if d in out.participants],
                                        e.deadline, bool(late))
        out.loss = result.loss
        self.outcomes.append(out)
        self.state.history[-1][FLEET_KEY] = out.to_json()  # saved with the round: a resumed fleet can report it
        self.state.config[DEVICE_RANKS] = {str(d): int(self.state.node_ranks[str(n)])
                                           for d, n in sorted(self.node_of.items())
                                           if str(n) in self.state.node_ranks}
        self.on_round(out)


def _all_nodes(grid: Grid, n: int) -> list[int]:
    """The simulation's ``n`` node ids, once the engine has registered them all (it does so while the
    ServerApp starts)."""
    deadline = time.monotonic() + REGISTER_TIMEOUT
    while len(nodes := list(grid.get_node_ids())) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    if len(nodes) != n:
        raise ConfigError(f"the simulation has {len(nodes)} nodes, the fleet {n} devices")
    return nodes


def _train_seconds(reply: Message) -> float | None:
    """The reply's host training seconds, if it has a usable one (validation judges the rest)."""
    if reply.has_error() or P.METRICS not in reply.content.metric_records:
        return None
    value = reply.content.metric_records[P.METRICS].get(P.TRAIN_SECONDS)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return float(value)
