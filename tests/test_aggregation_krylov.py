"""The top-R solver beyond min(out, in) (server/aggregation/krylov.py): oracle against the exact Gram path and a
dense float64 SVD, its certificate checked independently, the fall-back to the exact path, determinism, and
that only thin products of the factored operator are formed."""

import numpy as np
import pytest
import torch
from agg_helpers import dense_flexlora, make_adapter, max_rel_err
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lorafleet.export.formats.adapter import Adapter, LoraPair
from lorafleet.export.formats.errors import AggregationError
from lorafleet.server.aggregation import aggregate
from lorafleet.server.aggregation.krylov import KrylovSettings, top_singular
from lorafleet.server.aggregation.lowrank import truncated_svd_of_sum

Q = "model.layers.0.self_attn.q_proj"


def decaying_clients(shape, ranks, seed=0, noise=0.05):
    """Clients sharing a decaying low-rank structure plus their own noise (as fine-tuning updates do; the
    benchmark's generator in miniature), with lora_alpha 16."""
    out, inp = shape
    g = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    u = torch.linalg.qr(torch.randn(out, r_max, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(inp, r_max, generator=g, dtype=torch.float64))[0]
    decay = torch.tensor([1.0 / (1 + i) for i in range(r_max)], dtype=torch.float64)
    clients = []
    for r in ranks:
        b = u[:, :r] * decay[:r] + noise * torch.randn(out, r, generator=g, dtype=torch.float64) / out**0.5
        a = v[:, :r].T + noise * torch.randn(r, inp, generator=g, dtype=torch.float64) / inp**0.5
        clients.append(Adapter({Q: LoraPair(a.float(), b.float(), 16 / r)}, {"r": r, "lora_alpha": 16}))
    return clients


RANKS = [8] * 8 + [4] * 6  # Σ r = 88 > min(out, in) = 80
WEIGHTS = [float(1 + (7 * i) % 5) for i in range(len(RANKS))]


def stacks(clients, weights):
    """The stacked factors P = [w_k s_k B_k] (out, K) and Q = [A_k] (K, in) in float64, W = P Q."""
    total = sum(weights)
    p = torch.cat([w / total * c.modules[Q].scaling * c.modules[Q].lora_B.double() for w, c in
                   zip(weights, clients, strict=True)], 1)
    return p, torch.cat([c.modules[Q].lora_A.double() for c in clients], 0)


@pytest.mark.parametrize("shape", [(120, 80), (80, 120)])
@pytest.mark.parametrize("rank", [None, 3])
def test_matches_the_exact_path_and_a_dense_svd(shape, rank):
    clients = decaying_clients(shape, RANKS)
    got = aggregate("flexlora", clients, WEIGHTS, rank=rank, solver="krylov")
    exact = aggregate("flexlora", clients, WEIGHTS, rank=rank, solver="gram")
    assert max_rel_err(got, dense_flexlora(clients, WEIGHTS, rank)) < 1e-6
    for key, t in exact.state_dict().items():  # same factors, signs included, to the certificate's accuracy
        torch.testing.assert_close(got.state_dict()[key], t, rtol=0, atol=1e-5 * float(t.abs().max()))


def test_auto_takes_the_krylov_path_beyond_min_dim(monkeypatch):
    from lorafleet.server.aggregation import lowrank

    calls = []
    monkeypatch.setattr(lowrank, "_gram", lambda *a: calls.append(a) or pytest.fail("exact path taken"))
    got = aggregate("flexlora", decaying_clients((120, 80), RANKS), WEIGHTS)
    assert not calls and got.modules[Q].r == 8


def test_the_certificate_holds_independently():
    p, q = stacks(decaying_clients((120, 80), RANKS), WEIGHTS)
    res = top_singular(p.numpy(), q.numpy(), 8)
    assert res.converged and res.residual <= 1e-7
    assert res.columns < 80  # converged before the Krylov space filled R^80: an approximation, certified
    w = (p @ q).numpy()
    b, v = res.b, res.a.T  # U S (out, R), V (in, R)
    s = np.linalg.norm(b, axis=0)
    u = b / s
    np.testing.assert_allclose(v.T @ v, np.eye(8), atol=1e-12)
    np.testing.assert_allclose(w @ v, u * s, atol=1e-12 * s[0])  # W V = U S by construction
    residual = np.linalg.norm(w.T @ u - v * s) / s[0]  # ‖Wᵀ U − V S‖_F / σ_1, from the dense W
    assert residual <= 1e-7 and residual == pytest.approx(res.residual, rel=1e-3, abs=1e-12)
    np.testing.assert_allclose(s, np.linalg.svd(w, compute_uv=False)[:8], rtol=1e-10)


@pytest.mark.parametrize("krylov", [KrylovSettings(max_blocks=1), KrylovSettings(tol=1e-30)])
def test_without_convergence_the_exact_path_answers(krylov):
    clients = decaying_clients((120, 80), RANKS)
    p, q = stacks(clients, WEIGHTS)
    res = top_singular(p.numpy(), q.numpy(), 8, krylov)
    assert not res.converged and res.b is None and res.residual > krylov.tol
    assert res.blocks == krylov.max_blocks or res.columns == 80  # budget spent, or R^80 spanned and still short
    lefts, rights = [p], [q]
    got = truncated_svd_of_sum(lefts, rights, 8, solver="krylov", krylov=krylov)
    exact = truncated_svd_of_sum(lefts, rights, 8, solver="gram")
    assert all(torch.equal(a, b) for a, b in zip(got, exact, strict=True))


def test_a_zero_update_is_left_to_the_exact_path():
    """Every lora_B at its zero init (round 1): σ_1 = 0 has no certificate; the exact path returns zeros."""
    clients = decaying_clients((120, 80), RANKS)
    for c in clients:
        c.modules[Q].lora_B.zero_()
    p, q = stacks(clients, WEIGHTS)
    assert not top_singular(p.numpy(), q.numpy(), 8).converged
    got = aggregate("flexlora", clients, WEIGHTS)
    assert torch.count_nonzero(got.modules[Q].lora_B) == 0 and got.modules[Q].r == 8


def test_deterministic_for_a_seed():
    clients = decaying_clients((120, 80), RANKS)
    a = aggregate("flexlora", clients, WEIGHTS, solver="krylov")
    b = aggregate("flexlora", clients, WEIGHTS, solver="krylov")
    assert all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())
    p, q = stacks(clients, WEIGHTS)
    r0, r1 = (top_singular(p.numpy(), q.numpy(), 8, KrylovSettings(seed=s)) for s in (0, 1))
    assert r0.converged and r1.converged
    np.testing.assert_allclose(r1.b @ r1.a, r0.b @ r0.a, atol=1e-6 * np.linalg.norm(r0.b @ r0.a))


class _Products(np.ndarray):
    """An array that records the shape of every matrix product it takes part in."""

    shapes: list[tuple[int, ...]] = []

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        result = getattr(ufunc, method)(*(np.asarray(x) for x in inputs), **kwargs)
        if ufunc is np.matmul:
            _Products.shapes.append(result.shape)
        return result


def test_only_thin_products_of_the_factored_operator():
    out, inp = 600, 500
    clients = decaying_clients((out, inp), [8] * 50 + [4] * 30, noise=0.02)  # Σ r = 520 > 500
    p, q = stacks(clients, [1.0] * 80)
    _Products.shapes = []
    res = top_singular(p.numpy().view(_Products), q.numpy().view(_Products), 8)
    assert res.converged
    assert _Products.shapes and max(a * b for a, b in _Products.shapes) <= max(out, inp) * res.columns
    assert all(min(s) <= res.columns < inp for s in _Products.shapes)  # never out × in


@pytest.mark.parametrize(("kw", "match"), [
    ({"tol": 0.0}, r"krylov tol must be in \(0, 1\), got 0.0"),
    ({"max_blocks": 0}, "krylov max_blocks must be a positive integer, got 0"),
    ({"block": True}, "krylov block must be a positive integer, got True"),
])
def test_bad_settings(kw, match):
    with pytest.raises(AggregationError, match=match):
        KrylovSettings(**kw)


@settings(max_examples=30, deadline=None)
@given(st.integers(3, 12), st.integers(3, 12), st.integers(2, 6), st.integers(0, 2**16))
def test_krylov_or_its_fallback_is_always_the_exact_answer(out, inp, n, seed):
    """Random fleets with Σ r_k > min(out, in): flat spectra, ties and all."""
    r = min(out, inp)
    clients = [make_adapter(max(1, r - i % 3), 4.0 + i, seed=seed + i, shapes={Q: (out, inp)}) for i in range(n)]
    assume(sum(c.modules[Q].r for c in clients) > r)
    ws = [1.0 + i for i in range(n)]
    ref = dense_flexlora(clients, ws)[Q]
    got = aggregate("flexlora", clients, ws, solver="krylov").modules[Q]
    s = torch.linalg.svdvals(sum(w / sum(ws) * c.modules[Q].delta().double() for w, c in zip(ws, clients,
                                                                                             strict=True)))
    rank = got.r
    # a tie at the cut: the truncation is not unique
    assume(not (rank < len(s) and s[rank - 1] - s[rank] < 1e-6 * s[0]))
    assert float((got.delta().double() - ref).norm()) <= 1e-6 * float(ref.norm())
