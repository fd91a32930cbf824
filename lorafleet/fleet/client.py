"""The ClientApp every virtual device of an emulated fleet runs inside Flower's simulation engine.

It speaks the federation protocol of :mod:`lorafleet.export.formats.protocol` (a train message carries the global
adapter at the device's rank; the reply carries the trained adapter, its rank, the example count and the loss) and adds
one query, ``query.fleet``, by which the server learns which device sits behind each Flower node id (the node's
``partition-id``) and the rank the fleet plan gave it. Training runs for real, through the real device's own
train handler (:func:`lorafleet.edge_client.flower_client.train_reply`: the received adapter checked against the
package, the device's batches seeded from its data, the package's programs on this host). Two things differ:

* ``train-seconds`` reports the host seconds of the local steps (median step × steps): the compute an
  emulated device is charged for, scaled to its speed by the server. A real device keeps its program
  loaded, so building the backend is not counted;
* the eager-torch backend, whose base model takes seconds to load, is kept per worker process and reused
  (its AdamW state is reset with every received adapter, as a new round does on a device).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.clientapp import ClientApp

from lorafleet.export.formats import protocol as P
from lorafleet.export.formats.errors import ConfigError

if TYPE_CHECKING:
    from flwr.app import Context, Message

    from lorafleet.edge_client.backends import TrainingBackend
    from lorafleet.export.formats.package import Package

IDENTIFY_ACTION = "fleet"  # message type "query.fleet"
DEVICE = "device"  # identify reply: the device id (partition id)
PARTITION_ID = "partition-id"


@dataclass(frozen=True)
class ClientPlan:
    """What every virtual device needs (small: it travels with each message to the simulation workers)."""

    package: str
    data_dir: str
    ranks: tuple[int, ...]  # per device; 0 = no packaged rank fits it
    backend: str
    threads: int = 1  # intra-op threads of a worker (the host was profiled with as many)
    device: str = "cpu"  # where the torch backend trains: "cuda" in a worker given a GPU share

    def data_path(self, device: int) -> Path:
        return device_data_path(self.data_dir, device)


def device_data_path(data_dir: str | Path, device: int) -> Path:
    """Where device ``device``'s local training data lives (JSONL)."""
    return Path(data_dir) / f"device-{device:05d}.jsonl"


def make_fleet_client_app(plan: ClientPlan) -> ClientApp:
    """The ClientApp of every virtual device; the device is the node's ``partition-id``."""
    app = ClientApp()

    @app.query(IDENTIFY_ACTION)
    def identify(message: Message, context: Context) -> Message:
        from flwr.app import Message, MetricRecord, RecordDict

        d = _device(context, plan)
        return Message(RecordDict({P.METRICS: MetricRecord({DEVICE: d, P.RANK: plan.ranks[d]})}),
                       reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return handle_train(message, plan, _device(context, plan))

    return app


def handle_train(message: Message, plan: ClientPlan, device: int) -> Message:
    """Train the received adapter on the device's data; reply with the adapter, rank, examples, loss, seconds
    (:func:`lorafleet.edge_client.flower_client.train_reply`, the real device's handler)."""
    from lorafleet.edge_client.flower_client import train_reply

    _set_threads(plan.threads)
    pkg = _package(plan.package)
    return train_reply(message, pkg, lambda rank, lr: _backend(plan.backend, pkg, rank, lr, plan.device),
                       plan.data_path(device), seconds="steps")


# --- per worker process ---------------------------------------------------------------------------------

_PACKAGES: dict[str, Package] = {}
_TORCH: dict[tuple[str, int, float, str], TrainingBackend] = {}


def _package(path: str) -> Package:
    if path not in _PACKAGES:
        from lorafleet.export.formats.package import open_package

        _PACKAGES[path] = open_package(path, verify=False)  # the fleet verified it before starting
    return _PACKAGES[path]


def _backend(name: str, pkg: Package, rank: int, lr: float, device: str = "cpu") -> str | TrainingBackend:
    """ONNX Runtime by name (a new round reopens its session anyway); torch built once per rank and kept (on
    ``device``: Ray points a worker given a GPU share at its GPU through CUDA_VISIBLE_DEVICES)."""
    if name != "torch":
        return name
    key = (str(pkg.path), rank, lr, device)
    if key not in _TORCH:
        from lorafleet.edge_client.backends import OptimizerConfig, make_backend

        _TORCH.clear()  # one base model per worker process at a time
        _TORCH[key] = make_backend("torch", pkg, rank, OptimizerConfig(lr=lr), device=device)
    return _TORCH[key]


def _set_threads(n: int) -> None:
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _device(context: Context, plan: ClientPlan) -> int:
    d = context.node_config.get(PARTITION_ID)
    if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < len(plan.ranks):
        raise ConfigError(f"node has no valid {PARTITION_ID} (got {d!r}; the fleet has {len(plan.ranks)} devices)")
    return d
