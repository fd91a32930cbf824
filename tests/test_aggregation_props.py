"""Invariants of the aggregation methods (hypothesis): copies, client order, weight scale, HetLoRA = FedAvg."""

import torch
from agg_helpers import deltas, make_adapter, truncated_svd
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lorafleet.export.formats.adapter import Adapter, LoraPair
from lorafleet.server.aggregation import aggregate, distribute

Q = "model.layers.0.self_attn.q_proj"
METHODS = ["fedavg", "hetlora", "flexlora"]
FAST = settings(max_examples=40, deadline=None)


@st.composite
def fleets(draw, same_rank: bool = False):
    """1–4 clients on one module, ranks and lora_alpha drawn independently, and positive weights."""
    n = draw(st.integers(1, 4))
    out, inp = draw(st.integers(2, 9)), draw(st.integers(2, 9))
    ranks = st.integers(1, min(out, inp))
    rs = [draw(ranks)] * n if same_rank else [draw(ranks) for _ in range(n)]
    alphas = [draw(st.sampled_from([1.0, 4.0, 7.5, 16.0])) for _ in range(n)]
    rslora, seed = draw(st.booleans()), draw(st.integers(0, 2**16))
    clients = [make_adapter(r, a, seed=seed + i, rslora=rslora, shapes={Q: (out, inp)})
               for i, (r, a) in enumerate(zip(rs, alphas, strict=True))]
    weights = [draw(st.floats(0.1, 100.0)) for _ in range(n)]
    return clients, weights


def close(a: Adapter, b: Adapter, tol: float = 1e-5) -> bool:
    da, db = deltas(a)[Q], deltas(b)[Q]
    return float((da - db).norm()) <= tol * max(float(db.norm()), 1e-12)


@FAST
@given(fleets(), st.integers(1, 4), st.sampled_from(METHODS))
def test_aggregating_copies_returns_the_adapter(fleet, copies, method):
    one = fleet[0][0]
    got = aggregate(method, [one] * copies, fleet[1][:1] * copies)
    assert got.modules[Q].r == one.modules[Q].r
    assert close(got, one)


@FAST
@given(fleets(same_rank=True), st.randoms(use_true_random=False), st.sampled_from(METHODS))
def test_client_order_does_not_matter(fleet, rnd, method):
    clients, weights = fleet
    order = list(range(len(clients)))
    rnd.shuffle(order)
    a = aggregate(method, clients, weights)
    b = aggregate(method, [clients[i] for i in order], [weights[i] for i in order])
    assert close(b, a)


@FAST
@given(st.sampled_from(METHODS), st.floats(1e-3, 1e3), st.data())
def test_scaling_all_weights_changes_nothing(method, c, data):
    clients, weights = data.draw(fleets(same_rank=method == "fedavg"))
    opts = {"use_weights": True} if method == "hetlora" else {}
    a = aggregate(method, clients, weights, **opts)
    b = aggregate(method, clients, [c * w for w in weights], **opts)
    assert close(b, a)


@FAST
@given(fleets())
def test_heterogeneous_order_and_scale_for_hetlora_and_flexlora(fleet):
    """Order and weight scale together, with unequal ranks (fedavg refuses those)."""
    clients, weights = fleet
    clients = clients[::-1]
    for method in ("hetlora", "flexlora"):
        a = aggregate(method, fleet[0], fleet[1])
        b = aggregate(method, clients, [3.0 * w for w in weights[::-1]])
        assert close(b, a)


def _unit_norm(adapter: Adapter) -> Adapter:
    """The same adapter with lora_B scaled so that ‖ΔW‖_F = 1."""
    p = adapter.modules[Q]
    norm = float(torch.linalg.matrix_norm(p.delta().double()))
    return Adapter({Q: LoraPair(p.lora_A, p.lora_B / norm, p.scaling)}, adapter.config)


@FAST
@given(fleets(same_rank=True))
def test_hetlora_with_equal_ranks_and_norms_is_fedavg(fleet):
    clients = [_unit_norm(c) for c in fleet[0]]
    assert close(aggregate("hetlora", clients), aggregate("fedavg", clients))
    assert close(aggregate("hetlora", clients, fleet[1], use_weights=True), aggregate("fedavg", clients, fleet[1]))


@FAST
@given(fleets(), st.data())
def test_flexlora_distribution_is_the_truncated_svd(fleet, data):
    clients, weights = fleet
    glob = aggregate("flexlora", clients, weights)
    r = data.draw(st.integers(1, glob.modules[Q].r))
    w = sum(wk / sum(weights) * deltas(c)[Q] for wk, c in zip(weights, clients, strict=True))
    got = deltas(distribute(glob, r))[Q]
    ref = truncated_svd(w, r)
    s = torch.linalg.svdvals(w)
    # a tie at the cut: the rank-r truncation is not unique
    assume(not (r < len(s) and s[r - 1] - s[r] < 1e-6 * s[0]))
    assert float((got - ref).norm()) <= 1e-5 * max(float(w.norm()), 1e-12)
