"""The lorafleet ClientApp: what a device runs inside a Flower SuperNode.

Two messages, in the protocol of :mod:`lorafleet.export.formats.protocol` (``docs/federation-protocol.md``):

* **query** — "which rank do you train?". The device's profiler answers (:mod:`lorafleet.edge_client.profiler`: an
  emulated device from ``profile``, or this machine with ``measure``) under the server's budgets — its round
  timeout and local steps — unless the node was given a fixed ``rank``. The answer is kept in
  ``context.state`` for the rest of the run.
* **train** — the global adapter at the device's rank plus instructions; the trainer
  (:func:`lorafleet.edge_client.trainer.train_local`) trains locally and the reply carries the trained adapter, the
  example count and the rank (smaller than the one sent only after HetLoRA self-pruning).

In deployment Flower starts a fresh process for every message, so nothing heavy is kept between messages:
the per-node state is the chosen rank (``context.state``), and a decision made for an emulated profile is
also cached on disk (profiling trains a few steps in child processes). Node settings come from the
SuperNode's ``--node-config`` (keys :data:`NODE_CONFIG_KEYS`); simulation passes them with
:func:`make_client_app`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.clientapp import ClientApp

from lorafleet.export.formats import protocol as P
from lorafleet.export.formats.errors import ConfigError

if TYPE_CHECKING:
    from flwr.app import Context, Message

    from lorafleet.export.formats.package import Package

NODE_CONFIG_KEYS = ("package", "data", "backend", "profile", "measure", "rank", "cache-dir", "events")
STATE_KEY = "lorafleet"
RUNTIME_BACKENDS = {"onnx": "onnxruntime", "executorch": "executorch"}  # package runtime -> training backend


@dataclass(frozen=True)
class NodeSettings:
    """One device's settings: its package, data, backend, and how it picks its rank."""

    package: str
    data: str
    backend: str = "auto"  # auto: from the profile's runtimes and the package's
    profile: str = ""  # a device profile TOML: an emulated device
    measure: bool = False  # measure this machine
    rank: int = 0  # > 0: a fixed rank, no profiling
    cache_dir: str = ""  # where emulated-profile decisions are cached ("" = the lorafleet cache)
    events: str = ""  # a JSONL file to append what the node did to (lorafleet.edge_client.events; "" = none)

    def __post_init__(self) -> None:
        if not self.package or not self.data:
            raise ConfigError(f"a node needs package and data, got package={self.package!r} data={self.data!r}")
        if self.rank < 0:
            raise ConfigError(f"rank must be positive (or 0 for the profiler's choice), got {self.rank}")
        if self.rank == 0 and bool(self.profile) == self.measure:
            raise ConfigError("a node picks its rank from exactly one of profile (a device profile file) or "
                              "measure (this machine), unless it is given a rank")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        """Build from a SuperNode's ``--node-config`` (the keys of :data:`NODE_CONFIG_KEYS`; unknown keys are an
        error): each value checked against its field's type by a strict pydantic model, then by ``__post_init__``."""
        from lorafleet.export.formats.schema import Problem, parse_fields

        def problem(p: Problem) -> str:
            unknown = p.unknown()
            if unknown:
                return f"unknown node-config keys {unknown} (known: {list(NODE_CONFIG_KEYS)})"
            name = str(p.top).replace("-", "_")
            if p.type == "missing":
                return f"node-config {name} is missing (a node needs package and data)"
            wanted = {"int_type": "int", "bool_type": "bool", "string_type": "a string"}.get(p.type)
            if wanted is None:
                return f"node-config {name}: {p.message}, got {p.input!r}"
            return f"node-config {name} must be {wanted}, got {p.input!r}"

        return parse_fields(cls, node_config, {k: k.replace("-", "_") for k in NODE_CONFIG_KEYS}, problem, ConfigError)

    def to_node_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


def make_client_app(node_settings: NodeSettings | Callable[[Context], NodeSettings] | None = None) -> ClientApp:
    """A ClientApp running lorafleet. ``node_settings``: fixed settings, a function of the node's context
    (simulation: e.g. from ``context.node_config["partition-id"]``), or ``None`` to read ``--node-config``."""
    client_app = ClientApp()

    def settings_of(context: Context) -> NodeSettings:
        if node_settings is None:
            return NodeSettings.from_node_config(context.node_config)
        return node_settings if isinstance(node_settings, NodeSettings) else node_settings(context)

    @client_app.query()
    def query(message: Message, context: Context) -> Message:
        return handle_query(message, context, settings_of(context))

    @client_app.train()
    def train(message: Message, context: Context) -> Message:
        return handle_train(message, context, settings_of(context))

    return client_app


# --- query ----------------------------------------------------------------------------------------------

def handle_query(message: Message, context: Context, settings: NodeSettings) -> Message:
    from flwr.app import Message, MetricRecord, RecordDict

    config = message_config(message)
    rank = node_rank(settings, context, round_timeout=float(config.get(P.ROUND_TIMEOUT, 600.0)),
                     local_steps=int(config.get(P.LOCAL_STEPS, 10)))
    if settings.events:
        from lorafleet.edge_client.events import RankEvent, append_event

        append_event(settings.events, RankEvent(rank))
    return Message(RecordDict({P.METRICS: MetricRecord({P.RANK: rank})}), reply_to=message)


def node_rank(settings: NodeSettings, context: Context, *, round_timeout: float, local_steps: int) -> int:
    """The rank this node trains (``0``: none fits), decided once per run and kept in ``context.state``."""
    from flwr.app import ConfigRecord

    kept = context.state.config_records.get(STATE_KEY)
    if kept is not None and isinstance(kept.get("rank"), int):
        return int(kept["rank"])  # type: ignore[arg-type]
    pkg = _open(settings)
    if settings.rank:
        pkg.manifest.rank(settings.rank)  # PackageError naming the ranks it has
        rank = settings.rank
    else:
        rank = _profiled_rank(settings, pkg, round_timeout, local_steps)
    context.state.config_records[STATE_KEY] = ConfigRecord({"rank": rank})
    return rank


def _profiled_rank(settings: NodeSettings, pkg: Package, round_timeout: float, local_steps: int) -> int:
    from lorafleet.edge_client.rank_choice import Budgets

    budgets = Budgets(time_budget_seconds=round_timeout, steps_per_round=local_steps)
    backend = resolve_backend(settings, pkg)
    cache = _decision_cache(settings, pkg, backend, budgets)
    if cache is None:
        return profile_rank(settings, pkg, backend, budgets)[0]
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.with_suffix(".lock"), "w") as lock:  # nodes sharing a profile profile it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cache.is_file():
            from lorafleet.export.formats.atomic import atomic_write_text

            rank, reasons = profile_rank(settings, pkg, backend, budgets)
            atomic_write_text(cache, json.dumps({"rank": rank, "reasons": reasons}, indent=1))
        return int(json.loads(cache.read_text())["rank"])


def profile_rank(settings: NodeSettings, pkg: Package, backend: str, budgets: Any) -> tuple[int, list[str]]:
    """The rank the profiler picks for this node under ``budgets`` (``NO_RANK``: none fits), and why."""
    from lorafleet.edge_client.profiler import profile_device

    result = profile_device(node_device(settings, pkg), pkg, backend, budgets)
    return result.selected_rank or P.NO_RANK, list(result.decision.reasons)


def node_device(settings: NodeSettings, pkg: Package) -> Any:
    """This machine measured at the package's layer shapes, or the profile's device emulated on it (as
    ``lorafleet profile`` does)."""
    from lorafleet.edge_client.device import emulate, measure_device
    from lorafleet.edge_client.profiles import load_profile

    tokens = pkg.manifest.batch_size * pkg.manifest.seq_len
    host = measure_device(tuple((tokens, i, o) for o, i in pkg.manifest.model.module_shapes.values()))
    return host if settings.measure else emulate(load_profile(settings.profile), host.gflops)


def _decision_cache(settings: NodeSettings, pkg: Package, backend: str, budgets: Any) -> Path | None:
    """Where an emulated profile's decision is cached (a measured device is always measured afresh)."""
    if settings.measure:
        return None
    from lorafleet.export.formats.manifest import MANIFEST_FILE

    h = hashlib.sha256(b"lorafleet-rank-decision-v1")
    for part in ((pkg.path / MANIFEST_FILE).read_bytes(), Path(settings.profile).read_bytes(),
                 backend.encode(), repr(budgets).encode()):
        h.update(hashlib.sha256(part).digest())
    if settings.cache_dir:
        root = Path(settings.cache_dir)
    else:
        from lorafleet.export.formats.cache import cache_dir

        root = cache_dir() / "ranks"
    return root / f"{h.hexdigest()[:24]}.json"


def resolve_backend(settings: NodeSettings, pkg: Package) -> str:
    """``settings.backend``, or for ``auto``: the first of the profile's runtimes the package has, and for a
    measured device ONNX Runtime before ExecuTorch (both train faster than eager torch, docs/BENCHMARKS.md; ORT
    artifacts are what Jetson-class boards run)."""
    if settings.backend != "auto":
        return settings.backend
    have = [RUNTIME_BACKENDS[rt] for rt in ("onnx", "executorch") if rt in pkg.manifest.runtimes]
    wanted = have
    if settings.profile:
        from lorafleet.edge_client.profiles import load_profile

        wanted = [b for b in load_profile(settings.profile).runtimes if b in have]
    if not wanted:
        raise ConfigError(f"the package's runtimes {pkg.manifest.runtimes} include none this device runs; "
                          f"pass a backend explicitly")
    return wanted[0]


# --- train ----------------------------------------------------------------------------------------------

def handle_train(message: Message, context: Context, settings: NodeSettings) -> Message:
    """Train on the received adapter; reply with the trained adapter, example count and rank."""
    pkg = _open(settings)
    return train_reply(message, pkg, lambda rank, lr: resolve_backend(settings, pkg), settings.data,
                       events=settings.events)


def train_reply(message: Message, pkg: Package, backend: Callable[[int, float], Any], data: str | Path, *,
                seconds: str = "wall", events: str = "") -> Message:
    """The device's train handler, shared by real devices and emulated ones: check the server's message and
    adapter against ``pkg``, train ``local-steps`` steps on the JSONL ``data`` with ``backend(rank, lr)`` (a
    backend name or a built :class:`~lorafleet.edge_client.backends.TrainingBackend`), and reply with the
    trained adapter and its metrics (the loss only when finite).

    ``train-seconds`` is the wall time of local training (``seconds="wall"``), or, for an emulated device whose
    host is shared, the host seconds of its steps alone (``"steps"``: median step × steps). ``events``: a file
    to append the round's :class:`~lorafleet.edge_client.events.RoundEvent` to."""
    from flwr.app import Message, MetricRecord, RecordDict

    from lorafleet.edge_client.data import read_jsonl
    from lorafleet.edge_client.self_prune import SelfPruneConfig
    from lorafleet.edge_client.trainer import train_local

    config = message_config(message)
    received = received_adapter(message, config, pkg)
    lr = float(config[P.LEARNING_RATE])
    prune = (SelfPruneConfig(gamma=float(config[P.PRUNE_GAMMA]), lam=float(config.get(P.PRUNE_LAMBDA, 1.0)))
             if config.get(P.SELF_PRUNE) else False)
    start = time.perf_counter()
    result = train_local(pkg, received.r, backend(received.r, lr), read_jsonl(data).examples,
                         initial_adapter=received, steps=int(config[P.LOCAL_STEPS]),
                         batch_size=int(config[P.BATCH_SIZE]) or None, lr=lr,
                         seed=device_seed(int(config[P.SEED]), str(data)), self_prune=prune)
    took = time.perf_counter() - start if seconds == "wall" else result.step_seconds * len(result.losses)
    metrics: dict[str, Any] = {P.NUM_EXAMPLES: result.num_examples, P.RANK: result.rank, P.TRAIN_SECONDS: took}
    loss = float(statistics.fmean(result.losses))
    if events:
        from lorafleet.edge_client.events import RoundEvent, append_event

        append_event(events, RoundEvent(
            round=int(config.get(P.SERVER_ROUND, 0)), num_rounds=int(config.get(P.NUM_ROUNDS, 0)), rank=result.rank,
            steps=len(result.losses), loss_first=result.losses[0], loss_last=result.losses[-1], seconds=took,
            num_examples=result.num_examples))
    if math.isfinite(loss):
        metrics[P.LOSS] = loss
    return Message(RecordDict({P.ARRAYS: P.adapter_record(result.adapter), P.METRICS: MetricRecord(metrics)}),
                   reply_to=message)


def received_adapter(message: Message, config: Mapping[str, Any], pkg: Package) -> Any:
    """The adapter in a train message, checked against this node's package (same scaling and modules)."""
    m = pkg.manifest
    if float(config[P.LORA_ALPHA]) != m.lora_alpha or bool(config[P.USE_RSLORA]) != m.use_rslora:
        raise ConfigError(f"the server's adapter has lora_alpha {config[P.LORA_ALPHA]} (rsLoRA "
                          f"{config[P.USE_RSLORA]}), this node's package {m.lora_alpha} (rsLoRA {m.use_rslora}): "
                          f"server and device must use the same package")
    r = int(config[P.RANK])
    m.rank(r)
    arrays = {k: a.numpy() for k, a in message.content.array_records[P.ARRAYS].items()}
    return P.adapter_from_arrays(arrays, r, m.lora_alpha, use_rslora=m.use_rslora, target_modules=m.target_modules,
                                 origin="the server's adapter")


def device_seed(server_seed: int, data_path: str) -> int:
    """The round's seed mixed with this device's data, so devices differ and a rerun repeats exactly."""
    h = hashlib.sha256(Path(data_path).read_bytes())
    h.update(server_seed.to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest()[:4], "little")


def message_config(message: Message) -> Mapping[str, Any]:
    content = message.content
    if P.CONFIG not in content.config_records:
        raise ConfigError(f"the server's message has no {P.CONFIG!r} record")
    config = content.config_records[P.CONFIG]
    if config.get(P.PROTOCOL) != P.PROTOCOL_VERSION:
        raise ConfigError(f"the server speaks protocol {config.get(P.PROTOCOL)!r}, this device "
                          f"{P.PROTOCOL_VERSION}: upgrade the older side")
    return config


def _open(settings: NodeSettings) -> Package:
    from lorafleet.export.formats.package import open_package

    return open_package(settings.package, verify=False)


app = make_client_app()
