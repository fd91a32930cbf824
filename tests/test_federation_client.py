"""The lorafleet ClientApp (edge_client/flower_client.py): its handlers, run in this process against the real
strategy over an in-process Grid, with real local training on the `random:tiny` package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fed_helpers import LoopbackGrid, write_data
from flwr.app import Context, RecordDict

from lorafleet.edge_client.flower_client import NodeSettings, handle_query, handle_train, node_rank
from lorafleet.export.formats import protocol as P
from lorafleet.export.formats.adapter import read_adapter
from lorafleet.export.formats.errors import ConfigError, PackageError
from lorafleet.server.server_app import ServerConfig, run_server


def device(settings: NodeSettings, node_id: int):
    """A node as Flower runs it: one context per node, a handler per message type."""
    context = Context(run_id=1, node_id=node_id, node_config=settings.to_node_config(), state=RecordDict(),
                      run_config={})

    def answer(message):
        handler = handle_query if message.metadata.message_type == "query" else handle_train
        return handler(message, context, NodeSettings.from_node_config(context.node_config))
    return answer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed-client-data")
    return [write_data(root / f"d{i}.jsonl", 3 + i, i) for i in range(3)]


def federate(tiny_package, data, tmp_path, method, rounds=2, ranks=(2, 4, 8)):
    devices = {10 + i: device(NodeSettings(package=str(tiny_package), data=str(d), rank=r, backend="onnxruntime"),
                              10 + i) for i, (d, r) in enumerate(zip(data, ranks, strict=True))}
    cfg = ServerConfig(package=str(tiny_package), method=method, rounds=rounds, state_dir=str(tmp_path / "state"),
                       min_clients=len(devices), local_steps=2, lr=0.01, seed=3)
    state = run_server(LoopbackGrid(devices), cfg)
    return state, read_adapter(tmp_path / "state" / "global")


def test_a_federation_of_real_devices_in_process(tiny_package, data, tmp_path):
    state, final = federate(tiny_package, data, tmp_path / "a", "hetlora")
    assert state.round == 2 and all(h["aggregated"] and not h["dropped"] for h in state.history)
    assert sorted(state.history[0]["sent"].values()) == [2, 4, 8]
    assert {v["num_examples"] for v in state.history[0]["valid"].values()} == {3, 4, 5}
    assert all(torch.isfinite(t).all() for t in final.state_dict().values())
    _, again = federate(tiny_package, data, tmp_path / "b", "hetlora")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in final.state_dict().items())  # reproducible


def test_node_settings_from_node_config(tiny_package):
    s = NodeSettings.from_node_config({"package": "/p", "data": "/d", "profile": "/x.toml"})
    assert (s.backend, s.rank, s.measure) == ("auto", 0, False)
    assert NodeSettings.from_node_config(s.to_node_config()) == s
    with pytest.raises(ConfigError, match=r"unknown node-config keys \['ranks'\]"):
        NodeSettings.from_node_config({"package": "/p", "data": "/d", "ranks": 4})
    with pytest.raises(ConfigError, match="node-config rank must be int, got '4'"):
        NodeSettings.from_node_config({"package": "/p", "data": "/d", "rank": "4"})
    with pytest.raises(ConfigError, match="exactly one of profile"):
        NodeSettings(package="/p", data="/d")
    with pytest.raises(ConfigError, match="exactly one of profile"):
        NodeSettings(package="/p", data="/d", profile="/x.toml", measure=True)


def test_the_rank_is_decided_once_per_run(tiny_package, tmp_path):
    cache = tmp_path / "ranks"
    profile = tmp_path / "dev.toml"
    profile.write_text("not read: the decision is cached")
    settings = NodeSettings(package=str(tiny_package), data="/d", profile=str(profile), cache_dir=str(cache))
    from lorafleet.edge_client.flower_client import _decision_cache, resolve_backend
    from lorafleet.edge_client.rank_choice import Budgets
    from lorafleet.export.formats.package import open_package

    pkg = open_package(tiny_package, verify=False)
    path = _decision_cache(settings, pkg, resolve_backend(NodeSettings(package=str(tiny_package), data="/d",
                                                                       rank=2, backend="onnxruntime"), pkg),
                           Budgets(time_budget_seconds=50.0, steps_per_round=4))
    assert path is not None
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"rank": 4}))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    settings = NodeSettings(package=str(tiny_package), data="/d", profile=str(profile), cache_dir=str(cache),
                            backend="onnxruntime")
    assert node_rank(settings, context, round_timeout=50.0, local_steps=4) == 4
    path.unlink()
    assert node_rank(settings, context, round_timeout=50.0, local_steps=4) == 4  # kept in context.state
    with pytest.raises(PackageError, match=r"the package has no rank 3 \(ranks: \[2, 4, 8\]\)"):
        node_rank(NodeSettings(package=str(tiny_package), data="/d", rank=3),
                  Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                  round_timeout=50.0, local_steps=4)


def test_a_device_refuses_another_package_or_protocol(tiny_package, data, tmp_path):
    from flwr.app import ConfigRecord

    sent = []

    def spy(message):
        sent.append(message)
        return device(NodeSettings(package=str(tiny_package), data=str(data[0]), rank=2), 1)(message)

    cfg = ServerConfig(package=str(tiny_package), method="flexlora", rounds=1, state_dir=str(tmp_path / "s"),
                       min_clients=1, local_steps=1)
    run_server(LoopbackGrid({1: spy}), cfg)
    train = sent[-1]
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    settings = NodeSettings(package=str(tiny_package), data=str(data[0]), rank=2)
    config = dict(train.content["config"])
    train.content["config"] = ConfigRecord({**config, P.LORA_ALPHA: 8.0})
    with pytest.raises(ConfigError, match="server and device must use the same package"):
        handle_train(train, context, settings)
    train.content["config"] = ConfigRecord({**config, P.PROTOCOL: 2})
    with pytest.raises(ConfigError, match="the server speaks protocol 2, this device 1"):
        handle_train(train, context, settings)
    train.content["config"] = ConfigRecord(config)
    reply = handle_train(train, context, settings)
    assert set(reply.content.keys()) == {P.ARRAYS, P.METRICS}
    assert Path(tiny_package).is_dir()
