"""The lorafleet ServerApp: a Flower app whose strategy is :class:`lorafleet.server.strategy.LoraFleetStrategy`.

Deployment (``lorafleet serve``, or ``flwr run`` against a running ``flower-superlink``) reads the settings
from the run config (the keys of :data:`RUN_CONFIG_KEYS`, declared in
``lorafleet/federation/flower-app/pyproject.toml``).
Simulation passes them directly::

    from flwr.simulation import run_simulation
    from lorafleet.server.server_app import ServerConfig, make_server_app
    from lorafleet.edge_client.flower_client import make_client_app
    run_simulation(make_server_app(ServerConfig(package=..., method="flexlora", rounds=3, state_dir=...)),
                   make_client_app(node_settings=...), num_supernodes=1000)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

from flwr.serverapp import ServerApp

from lorafleet.export.formats.errors import ConfigError

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.serverapp import Grid

    from lorafleet.export.formats.adapter import Adapter
    from lorafleet.export.formats.package import Package
    from lorafleet.server.checkpoint import ServerState
    from lorafleet.server.strategy import LoraFleetStrategy

S = TypeVar("S", bound="LoraFleetStrategy")

# run-config key (as written in pyproject.toml and `flwr run -c`) -> ServerConfig field
RUN_CONFIG_KEYS = {
    "package": "package", "method": "method", "rounds": "rounds", "state-dir": "state_dir", "resume": "resume",
    "min-clients": "min_clients", "min-valid": "min_valid", "fraction": "fraction", "round-timeout": "round_timeout",
    "seed": "seed",
    "local-steps": "local_steps", "lr": "lr", "batch-size": "batch_size", "self-prune": "self_prune",
    "prune-gamma": "prune_gamma", "prune-lambda": "prune_lambda", "max-examples": "max_examples",
    "max-update-norm": "max_update_norm", "clip-updates": "clip_updates",
}


@dataclass(frozen=True)
class ServerConfig:
    """Everything the ServerApp needs. ``state_dir=""`` runs without checkpoints (simulation only)."""

    package: str
    method: str
    rounds: int
    state_dir: str = ""
    resume: bool = False
    min_clients: int = 2  # nodes to wait for before sampling (and the sample's minimum size)
    min_valid: int = 0  # valid replies needed to update the global adapter (0: min_clients)
    fraction: float = 1.0
    round_timeout: float = 600.0
    seed: int = 0
    local_steps: int = 10
    lr: float = 1e-3
    batch_size: int = 0
    self_prune: bool = True
    prune_gamma: float = 0.99
    prune_lambda: float = 1.0
    max_examples: int = 10_000  # a reply weighs at most this many examples (lorafleet.server.replies.ReplyBounds)
    max_update_norm: float = 0.0  # 0: each reply's bound derived from lr and local_steps
    clip_updates: float = 0.0  # K > 0: clip parameter updates to K × the round's median norm

    def __post_init__(self) -> None:
        from lorafleet.server.aggregation import METHODS

        if not self.package:
            raise ConfigError("package must be the path of an edge package, got ''")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}")
        if self.min_clients < 1:
            raise ConfigError(f"min_clients must be at least 1, got {self.min_clients}")
        if self.min_valid < 0:
            raise ConfigError(f"min_valid must be 0 (= min_clients) or positive, got {self.min_valid}")
        if not (0 < self.fraction <= 1) or math.isnan(self.fraction):
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        self.train_settings()  # validates the training fields
        self.reply_bounds()

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ServerConfig:
        """Build from a Flower run config (dash-separated keys; unknown keys are an error): each value checked
        against its field's type by a strict pydantic model of the fields (an int passes as a float, nothing
        passes as a bool or a number that is not one), then bounded by ``__post_init__``."""
        from lorafleet.export.formats.schema import parse_fields

        return parse_fields(cls, run_config, RUN_CONFIG_KEYS, _run_config_problem, ConfigError)

    def to_run_config(self) -> dict[str, Any]:
        return {key: getattr(self, name) for key, name in RUN_CONFIG_KEYS.items()}

    def train_settings(self) -> Any:
        from lorafleet.server.strategy import TrainSettings

        return TrainSettings(local_steps=self.local_steps, lr=self.lr, batch_size=self.batch_size,
                             self_prune=self.self_prune, prune_gamma=self.prune_gamma,
                             prune_lambda=self.prune_lambda, round_timeout=self.round_timeout)

    def reply_bounds(self) -> Any:
        from lorafleet.server.replies import ReplyBounds

        return ReplyBounds(max_update_norm=self.max_update_norm, max_examples=self.max_examples,
                           clip_updates=self.clip_updates)


def _run_config_problem(p: Any) -> str:
    """The one-line message for the first problem (a :class:`lorafleet.export.formats.schema.Problem`) of a
    run config."""
    unknown = p.unknown()
    if unknown:
        return f"unknown run-config keys {unknown} (known: {sorted(RUN_CONFIG_KEYS)})"
    if p.type == "missing":
        return f"run config {p.field} is missing (required)"
    wanted = {"bool_type": "true or false", "int_type": "an integer", "float_type": "a number",
              "string_type": "a string"}.get(p.type)
    if wanted is None:
        return f"run config {p.field}: {p.message}, got {p.input!r}"
    return f"run config {p.field} must be {wanted}, got {p.input!r}"


def open_server_package(path: str | Path) -> Package:
    """The package as the server needs it: manifest and initial adapters (program files are not read)."""
    from lorafleet.export.formats.package import open_package

    return open_package(path, verify=False)


def preflight(config: ServerConfig) -> None:
    """Check what a deployed run needs before any process starts: a state directory, the package, and a
    state directory that is new (or, with ``resume``, holds a run of the same method)."""
    from lorafleet.server.checkpoint import Checkpoint, CheckpointError
    from lorafleet.server.strategy import global_rank_for

    if not config.state_dir:
        raise ConfigError("a deployed server needs a state directory (--state)")
    pkg = open_server_package(config.package)
    pkg.initial_adapter(global_rank_for(config.method, pkg.ranks))
    ckpt = Checkpoint(config.state_dir)
    if not config.resume:
        ckpt.check_new()
        return
    ckpt.check_resumable()
    state, _ = ckpt.load()
    if state.method != config.method:
        raise CheckpointError(f"{ckpt.dir} holds a {state.method} run; it cannot resume as {config.method}")


@overload
def build_strategy(config: ServerConfig) -> tuple[LoraFleetStrategy, int]: ...


@overload
def build_strategy(config: ServerConfig, cls: type[S], **overrides: Any) -> tuple[S, int]: ...


def build_strategy(config: ServerConfig, cls: type[Any] | None = None, **overrides: Any) -> tuple[Any, int]:
    """The strategy for ``config`` (fresh, or resumed from its state directory) and the rounds left to run.

    ``cls`` (a :class:`LoraFleetStrategy` subclass, e.g. the emulated fleet's) is built instead of the base
    class with the same arguments; ``overrides`` replace or add constructor arguments."""
    from lorafleet.server.checkpoint import Checkpoint
    from lorafleet.server.strategy import LoraFleetStrategy, global_rank_for
    from lorafleet.server.validation import ReplyLimits

    pkg = open_server_package(config.package)
    m = pkg.manifest
    checkpoint = Checkpoint(config.state_dir, base_model=m.model.spec) if config.state_dir else None
    state, adapter = _initial_state(config, pkg, checkpoint)
    limits = ReplyLimits.from_adapter(pkg.initial_adapter(max(m.ranks)), tuple(m.ranks), m.lora_alpha,
                                      use_rslora=m.use_rslora)
    state.global_rank = global_rank_for(config.method, m.ranks)
    kwargs: dict[str, Any] = dict(global_adapter=adapter, state=state, limits=limits,
                                  settings=config.train_settings(), bounds=config.reply_bounds(),
                                  checkpoint=checkpoint, min_clients=config.min_clients,
                                  min_valid=config.min_valid or config.min_clients, fraction=config.fraction)
    strategy = (cls or LoraFleetStrategy)(**{**kwargs, **overrides})
    return strategy, max(config.rounds - state.round, 0)


def _initial_state(config: ServerConfig, pkg: Package,
                   checkpoint: Any) -> tuple[ServerState, Adapter]:
    from flwr.supercore import log

    from lorafleet.server.checkpoint import CheckpointError, ServerState
    from lorafleet.server.strategy import global_rank_for

    if checkpoint is not None and config.resume:
        checkpoint.check_resumable()
        state, adapter = checkpoint.load()
        if state.method != config.method:
            raise CheckpointError(f"{checkpoint.dir} holds a {state.method} run; it cannot resume as "
                                  f"{config.method}")
        state.rounds, state.finished = config.rounds, state.round >= config.rounds
        log(INFO, "resuming %s from %s after round %d of %d", state.method, checkpoint.dir, state.round,
            config.rounds)
        return state, adapter
    if checkpoint is not None and not config.resume:
        checkpoint.check_new()
    r = global_rank_for(config.method, pkg.ranks)
    state = ServerState(method=config.method, rounds=config.rounds, package=str(Path(config.package).resolve()),
                        global_rank=r, seed=config.seed, config=config.to_run_config())
    adapter = pkg.initial_adapter(r)
    if checkpoint is not None:
        checkpoint.save(state, adapter)  # round 0: a crash before round 1 ends can be resumed too
    return state, adapter


def run_server(grid: Grid, config: ServerConfig) -> ServerState:
    """Run ``config.rounds`` rounds (the rest of them, when resuming) on ``grid``; the final state."""
    from flwr.app import ArrayRecord
    from flwr.supercore import log

    strategy, remaining = build_strategy(config)
    if remaining:
        strategy.start(grid=_prompt(grid), initial_arrays=ArrayRecord(), num_rounds=remaining,
                       timeout=config.round_timeout)
    log(INFO, "lorafleet: %s finished after round %d; global adapter in %s", config.method,
        strategy.state.round, config.state_dir or "(memory only)")
    return strategy.state


class PromptGrid:
    """A Grid that looks for replies every ``interval`` seconds (Flower's deployment grid waits 3 s), so a
    round ends as soon as its last reply is in (the SuperLink answers each pull from memory; pulls are cheap),
    and tells ``on_replies(received, sent)`` as they arrive (the emulated fleet's progress display).

    A device whose heartbeat lapsed is sent its message again once it is connected again, within the same
    timeout: the SuperLink answers a message itself ("Node Unavailable") when its node missed heartbeats for
    2 × 30 s — a phone that lost its network for a minute, or every device of a server restarted with
    ``--resume`` whose heartbeats failed while it was down — and without a second send that device would sit
    out the round although it is back. A copy goes out at most ``resends`` times per message; when the device
    still gives no reply of its own, the SuperLink's first answer is what the caller gets (it refers to the
    message the caller sent).
    """

    def __init__(self, grid: Grid, interval: float = 0.5, on_replies: Callable[[int, int], None] | None = None,
                 resends: int = 3):
        self._grid, self.interval, self.on_replies, self.resends = grid, interval, on_replies, resends

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """As ``Grid.send_and_receive``: push, then pull until every reply is in or ``timeout`` passes."""
        from flwr.supercore import log

        messages = list(messages)
        ids = self._grid.push_messages(messages)  # [] when the SuperLink refused the payload as too large
        pending = {i: m for i, m in zip(ids, messages, strict=False) if i}
        total, replies = len(pending), []
        lapsed: dict[int, Message] = {}  # node -> the SuperLink's first answer for it, while it has no reply
        waiting: dict[int, Message] = {}  # node -> the message to send again once the node is connected
        sent_again: dict[int, int] = {}
        deadline = time.monotonic() + (timeout or 0.0)
        if self.on_replies:
            self.on_replies(0, total)
        while pending or waiting:
            got = list(self._grid.pull_messages(set(pending))) if pending else []
            for reply in got:
                message = pending.pop(reply.metadata.reply_to_message_id, None)
                if message is None:
                    replies.append(reply)
                    continue
                node = message.metadata.dst_node_id
                if _heartbeat_lapsed(reply):
                    lapsed.setdefault(node, reply)
                    if sent_again.get(node, 0) < self.resends:
                        waiting[node] = message
                    continue
                lapsed.pop(node, None)
                replies.append(reply)
            if waiting:
                connected = set(self._grid.get_node_ids())
                for node in [n for n in waiting if n in connected]:
                    copy = _copy(waiting.pop(node))
                    new_ids = list(self._grid.push_messages([copy]))
                    sent_again[node] = sent_again.get(node, 0) + 1
                    log(INFO, "node %d missed its heartbeats and is connected again: its message is sent again",
                        node)
                    if new_ids and new_ids[0]:
                        pending[new_ids[0]] = copy
            if got and self.on_replies:
                self.on_replies(len(replies), total)
            if not (pending or waiting) or (timeout is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.interval)
        return replies + list(lapsed.values())


def _heartbeat_lapsed(reply: Message) -> bool:
    """Whether ``reply`` is the SuperLink's own answer for a node that missed its heartbeats."""
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

    return (reply.metadata.src_node_id == SUPERLINK_NODE_ID and reply.has_error()
            and reply.error.code == ErrorCode.NODE_UNAVAILABLE)


def _copy(message: Message) -> Message:
    """A new message (a new id) with ``message``'s content, addressee, type and group."""
    from flwr.app import Message

    m = message.metadata
    return Message(message.content, dst_node_id=m.dst_node_id, message_type=m.message_type,
                   group_id=m.group_id or None)


def _prompt(grid: Grid) -> Grid:
    """Flower's deployment grid polls every 3 s; wrap it (simulation's in-memory grid is left alone)."""
    return PromptGrid(grid) if type(grid).__name__ == "HttpGrid" else grid  # type: ignore[return-value]


def make_server_app(config: ServerConfig | None = None) -> ServerApp:
    """A ServerApp running lorafleet; with ``config=None`` the settings come from the run config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, config or ServerConfig.from_run_config(context.run_config))

    return server_app


app = make_server_app()
