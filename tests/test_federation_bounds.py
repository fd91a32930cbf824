"""How far one device can move the global adapter (server/bounds.py, server/replies.py, the strategy).

Hostile replies here are *valid* (finite float32, right keys, shapes and rank): only their size is wrong.
Oracles: an honest AdamW device never exceeds the derived bound; what is aggregated equals the pure
aggregation of exactly the replies that should survive; the saved global adapter is always finite.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from export_helpers import fake_package, random_adapter
from fed_helpers import LoopbackGrid, received_arrays, reply
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.edge_client.backends.base import AdamW, OptimizerConfig
from lorafleet.export.formats import protocol as P
from lorafleet.export.formats.adapter import Adapter, LoraPair, read_adapter
from lorafleet.server import bounds as B
from lorafleet.server.aggregation import aggregate
from lorafleet.server.checkpoint import Checkpoint, CheckpointError, ServerState
from lorafleet.server.replies import ReplyBounds
from lorafleet.server.server_app import ServerConfig, run_server

RANKS = (2, 4, 8)
ALPHA = 16.0


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return fake_package(tmp_path_factory.mktemp("bounds-pkg") / "pkg", ranks=RANKS, runtimes=("onnx",))


class Honest:
    """Answers the query with ``rank``; trains like a device: a small update of the received factors."""

    def __init__(self, rank: int, seed: int, n: int = 10):
        self.rank, self.seed, self.n = rank, seed, n
        self.replied: list[dict[str, np.ndarray]] = []
        self.ranks: list[int] = []

    def __call__(self, msg):
        if msg.metadata.message_type == "query":
            return reply(msg, None, {P.RANK: self.rank})
        cfg = msg.content["config"]
        g = np.random.default_rng(self.seed * 100 + int(cfg[P.SERVER_ROUND]))
        step = float(cfg[P.LEARNING_RATE]) * int(cfg[P.LOCAL_STEPS])
        out = {k: (v + step * np.clip(g.standard_normal(v.shape), -2, 2)).astype(np.float32)
               for k, v in received_arrays(msg).items()}
        self.replied.append(out)
        self.ranks.append(int(cfg[P.RANK]))
        return reply(msg, out, {P.NUM_EXAMPLES: self.n, P.RANK: int(cfg[P.RANK]), P.LOSS: 1.0})


class Hostile(Honest):
    """Sends a finite, well-formed reply built by ``make(received arrays, rng)``."""

    def __init__(self, rank, make, n=10):
        super().__init__(rank, 99, n)
        self.make = make

    def __call__(self, msg):
        if msg.metadata.message_type == "query":
            return reply(msg, None, {P.RANK: self.rank})
        cfg = msg.content["config"]
        out = {k: v.astype(np.float32) for k, v in self.make(received_arrays(msg), np.random.default_rng(7)).items()}
        assert all(np.isfinite(v).all() for v in out.values())  # valid float32: only the size is hostile
        self.replied.append(out)
        self.ranks.append(int(cfg[P.RANK]))
        return reply(msg, out, {P.NUM_EXAMPLES: self.n, P.RANK: int(cfg[P.RANK])})


def scaled(factor):
    return lambda arrays, g: {k: g.standard_normal(v.shape) * factor for k, v in arrays.items()}


def run(package, tmp_path, devices, method="flexlora", rounds=2, **kw):
    cfg = ServerConfig(package=str(package), method=method, rounds=rounds, state_dir=str(tmp_path / "state"),
                       min_clients=len(devices), min_valid=kw.pop("min_valid", 1), round_timeout=30.0, **kw)
    state = run_server(LoopbackGrid(devices), cfg)
    return state, read_adapter(tmp_path / "state" / "global")


def adapters_of(devices, ids):
    return [P.adapter_from_arrays(devices[i].replied[-1], devices[i].ranks[-1], ALPHA) for i in ids]


def finite(adapter: Adapter) -> bool:
    return B.finite_adapter(adapter).finite


@pytest.mark.parametrize("factor", [1e6, 1e19, 1e30])
@pytest.mark.parametrize("method", ["fedavg", "hetlora", "flexlora"])
def test_a_huge_finite_reply_is_dropped_and_the_federation_survives(package, tmp_path, factor, method):
    devices = {1: Honest(2, 1), 2: Honest(8, 2), 3: Hostile(4, scaled(factor))}
    state, final = run(package, tmp_path, devices, method=method, rounds=2)
    for entry in state.history:
        assert entry["aggregated"] and sorted(entry["valid"]) == ["1", "2"]
        assert "above the bound" in entry["dropped"]["3"]
    expected = aggregate(method, adapters_of(devices, [1, 2]), [10, 10], rank=state.global_rank)
    for key, t in expected.state_dict().items():
        torch.testing.assert_close(final.state_dict()[key], t.float(), rtol=1e-5, atol=1e-6)
    assert finite(final)


def test_factors_whose_product_overflows_float32_are_dropped(package, tmp_path):
    def overflow(arrays, g):  # each factor fits float32 (1e20 < 3.4e38); B @ A does not
        return {k: np.full(v.shape, 1e20) for k, v in arrays.items()}

    devices = {1: Honest(4, 1), 2: Honest(4, 2), 3: Hostile(4, overflow)}
    state, final = run(package, tmp_path, devices, rounds=1)
    assert "above the bound" in state.history[0]["dropped"]["3"] and finite(final)


def test_a_claimed_example_count_weighs_at_most_the_cap(package, tmp_path):
    devices = {1: Honest(4, 1, n=10), 2: Honest(4, 2, n=10_000_000)}
    state, final = run(package, tmp_path, devices, method="fedavg", rounds=1, max_examples=30)
    entry = state.history[0]
    assert entry["valid"]["2"]["num_examples"] == 30 and "claimed 10000000 examples" in entry["notes"]["2"][0]
    expected = aggregate("fedavg", adapters_of(devices, [1, 2]), [10, 30], rank=state.global_rank)
    for key, t in expected.state_dict().items():
        torch.testing.assert_close(final.state_dict()[key], t.float(), rtol=1e-5, atol=1e-6)


def test_a_non_finite_aggregate_drops_the_offender_and_re_aggregates(package, tmp_path):
    # With the bound lifted, factors of 1e19 pass screening, and FlexLoRA's sum overflows float32.
    devices = {1: Honest(4, 1), 2: Honest(8, 2), 3: Hostile(8, scaled(1e19))}
    state, final = run(package, tmp_path, devices, rounds=1, max_update_norm=1e300)
    entry = state.history[0]
    assert entry["aggregated"] and sorted(entry["valid"]) == ["1", "2"]
    assert "the aggregate is not finite" in entry["dropped"]["3"]
    expected = aggregate("flexlora", adapters_of(devices, [1, 2]), [10, 10], rank=8)
    for key, t in expected.state_dict().items():
        torch.testing.assert_close(final.state_dict()[key], t.float(), rtol=1e-5, atol=1e-6)


def test_clipping_scales_an_outsized_update_to_k_times_the_median(package, tmp_path):
    def big(arrays, g):  # 20× an honest update: inside the bound, far above the others
        return {k: v + 20 * 1e-3 * 10 * np.clip(g.standard_normal(v.shape), -2, 2) for k, v in arrays.items()}

    devices = {1: Honest(4, 1), 2: Honest(4, 2), 3: Honest(4, 3), 4: Hostile(4, big)}
    state, _ = run(package, tmp_path, devices, rounds=1, clip_updates=2.0, max_update_norm=1e6)
    notes = state.history[0]["notes"]
    assert list(notes) == ["4"] and "clipped by" in notes["4"][0]


def test_the_bound_is_applied_per_reply_when_given(package, tmp_path):
    devices = {1: Honest(4, 1), 2: Honest(4, 2)}
    state, _ = run(package, tmp_path, devices, rounds=1, max_update_norm=1e-9)
    assert state.history[0]["aggregated"] is False
    assert all("above the bound 1e-09" in why for why in state.history[0]["dropped"].values())


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.sampled_from([1e-4, 1e-3, 1e-2, 0.1]), st.integers(0, 3), st.booleans())
def test_an_honest_adamw_device_never_exceeds_the_derived_bound(steps, lr, seed, adversarial):
    """The oracle is the devices' own optimizer: its change after ``steps`` is within adamw_bound, even
    for gradient sequences built to push |m̂/√v̂| up (a large gradient, then tiny ones of the same sign)."""
    g = torch.Generator().manual_seed(seed)
    sent = random_adapter(4, seed=seed)
    params = [p for pair in sent.modules.values() for p in (pair.lora_A.clone(), pair.lora_B.clone())]
    opt = AdamW(params, OptimizerConfig(lr=lr))
    for t in range(steps):
        grads = [torch.randn(p.shape, generator=g) * (1e3 if (adversarial and t == 0) else 1e-3) if adversarial
                 else torch.randn(p.shape, generator=g) for p in params]
        opt.step(grads)
    mods = {}
    for i, (name, pair) in enumerate(sent.modules.items()):
        mods[name] = LoraPair(params[2 * i], params[2 * i + 1], pair.scaling)
    trained = Adapter(mods, dict(sent.config))
    assert B.change_norm(trained, sent) <= B.adamw_bound(sent, lr, steps)


def test_the_adam_step_bound_matches_its_closed_form():
    assert B.adam_step_bound((0.9, 0.999)) == pytest.approx(0.1 / math.sqrt(0.001) / math.sqrt(1 - 0.81 / 0.999))
    assert B.adam_step_bound((0.9, 0.5)) == math.inf  # β1² ≥ β2: no bound


def dense64(pair: LoraPair) -> torch.Tensor:
    return pair.scaling * (pair.lora_B.double() @ pair.lora_A.double())


def test_change_norm_is_the_dense_frobenius_norm():
    a, b = random_adapter(4, seed=1), random_adapter(2, seed=2)
    for name in a.modules:
        dense = dense64(a.modules[name]) - dense64(b.modules[name])
        assert B.change_sq_norm(a.modules[name], b.modules[name]) == pytest.approx(float((dense ** 2).sum()), rel=1e-9)
    assert B.change_norm(a, None) == pytest.approx(
        math.sqrt(sum(float((dense64(p) ** 2).sum()) for p in a.modules.values())), rel=1e-9)


def test_the_checkpoint_never_saves_a_non_finite_adapter(tmp_path):
    good = random_adapter(4, seed=3)
    ckpt = Checkpoint(tmp_path / "state")
    ckpt.save(ServerState(method="flexlora", rounds=1), good)
    name = next(iter(good.modules))
    for bad_b in (torch.full_like(good.modules[name].lora_B, float("inf")),
                  torch.full_like(good.modules[name].lora_B, 1e30)):  # finite factors, ΔW overflows float32
        pair = good.modules[name]
        bad = Adapter({**good.modules, name: LoraPair(torch.full_like(pair.lora_A, 1e30), bad_b, pair.scaling)},
                      dict(good.config))
        with pytest.raises(CheckpointError, match="not finite"):
            ckpt.save(ServerState(method="flexlora", rounds=1, round=1), bad)
    state, kept = ckpt.load()
    assert state.round == 0 and all(torch.equal(kept.state_dict()[k], v) for k, v in good.state_dict().items())


def test_reply_bounds_reject_bad_settings():
    from lorafleet.export.formats.errors import ConfigError

    for kwargs, match in (({"max_update_norm": -1.0}, "max_update_norm"), ({"max_examples": 0}, "max_examples"),
                          ({"clip_updates": 0.5}, "clip_updates"), ({"max_update_norm": float("nan")}, "max_update")):
        with pytest.raises(ConfigError, match=match):
            ReplyBounds(**kwargs)


def test_the_batched_reference_equals_the_module_by_module_norm():
    sent = random_adapter(4, seed=5, layers=3)
    for new in (random_adapter(4, seed=6, layers=3), random_adapter(2, seed=7, layers=3)):  # same rank, pruned
        per_module = math.sqrt(sum(B.change_sq_norm(p, sent.modules[n]) for n, p in new.modules.items()))
        assert B.Reference(sent).change_norm(new) == pytest.approx(per_module, rel=1e-5)  # float32 products
