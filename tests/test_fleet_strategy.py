"""The fleet strategy on an in-process Grid (messages cross Flower's wire encoding): offline devices are
never sampled, stragglers past the deadline are dropped before aggregation, devices without a rank are
dropped when sampled, and FedAvg trains the fleet's smallest (or largest) rank.

Oracle: the new global adapter is exactly the pure aggregation of the on-time devices' replies.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import fake_package
from fed_helpers import LoopbackGrid, received_arrays, reply
from flwr.app import ArrayRecord

from lorafleet.export.formats import protocol as P
from lorafleet.fleet.client import DEVICE
from lorafleet.fleet.plan import EmulatedDevice
from lorafleet.fleet.server import build_fleet_strategy
from lorafleet.fleet.strategy import Emulation
from lorafleet.server.aggregation import aggregate
from lorafleet.server.server_app import ServerConfig

RANKS = (2, 4, 8)
DEADLINE = 10.0
FAST = 1e6  # Mbit/s: transfers take microseconds


def _device(rank, seconds=1.0, availability=1.0, unable_seconds=None):
    return (EmulatedDevice("p", rank, 1.0, FAST, FAST, availability, unable_seconds,
                           "" if rank else "no packaged rank fits p: too slow"), seconds)


# device id -> (emulated device, host training seconds it reports)
FLEET = {0: _device(8, 1.0), 1: _device(4, 2.0), 2: _device(8, 50.0), 3: _device(2, availability=0.0),
         4: _device(None, unable_seconds=30.0), 5: _device(4, 3.0)}


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return fake_package(tmp_path_factory.mktemp("fleet-pkg") / "pkg", ranks=RANKS, runtimes=("onnx",))


class Node:
    """A fake virtual device: says which device it is, returns the received adapter plus noise."""

    def __init__(self, device: int):
        self.device, (self.emulated, self.seconds) = device, FLEET[device]
        self.trained: list[tuple[int, dict[str, np.ndarray]]] = []

    def __call__(self, msg):
        if msg.metadata.message_type == "query.fleet":
            return reply(msg, None, {DEVICE: self.device, P.RANK: self.emulated.rank or 0})
        cfg = msg.content["config"]
        g = np.random.default_rng(self.device * 100 + int(cfg[P.SERVER_ROUND]))
        out = {k: (v + 0.05 * np.clip(g.standard_normal(v.shape), -2, 2)).astype(np.float32)  # within AdamW's reach
               for k, v in received_arrays(msg).items()}
        self.trained.append((int(cfg[P.RANK]), out))
        return reply(msg, out, {P.NUM_EXAMPLES: 10 + self.device, P.RANK: int(cfg[P.RANK]), P.LOSS: 1.0,
                                P.TRAIN_SECONDS: self.seconds})


def _run(package, method="flexlora", rounds=1, fedavg_rank="fleet-min"):
    nodes = {1000 + d: Node(d) for d in FLEET}
    emulation = Emulation([FLEET[d][0] for d in sorted(FLEET)], 1.0, DEADLINE, 0,
                          {r: 4 * r * 224 for r in RANKS}, fedavg_rank)
    config = ServerConfig(package=str(package), method=method, rounds=rounds, min_clients=1, min_valid=1,
                          round_timeout=30.0)
    outcomes = []
    strategy = build_fleet_strategy(config, emulation, outcomes.append)
    strategy.start(grid=LoopbackGrid(nodes), initial_arrays=ArrayRecord(), num_rounds=rounds, timeout=30.0)
    return strategy, outcomes, {n.device: n for n in nodes.values()}


def test_offline_devices_are_not_sampled_and_stragglers_are_not_aggregated(package):
    strategy, outcomes, nodes = _run(package)
    out = outcomes[0]
    assert out.online == 5 and out.sampled == [0, 1, 2, 4, 5]  # device 3 is never online
    assert out.participants == [0, 1, 5] and out.ranks == {0: 8, 1: 4, 5: 4}
    assert set(out.dropped) == {2, 4}
    assert out.dropped[2].startswith("straggler: 50.0 s > deadline 10 s")
    assert "no packaged rank fits" in out.dropped[4] and out.device_times[4] == 30.0
    assert out.device_times[0] == pytest.approx(1.0) and out.device_times[2] == pytest.approx(50.0)
    assert out.round_time == DEADLINE  # someone straggled: the server waited until the deadline
    assert not nodes[3].trained and not nodes[4].trained  # offline, and no rank: never sent work
    assert nodes[2].trained  # the straggler did train; its update came too late
    on_time = [nodes[d].trained[0] for d in (0, 1, 5)]
    expected = aggregate("flexlora", [P.adapter_from_arrays(a, r, 16.0) for r, a in on_time], [10, 11, 15], rank=8)
    got = strategy.global_adapter.modules
    for name, pair in expected.modules.items():  # ΔW: SVD factors are unique only up to signs
        torch.testing.assert_close(got[name].delta(), pair.delta(), atol=1e-5, rtol=1e-4)
    late = [*on_time, nodes[2].trained[0]]
    with_late = aggregate("flexlora", [P.adapter_from_arrays(a, r, 16.0) for r, a in late], [10, 11, 15, 12], rank=8)
    assert not torch.allclose(with_late.modules[name].delta(), got[name].delta(), atol=1e-4)


def test_every_round_is_recorded_and_devices_keep_their_ranks(package):
    strategy, outcomes, nodes = _run(package, rounds=2)
    assert [o.round for o in outcomes] == [1, 2]
    for d in (0, 1, 5):
        assert [r for r, _ in nodes[d].trained] == [FLEET[d][0].rank] * 2  # the plan's rank, every round
    assert strategy.state.history[-1]["valid"].keys() == {str(1000 + d) for d in (0, 1, 5)}


@pytest.mark.parametrize(("fedavg_rank", "expected"), [("fleet-min", 2), ("fleet-max", 8)])
def test_fedavg_trains_one_rank_of_the_fleet(package, fedavg_rank, expected):
    strategy, outcomes, nodes = _run(package, method="fedavg", fedavg_rank=fedavg_rank)
    assert strategy.global_adapter.r == expected  # rank 2 is device 3's, offline but part of the fleet
    assert {r for d in (0, 1, 2, 5) for r, _ in nodes[d].trained} == {expected}
