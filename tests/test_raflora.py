"""raFLoRA (server/aggregation/raflora.py) against a dense float64 reference written from its definition, its
equal-rank identity with FlexLoRA, invariants, edge cases, every entry point that takes a method name, and the
rank-collapse it prevents (energy per rank segment, lorafleet/fleet/rank_energy.py)."""

import math

import pytest
import torch
from agg_helpers import deltas, make_adapter, max_rel_err, truncated_svd
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lorafleet.cli import main
from lorafleet.export.formats.adapter import Adapter, LoraPair, read_adapter, write_adapter
from lorafleet.export.formats.errors import AggregationError
from lorafleet.fleet.config import FleetConfig
from lorafleet.fleet.rank_energy import rank_segments, segment_energy
from lorafleet.server.aggregation import METHODS, aggregate, distribute
from lorafleet.server.aggregation.raflora import component_weights, partitions
from lorafleet.server.server_app import ServerConfig
from lorafleet.server.strategy import global_rank_for

Q, DOWN = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
WEIGHTS = [3.0, 1.0, 2.0, 0.5]


def mixed_clients():
    """Ranks 2, 5, {q: 8, down: 3} and 4; lora_alpha 16, 8, 3.5 and 16 with rsLoRA."""
    return [make_adapter(2, 16, seed=1), make_adapter(5, 8, seed=2), make_adapter({Q: 8, DOWN: 3}, 3.5, seed=3),
            make_adapter(4, 16, seed=4, rslora=True)]


def dense_raflora(clients, weights=None, rank=None):
    """The definition, densely in float64: partitions between consecutive distinct ranks, each averaged over
    the clients that cover it with weights n_k renormalized over them, summed, then the rank-R truncated SVD."""
    n = [1.0] * len(clients) if weights is None else list(weights)
    out = {}
    for name in clients[0].modules:
        pairs = [c.modules[name] for c in clients]
        w = torch.zeros(pairs[0].shape, dtype=torch.float64)  # ΔW = Σ_p ΔW_p, (out, in)
        lo = 0
        for hi in sorted({p.r for p in pairs}):
            cover = [(nk, p) for nk, p in zip(n, pairs, strict=True) if p.r >= hi]
            total = sum(nk for nk, _ in cover)
            for nk, p in cover:
                w += (nk / total) * p.scaling * (p.lora_B.double()[:, lo:hi] @ p.lora_A.double()[lo:hi])
            lo = hi
        out[name] = truncated_svd(w, rank or max(p.r for p in pairs))
    return out


# --- the definition --------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["auto", "factored", "krylov", "gram"])
@pytest.mark.parametrize("rank", [None, 3, 12])
def test_matches_the_dense_reference(solver, rank):
    clients = mixed_clients()
    got = aggregate("raflora", clients, WEIGHTS, rank=rank, solver=solver)
    assert max_rel_err(got, dense_raflora(clients, WEIGHTS, rank)) < 1e-6
    assert {n: p.r for n, p in got.modules.items()} == ({Q: 8, DOWN: 5} if rank is None else {Q: rank, DOWN: rank})


def test_beyond_min_dim_matches_the_dense_reference():
    """Σ r_k = 46 > min(out, in) = 24: the top-R solver, on a partitioned sum."""
    shapes = {Q: (40, 24)}
    clients = [make_adapter(r, a, seed=i, shapes=shapes) for i, (r, a) in
               enumerate([(12, 16), (4, 8), (4, 8), (8, 2), (12, 7), (2, 16), (4, 4)])]
    ws = [float(i + 1) for i in range(len(clients))]
    for rank in (None, 5):
        got = aggregate("raflora", clients, ws, rank=rank)
        assert max_rel_err(got, dense_raflora(clients, ws, rank)) < 1e-6


def test_partitions_and_their_weights():
    assert partitions([4, 2, 8, 4]) == [(0, 2), (2, 4), (4, 8)]
    assert partitions([3, 3]) == [(0, 3)]
    ws = [0.1, 0.2, 0.3, 0.4]  # normalized n_k of clients with ranks 2, 4, 4, 8
    got = component_weights([2, 4, 4, 8], ws)
    assert got[0] == 0.1  # all of its components are in the first partition: its weight as given
    c2, c3 = 1 / 0.9, 1 / 0.4  # partition 2 is covered by clients 2, 3, 4; partition 3 by client 4 only
    assert got[1] == pytest.approx([0.2, 0.2, 0.2 * c2, 0.2 * c2], rel=1e-15)
    assert got[2] == pytest.approx([0.3, 0.3, 0.3 * c2, 0.3 * c2], rel=1e-15)
    assert got[3] == pytest.approx([0.4] * 2 + [0.4 * c2] * 2 + [0.4 * c3] * 4, rel=1e-15)


@pytest.mark.parametrize("shape", [(24, 20), (20, 24), (12, 9)])  # (12, 9) with Σ r = 12 > 9: the top-R solver
def test_equal_ranks_are_flexlora_bit_for_bit(shape):
    clients = [make_adapter(3, a, seed=i, rslora=i == 1, shapes={Q: shape}) for i, a in enumerate([16, 8, 3.5, 2])]
    ws = [5.0, 1.0, 2.0, 7.0]
    for rank in (None, 2):
        a = aggregate("raflora", clients, ws, rank=rank)
        b = aggregate("flexlora", clients, ws, rank=rank)
        assert a.state_dict().keys() == b.state_dict().keys()
        assert all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())
        assert a.config == b.config


def test_distribution_is_the_truncated_svd_of_the_partitioned_update():
    clients = mixed_clients()
    glob = aggregate("raflora", clients, WEIGHTS)
    full = dense_raflora(clients, WEIGHTS, rank=24)  # rank ≥ every module's: ΔW itself
    for r in range(1, 9):
        for name, d in deltas(distribute(glob, r)).items():
            ref = truncated_svd(full[name], min(r, glob.modules[name].r))
            assert float((d - ref).norm()) <= 1e-5 * float(ref.norm()), (name, r)


# --- invariants (hypothesis) ------------------------------------------------------------------------------

FAST = settings(max_examples=40, deadline=None)


@st.composite
def fleets(draw):
    n = draw(st.integers(1, 4))
    out, inp = draw(st.integers(2, 9)), draw(st.integers(2, 9))
    rs = [draw(st.integers(1, min(out, inp))) for _ in range(n)]
    alphas = [draw(st.sampled_from([1.0, 4.0, 7.5, 16.0])) for _ in range(n)]
    rslora, seed = draw(st.booleans()), draw(st.integers(0, 2**16))
    clients = [make_adapter(r, a, seed=seed + i, rslora=rslora, shapes={Q: (out, inp)})
               for i, (r, a) in enumerate(zip(rs, alphas, strict=True))]
    return clients, [draw(st.floats(0.1, 100.0)) for _ in range(n)]


def close(a: Adapter, b: Adapter, tol: float = 1e-5) -> bool:
    da, db = deltas(a)[Q], deltas(b)[Q]
    return float((da - db).norm()) <= tol * max(float(db.norm()), 1e-12)


@FAST
@given(fleets(), st.integers(1, 6))
def test_aggregating_copies_returns_that_adapters_delta(fleet, copies):
    (one, *_), (w, *_) = fleet
    got = aggregate("raflora", [one] * copies, [w] * copies)
    assert got.modules[Q].r == one.modules[Q].r
    assert close(got, one)


@FAST
@given(fleets(), st.randoms(use_true_random=False), st.floats(1e-3, 1e3))
def test_client_order_and_weight_scale_do_not_matter(fleet, rnd, c):
    clients, weights = fleet
    order = list(range(len(clients)))
    rnd.shuffle(order)
    a = aggregate("raflora", clients, weights)
    b = aggregate("raflora", [clients[i] for i in order], [c * weights[i] for i in order])
    assert close(b, a)


@FAST
@given(fleets())
def test_matches_the_dense_reference_on_any_fleet(fleet):
    clients, weights = fleet
    got = deltas(aggregate("raflora", clients, weights))[Q]
    w = dense_raflora(clients, weights, rank=min(clients[0].modules[Q].shape))[Q]  # ΔW itself
    r = max(c.modules[Q].r for c in clients)
    s = torch.linalg.svdvals(w)
    # a tie at the cut: the rank-r truncation is not unique
    assume(not (r < len(s) and s[r - 1] - s[r] < 1e-6 * s[0]))
    assert float((got - truncated_svd(w, r)).norm()) <= 1e-5 * max(float(w.norm()), 1e-12)


# --- weights, ranks, alpha --------------------------------------------------------------------------------

@pytest.mark.parametrize(("weights", "match"), [
    ([1.0], "got 1 weights for 4 client adapters"),
    ([1.0, 0.0, 1.0, 1.0], "weight 2 must be a positive finite number, got 0.0"),
    ([1.0, 1.0, -2.0, 1.0], "weight 3 must be a positive finite number, got -2.0"),
    ([1.0, 1.0, 1.0, math.nan], "weight 4 must be a positive finite number, got nan"),
])
def test_bad_weights(weights, match):
    with pytest.raises(AggregationError, match=match):
        aggregate("raflora", mixed_clients(), weights)


@pytest.mark.parametrize(("rank", "match"), [
    (0, "rank must be a positive integer, got 0"),
    (19, r"raflora: rank 19 exceeds min\(out, in\) = 18 of module model.layers.0.mlp.down_proj"),
])
def test_bad_global_rank(rank, match):
    with pytest.raises(AggregationError, match=match):
        aggregate("raflora", mixed_clients(), rank=rank)


def test_unknown_option():
    with pytest.raises(AggregationError, match=r"raflora: unknown option\(s\) use_weights \(allowed: solver\)"):
        aggregate("raflora", mixed_clients(), use_weights=True)


def test_equal_weights_by_default_and_above_r_max_pads_zeros():
    clients = mixed_clients()
    assert max_rel_err(aggregate("raflora", clients), dense_raflora(clients)) < 1e-6
    got = aggregate("raflora", clients[:2], rank=9)  # ranks 2 and 5: Σ r = 7 components, then zeros
    for p in got.modules.values():
        assert p.r == 9 and torch.count_nonzero(p.lora_A[7:]) == 0 and torch.count_nonzero(p.lora_B[:, 7:]) == 0


def test_output_alpha_and_precision():
    same = aggregate("raflora", [make_adapter(2, 16, seed=1), make_adapter(8, 16, seed=2)])
    assert same.modules[Q].scaling == 16 / 8 and same.config["lora_alpha"] == 16
    mixed = aggregate("raflora", [make_adapter(2, 16, seed=1), make_adapter(8, 4, seed=2)])
    assert mixed.modules[Q].scaling == 1.0  # no common alpha: written at scaling 1
    low = [make_adapter(4, 16, seed=1, dtype=torch.bfloat16), make_adapter(6, 16, seed=2, dtype=torch.float16)]
    got = aggregate("raflora", low)
    assert {p.lora_A.dtype for p in got.modules.values()} == {torch.float32}
    assert max_rel_err(got, dense_raflora(low)) < 1e-6


# --- rank collapse ----------------------------------------------------------------------------------------

def _spectral_client(r: int, u: torch.Tensor, v: torch.Tensor) -> Adapter:
    """ΔW = U_r V_rᵀ at scaling 1: r orthonormal components of unit energy."""
    return Adapter({Q: LoraPair(v[:, :r].T.contiguous(), u[:, :r].contiguous(), 1.0)}, {"r": r, "lora_alpha": r})


def _bases():
    g = torch.Generator().manual_seed(0)
    return torch.linalg.qr(torch.randn(32, 16, generator=g))[0], torch.linalg.qr(torch.randn(24, 16, generator=g))[0]


def test_flexlora_energy_collapses_into_the_shared_rank_and_raflora_keeps_the_higher_segments():
    """Nine rank-4 clients and one rank-16 client, all with the same 16 orthonormal unit components. FlexLoRA
    averages components 5–16 with the nine clients' zeros (×1/10 each); raFLoRA over the one client that
    trained them, so the global adapter holds what the clients hold: 4 + 12 units of energy."""
    u, v = _bases()
    clients = [_spectral_client(4, u, v)] * 9 + [_spectral_client(16, u, v)]
    segments = rank_segments([4, 16])
    flex = segment_energy(aggregate("flexlora", clients), segments)
    ra = segment_energy(aggregate("raflora", clients), segments)
    assert flex["5-16"] == pytest.approx(12 * 0.1**2 / (4 + 12 * 0.1**2), rel=1e-6)  # 2.9 %
    assert ra["5-16"] == pytest.approx(12 / 16, rel=1e-6)  # 75 %, the clients' own share
    assert ra["1-4"] == pytest.approx(4 / 16, rel=1e-6)


def test_over_rounds_flexlora_collapses_and_raflora_is_a_fixed_point():
    """Clients that return exactly what they received (no local change): a rank-preserving aggregation must
    give back the same global adapter. FlexLoRA shrinks the components only the rank-16 client reaches by
    10× every round; raFLoRA returns the global adapter unchanged."""
    u, v = _bases()
    segments = rank_segments([4, 16])
    start = _spectral_client(16, u, v)
    shares = {}
    for method in ("flexlora", "raflora"):
        glob = start
        for _ in range(3):
            clients = [distribute(glob, 4)] * 9 + [distribute(glob, 16)]
            glob = aggregate(method, clients)
        shares[method] = segment_energy(glob, segments)["5-16"]
        if method == "raflora":
            assert max_rel_err(glob, deltas(start)) < 1e-6
    assert shares["raflora"] == pytest.approx(0.75, rel=1e-6)
    assert shares["flexlora"] == pytest.approx(12e-6 / (4 + 12e-6), rel=1e-4)  # (1/10)^2 per round, 3 rounds


# --- every place that takes a method ----------------------------------------------------------------------

def test_registered_and_accepted_everywhere(tmp_path):
    assert "raflora" in METHODS
    assert global_rank_for("raflora", [2, 4, 8]) == 8  # the global adapter at the package's largest rank
    ServerConfig(package="pkg", method="raflora", rounds=1, state_dir=str(tmp_path / "s"))
    FleetConfig(devices=2, rounds=1, model="random:tiny", method="raflora", seed=0, out=tmp_path / "o")


def test_cli_aggregate_writes_what_the_library_computes(tmp_path, capsys):
    dirs = [write_adapter(c, tmp_path / f"c{i}") for i, c in enumerate(mixed_clients())]
    code = main(["aggregate", "--method", "raflora", "--weights", "3,1,2,0.5", "--out", str(tmp_path / "g"),
                 *map(str, dirs)])
    out = capsys.readouterr().out
    assert code == 0 and "raflora of 4 adapters, 2 modules, rank 5-8" in out
    ref = aggregate("raflora", [read_adapter(d) for d in dirs], WEIGHTS)
    assert max_rel_err(read_adapter(tmp_path / "g"), deltas(ref)) < 1e-6


@pytest.mark.parametrize("command", ["aggregate", "serve", "fleet"])
def test_cli_help_offers_raflora(capsys, command):
    assert main([command, "--help"]) == 0
    assert "raflora" in capsys.readouterr().out
