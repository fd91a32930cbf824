"""The strategy and ServerApp logic (server/strategy.py, server/server_app.py) on an in-process Grid.

Devices here are functions; every message crosses Flower's wire encoding (tests/fed_helpers.LoopbackGrid).
Oracles: what each node is sent is the global adapter truncated to its rank at the package's scaling; the
new global adapter is exactly the pure aggregation of the valid replies, whatever their order.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from export_helpers import fake_package
from fed_helpers import LAPSED, LoopbackGrid, PushPullGrid, received_arrays, reply
from flwr.app import Error, Message

from lorafleet.export.formats import protocol as P
from lorafleet.export.formats.adapter import read_adapter, rescale, truncate
from lorafleet.server.aggregation import aggregate
from lorafleet.server.checkpoint import Checkpoint
from lorafleet.server.server_app import PromptGrid, ServerConfig, build_strategy, run_server

RANKS = (2, 4, 8)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return fake_package(tmp_path_factory.mktemp("fed-pkg") / "pkg", ranks=RANKS, runtimes=("onnx",))


def config(package, tmp_path, method="flexlora", rounds=2, **kw) -> ServerConfig:
    return ServerConfig(package=str(package), method=method, rounds=rounds, state_dir=str(tmp_path / "state"),
                        min_clients=kw.pop("min_clients", 2), round_timeout=30.0, **kw)


class Device:
    """A well-behaved fake device: answers the rank query with ``rank`` and returns the received adapter
    plus a deterministic update; records what it was sent."""

    def __init__(self, rank: int, seed: int, n: int = 10, prune_to: int | None = None):
        self.rank, self.seed, self.n, self.prune_to = rank, seed, n, prune_to
        self.queries, self.received, self.replied = 0, [], []

    def __call__(self, msg: Message) -> Message:
        if msg.metadata.message_type == "query":
            self.queries += 1
            return reply(msg, None, {P.RANK: self.rank})
        cfg = msg.content["config"]
        arrays = received_arrays(msg)
        self.received.append((cfg[P.RANK], arrays, dict(cfg)))
        g = np.random.default_rng(self.seed * 100 + int(cfg[P.SERVER_ROUND]))
        # a trained-like update: every element moves at most 0.1, within what AdamW can do in 10 steps at lr 1e-3
        out = {k: (v + 0.05 * np.clip(g.standard_normal(v.shape), -2, 2)).astype(np.float32) for k, v in arrays.items()}
        r = int(cfg[P.RANK])
        if self.prune_to is not None and self.prune_to < r:
            r = self.prune_to
            out = {k: (v[:r] if ".lora_A." in k else v[:, :r]).copy() for k, v in out.items()}
        self.replied.append(out)
        return reply(msg, out, {P.NUM_EXAMPLES: self.n, P.RANK: r, P.LOSS: 1.0 + self.seed})


def run(package, tmp_path, devices: dict[int, object], **kw):
    cfg = config(package, tmp_path, **kw)
    grid = LoopbackGrid(devices)
    state = run_server(grid, cfg)
    return state, read_adapter(tmp_path / "state" / "global"), grid


def as_adapter(arrays, r, alpha):
    return P.adapter_from_arrays(arrays, r, alpha)


def test_each_node_gets_the_global_adapter_at_its_rank(package, tmp_path):
    devices = {11: Device(2, 1), 12: Device(4, 2), 13: Device(8, 3)}
    strategy, _ = build_strategy(config(package, tmp_path / "ref", rounds=1))
    global0 = strategy.global_adapter
    run(package, tmp_path, devices, rounds=2, seed=5)
    for d in devices.values():
        assert d.queries == 1  # the rank is learned once
        r, arrays, cfg = d.received[0]
        assert r == d.rank and cfg[P.METHOD] == "flexlora" and cfg[P.LOCAL_STEPS] == 10
        expected = P.adapter_arrays(rescale(truncate(global0, r), 16.0))
        assert arrays.keys() == expected.keys()
        assert all(np.array_equal(arrays[k], expected[k]) for k in expected)


@pytest.mark.parametrize("method", ["fedavg", "hetlora", "flexlora", "raflora"])
def test_the_global_adapter_is_the_aggregation_of_the_replies(package, tmp_path, method):
    devices = {21: Device(2, 1, n=3), 22: Device(4, 2, n=5), 23: Device(8, 3, n=7)}
    state, final, _ = run(package, tmp_path, devices, method=method, rounds=2)
    ordered = sorted(devices.items())
    adapters = [as_adapter(d.replied[-1], int(d.received[-1][0]), 16.0) for _, d in ordered]
    expected = aggregate(method, adapters, [d.n for _, d in ordered], rank=state.global_rank)
    for key, t in expected.state_dict().items():  # the strategy orders replies by digest: rounding may differ
        torch.testing.assert_close(final.state_dict()[key], t.float(), rtol=1e-5, atol=1e-6)
    assert state.round == 2 and state.finished
    assert state.global_rank == (2 if method == "fedavg" else 8)
    if method == "fedavg":  # one rank for everyone: the package's smallest
        assert {int(d.received[-1][0]) for d in devices.values()} == {2}
    history = json.loads((tmp_path / "state" / "state.json").read_text())["history"]
    assert [h["round"] for h in history] == [1, 2] and all(h["aggregated"] for h in history)
    assert history[-1]["valid"]["22"] == {"rank": 2 if method == "fedavg" else 4, "num_examples": 5}


def test_reply_order_and_node_ids_do_not_matter(package, tmp_path):
    a = run(package, tmp_path / "a", {1: Device(2, 1), 2: Device(4, 2), 3: Device(8, 3)})[1]
    b = run(package, tmp_path / "b", {903: Device(8, 3), 17: Device(2, 1), 5: Device(4, 2)})[1]
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def misbehaving(kind: str):
    """A device that answers the query with rank 4 and then sends one kind of bad reply."""
    def device(msg: Message) -> Message | None:
        if msg.metadata.message_type == "query":
            return reply(msg, None, {P.RANK: 4})
        arrays = received_arrays(msg)
        key = sorted(arrays)[0]
        metrics = {P.NUM_EXAMPLES: 10, P.RANK: 4}
        if kind == "nan":
            arrays[key] = np.full_like(arrays[key], np.nan)
        elif kind == "shape":
            arrays[key] = np.zeros((4, 3), np.float32)
        elif kind == "rank":
            arrays = {k: np.concatenate([v, v], axis=0 if ".lora_A." in k else 1) for k, v in arrays.items()}
            metrics[P.RANK] = 8
        elif kind == "keys":
            arrays["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 64), np.float32)
        elif kind == "examples":
            metrics[P.NUM_EXAMPLES] = -5
        elif kind == "error":
            return Message(Error(code=1, reason="out of memory"), reply_to=msg)
        elif kind == "silent":
            return None
        elif kind == "lapsed":
            return LAPSED
        return reply(msg, arrays, metrics)
    return device


BAD = {"nan": "NaN or Inf", "shape": "is not the expected", "rank": "rank 8 differs from the rank 4",
       "keys": "unexpected", "examples": "num-examples must be an integer", "error": "out of memory",
       "silent": "no reply within the round timeout", "lapsed": "the SuperLink answered for the device: "}


def test_misbehaving_devices_are_dropped_and_the_rest_aggregated(package, tmp_path):
    good = {1: Device(2, 1, n=3), 2: Device(8, 2, n=4)}
    bad = {100 + i: misbehaving(kind) for i, kind in enumerate(BAD)}
    state, final, _ = run(package, tmp_path, {**good, **bad}, method="hetlora", rounds=2)
    for entry in state.history:
        assert sorted(entry["valid"]) == ["1", "2"]
        for i, (kind, reason) in enumerate(BAD.items()):
            assert reason in entry["dropped"][str(100 + i)], kind
    adapters = [as_adapter(d.replied[-1], int(d.received[-1][0]), 16.0) for _, d in sorted(good.items())]
    expected = aggregate("hetlora", adapters, [3, 4], rank=8)
    assert all(torch.equal(final.state_dict()[k], v.float()) for k, v in expected.state_dict().items())
    assert all(torch.isfinite(t).all() for t in final.state_dict().values())


def test_a_reply_the_superlink_made_for_a_device_counts_only_when_the_device_sent_none(package, tmp_path):
    """Flower's SuperLink answers a message itself (source: the SuperLink, not the node) when the node's
    heartbeat lapses; the strategy attributes it to the node it was for, and a device's own reply wins."""
    class Flaky(Device):
        def __call__(self, msg):
            answer = super().__call__(msg)
            return (LAPSED, answer) if msg.metadata.message_type == "train" else answer

    good = {1: Device(2, 1, n=3), 2: Flaky(8, 2, n=4), 3: Device(4, 3)}
    state, _, _ = run(package, tmp_path, {**good, 4: misbehaving("lapsed")}, method="flexlora", rounds=1)
    (entry,) = state.history
    assert sorted(entry["valid"]) == ["1", "2", "3"]
    assert list(entry["dropped"]) == ["4"] and entry["dropped"]["4"].startswith(BAD["lapsed"])


def test_a_device_whose_heartbeat_lapsed_is_sent_its_message_again_once_connected(package, tmp_path):
    """A node that missed its heartbeats (a server restarted with --resume, a phone off its network) is
    answered for by the SuperLink; the deployment grid sends it the message again once it is connected, and
    its own reply counts. A node that never comes back is sent a copy ``resends`` times, then dropped with
    the SuperLink's answer to the message the strategy sent."""
    class LapsesOnce(Device):
        def __call__(self, msg):
            if msg.metadata.message_type == "train" and not self.lapsed:
                self.lapsed = True
                return LAPSED
            return super().__call__(msg)

    once = LapsesOnce(8, 2, n=4)
    once.lapsed = False
    devices = {31: Device(2, 1, n=3), 32: once, 33: misbehaving("lapsed")}  # not 1: the SuperLink's id
    grid = PushPullGrid(devices, offline_polls=3)
    state = run_server(PromptGrid(grid, interval=0.001, resends=2), config(package, tmp_path, rounds=1))
    (entry,) = state.history
    assert sorted(entry["valid"]) == ["31", "32"] and len(once.received) == 1
    assert list(entry["dropped"]) == ["33"] and entry["dropped"]["33"].startswith(BAD["lapsed"])
    pushes = [n for n, _ in grid.pushed]
    assert pushes.count(31) == 2 and pushes.count(32) == 3 and pushes.count(33) == 4  # query + train (+ copies)
    assert grid.pushed_while_offline == []  # a copy waits until its node is connected again
    final = read_adapter(tmp_path / "state" / "global")
    adapters = [as_adapter(d.replied[-1], int(d.received[-1][0]), 16.0) for d in (devices[31], once)]
    expected = aggregate("flexlora", adapters, [3, 4], rank=8)
    for key, t in expected.state_dict().items():
        torch.testing.assert_close(final.state_dict()[key], t.float(), rtol=1e-5, atol=1e-6)


def test_too_few_valid_replies_keep_the_global_adapter(package, tmp_path):
    strategy, _ = build_strategy(config(package, tmp_path / "ref", rounds=1))
    before = strategy.global_adapter
    state, final, _ = run(package, tmp_path, {1: Device(4, 1), 2: misbehaving("nan"), 3: misbehaving("keys")},
                          rounds=1, min_clients=2)
    assert state.history[0]["aggregated"] is False and state.round == 1
    assert all(torch.equal(final.state_dict()[k], v) for k, v in before.state_dict().items())


def test_hetlora_self_pruned_ranks_stick(package, tmp_path):
    devices = {1: Device(8, 1, prune_to=4), 2: Device(4, 2)}
    state, _, _ = run(package, tmp_path, devices, method="hetlora", rounds=2)
    assert [int(r) for r, _, _ in devices[1].received] == [8, 4]
    assert devices[1].received[0][2][P.SELF_PRUNE] is True
    assert state.node_ranks == {"1": 4, "2": 4}


def test_a_node_without_a_fitting_rank_is_not_sent_training(package, tmp_path):
    devices = {1: Device(4, 1), 2: Device(8, 2), 3: Device(P.NO_RANK, 3)}
    state, _, _ = run(package, tmp_path, devices, rounds=1)
    assert devices[3].received == [] and state.node_ranks["3"] == P.NO_RANK


def test_resuming_continues_where_the_checkpoint_left_off(package, tmp_path):
    def fleet():
        return {1: Device(2, 1), 2: Device(4, 2), 3: Device(8, 3)}

    _, uninterrupted, _ = run(package, tmp_path / "a", fleet(), rounds=3)
    run(package, tmp_path / "b", fleet(), rounds=1)
    devices = fleet()
    state, resumed, _ = run(package, tmp_path / "b", devices, rounds=3, resume=True)
    assert state.round == 3 and [h["round"] for h in state.history] == [1, 2, 3]
    assert all(d.queries == 0 for d in devices.values())  # node ranks were checkpointed
    assert [cfg[P.SERVER_ROUND] for _, _, cfg in devices[1].received] == [2, 3]
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in uninterrupted.state_dict().items())


def test_a_finished_run_resumes_to_nothing(package, tmp_path):
    run(package, tmp_path, {1: Device(2, 1), 2: Device(4, 2)}, rounds=1)
    devices = {1: Device(2, 1), 2: Device(4, 2)}
    state, _, _ = run(package, tmp_path, devices, rounds=1, resume=True)
    assert state.round == 1 and devices[1].received == []


def test_a_new_run_never_overwrites_a_saved_one(package, tmp_path):
    from lorafleet.server.checkpoint import CheckpointError

    run(package, tmp_path, {1: Device(2, 1), 2: Device(4, 2)}, rounds=1)
    with pytest.raises(CheckpointError, match="pass --resume"):
        run(package, tmp_path, {1: Device(2, 1), 2: Device(4, 2)}, rounds=1)
    with pytest.raises(CheckpointError, match="holds a flexlora run; it cannot resume as hetlora"):
        run(package, tmp_path, {1: Device(2, 1), 2: Device(4, 2)}, rounds=2, resume=True, method="hetlora")


def test_run_config_parsing():
    cfg = ServerConfig.from_run_config({"package": "/p", "method": "hetlora", "rounds": 3, "round-timeout": 5,
                                        "self-prune": False})
    assert (cfg.round_timeout, cfg.self_prune) == (5.0, False)
    assert ServerConfig.from_run_config(cfg.to_run_config()) == cfg
    from lorafleet.export.formats.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown run-config keys \['rank'\]"):
        ServerConfig.from_run_config({"package": "/p", "method": "hetlora", "rounds": 3, "rank": 4})
    with pytest.raises(ConfigError, match="run config rounds must be an integer, got '3'"):
        ServerConfig.from_run_config({"package": "/p", "method": "hetlora", "rounds": "3"})
    with pytest.raises(ConfigError, match="method must be one of fedavg, hetlora, flexlora, raflora, got 'avg'"):
        ServerConfig(package="/p", method="avg", rounds=1)
    with pytest.raises(ConfigError, match=r"fraction must be in \(0, 1\], got 1.5"):
        ServerConfig(package="/p", method="fedavg", rounds=1, fraction=1.5)
    with pytest.raises(ConfigError, match="local_steps must be at least 1, got 0"):
        ServerConfig(package="/p", method="fedavg", rounds=1, local_steps=0)


def test_checkpoint_is_written_after_every_round(package, tmp_path):
    seen = []

    class Spy(Device):
        def __call__(self, msg):
            if msg.metadata.message_type == "train" and (tmp_path / "state" / "state.json").exists():
                seen.append(Checkpoint(tmp_path / "state").load()[0].round)
            return super().__call__(msg)

    run(package, tmp_path, {1: Spy(2, 1), 2: Device(4, 2)}, rounds=3)
    assert seen == [0, 1, 2]  # round 0 (the initial adapter) is saved before round 1 starts


def test_resume_with_nothing_saved_refuses_instead_of_starting_over(package, tmp_path):
    from lorafleet.server.checkpoint import CheckpointError
    from lorafleet.server.server_app import preflight

    cfg = config(package, tmp_path, rounds=2, resume=True)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        preflight(cfg)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        run(package, tmp_path, {1: Device(2, 1), 2: Device(4, 2)}, rounds=2, resume=True)
    assert not (tmp_path / "state" / "global").exists()
