"""Every validation error of the aggregation API, each with its message."""

import math

import pytest
import torch
from agg_helpers import make_adapter

from lorafleet.export.formats.adapter import LoraPair
from lorafleet.export.formats.errors import AdapterError, AggregationError
from lorafleet.server.aggregation import aggregate, distribute

Q = "model.layers.0.self_attn.q_proj"


def two():
    return [make_adapter(4, 16, seed=1), make_adapter(8, 16, seed=2)]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_values(bad):
    clients = two()
    clients[1].modules[Q].lora_A[0, 0] = bad
    with pytest.raises(AdapterError, match=f"client 2: module {Q} has NaN or Inf values"):
        aggregate("hetlora", clients)


def test_different_target_modules():
    clients = two()
    del clients[1].modules[Q]
    with pytest.raises(AggregationError, match=f"client 2 adapts different modules than client 1: missing {Q}, "
                                               "extra none"):
        aggregate("flexlora", clients)


def test_different_base_shapes():
    clients = [make_adapter(4, seed=1), make_adapter(4, seed=2, shapes={Q: (24, 21), "model.layers.0.mlp."
                                                                                  "down_proj": (18, 28)})]
    with pytest.raises(AggregationError, match=f"client 2: module {Q} adapts a 24x21 base weight, client 1 a "
                                               "24x20 one"):
        aggregate("flexlora", clients)


def test_rank_larger_than_the_base_weight():
    clients = [make_adapter(4, seed=1), make_adapter(4, seed=2)]
    clients[1].modules[Q] = LoraPair(torch.ones(25, 20), torch.ones(24, 25), 1.0)
    with pytest.raises(AdapterError, match=r"client 2: module .*q_proj has rank 25, larger than min\(out, in\) = 20"):
        aggregate("hetlora", clients)


@pytest.mark.parametrize(("weights", "match"), [
    ([1.0], "got 1 weights for 2 client adapters"),
    ([1.0, 2.0, 3.0], "got 3 weights for 2 client adapters"),
    ([1.0, 0.0], "weight 2 must be a positive finite number, got 0.0"),
    ([-1.0, 2.0], "weight 1 must be a positive finite number, got -1.0"),
    ([1.0, math.nan], "weight 2 must be a positive finite number, got nan"),
    ([math.inf, 1.0], "weight 1 must be a positive finite number, got inf"),
    ([True, 1.0], "weight 1 must be a positive finite number, got True"),
])
def test_bad_weights(weights, match):
    with pytest.raises(AggregationError, match=match):
        aggregate("flexlora", two(), weights)


def test_no_clients():
    with pytest.raises(AggregationError, match="no client adapters to aggregate"):
        aggregate("flexlora", [])


def test_fedavg_refuses_unequal_ranks():
    with pytest.raises(AggregationError, match=r"fedavg needs equal ranks, but module .* has ranks \[4, 8\] "
                                               r"\(use hetlora or flexlora"):
        aggregate("fedavg", two())


def test_fedavg_refuses_another_rank():
    with pytest.raises(AggregationError, match="fedavg keeps the clients' rank 4 .*; got rank 8"):
        aggregate("fedavg", [make_adapter(4, seed=1), make_adapter(4, seed=2)], rank=8)


def test_hetlora_rank_below_r_max():
    with pytest.raises(AggregationError, match="hetlora keeps the global adapter at the largest client rank 8"):
        aggregate("hetlora", two(), rank=6)


@pytest.mark.parametrize(("rank", "match"), [
    (0, "rank must be a positive integer, got 0"),
    (-3, "rank must be a positive integer, got -3"),
    (19, r"flexlora: rank 19 exceeds min\(out, in\) = 18 of module model.layers.0.mlp.down_proj"),
])
def test_bad_global_rank(rank, match):
    with pytest.raises(AggregationError, match=match):
        aggregate("flexlora", two(), rank=rank)


def test_unknown_method_and_option():
    with pytest.raises(AggregationError, match="unknown aggregation method 'fedprox' .known: fedavg, hetlora, "
                                               "flexlora"):
        aggregate("fedprox", two())
    with pytest.raises(AggregationError, match=r"flexlora: unknown option\(s\) use_weights \(allowed: solver\)"):
        aggregate("flexlora", two(), use_weights=True)
    with pytest.raises(AggregationError, match="solver must be one of auto, factored, krylov, gram, got 'svd'"):
        aggregate("flexlora", two(), solver="svd")


def test_a_non_finite_client_is_named():
    clients = two()
    clients[1].modules[Q].lora_B[1, 1] = math.inf
    with pytest.raises(AdapterError, match="client 2: module .* has NaN or Inf"):
        aggregate("flexlora", clients)
    aggregate("flexlora", two())


def test_distribute_rank_checks():
    glob = aggregate("hetlora", two())
    assert distribute(glob, 3).r == 3
    with pytest.raises(AdapterError, match="cannot truncate a rank-8 adapter to rank 9"):
        distribute(glob, 9)
    with pytest.raises(AdapterError, match="rank must be positive, got 0"):
        distribute(glob, 0)
