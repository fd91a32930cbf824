"""HetLoRA self-pruning: the tail norm, the regulariser step, and the shrink decision."""

import pytest
import torch

from lorafleet.edge_client.self_prune import (
    SelfPruneConfig,
    head_size,
    pruned_rank,
    regularizer_step,
    self_prune,
    tail_norm,
)
from lorafleet.export.formats.adapter import Adapter, LoraPair, peft_config, read_adapter, write_adapter
from lorafleet.export.formats.errors import ConfigError


def make_adapter(r=8, seed=0, tail_scale=1.0, modules=("q_proj", "v_proj")):
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i, m in enumerate(modules):
        a = torch.randn(r, 16, generator=g, dtype=torch.float64)
        b = torch.randn(12, r, generator=g, dtype=torch.float64)
        a[-1] *= tail_scale
        b[:, -1] *= tail_scale
        mods[f"model.layers.{i}.self_attn.{m}"] = LoraPair(a, b, 16 / r)
    return Adapter(mods, peft_config(list(modules), r, 16))


def test_head_size():
    assert [head_size(r, 0.99) for r in (1, 4, 8, 64, 100, 200)] == [1, 3, 7, 63, 99, 198]
    assert head_size(8, 0.5) == 4


def test_tail_norm_against_a_direct_sum():
    ad = make_adapter()
    expected = sum(float(p.lora_B[:, 7:].norm() * p.lora_A[7:].norm()) for p in ad.modules.values())
    assert tail_norm(ad, 0.99) == pytest.approx(expected)
    assert tail_norm(make_adapter(tail_scale=0.0), 0.99) == 0.0


def test_an_adapter_whose_tail_became_small_shrinks():
    received = make_adapter(r=8)
    trained = make_adapter(r=8, tail_scale=0.1)
    out, decision = self_prune(received, trained, SelfPruneConfig(gamma=0.99))
    assert decision.new_rank == 7 and out.r == 7 and "pruned rank 8 → 7" in decision.reason
    for name, p in out.modules.items():  # the first 7 components, unchanged, same scaling
        assert torch.equal(p.lora_A, trained.modules[name].lora_A[:7])
        assert torch.equal(p.lora_B, trained.modules[name].lora_B[:, :7])
        assert p.scaling == trained.modules[name].scaling


def test_packaged_ranks_cap_the_new_rank(tmp_path):
    received, trained = make_adapter(r=8), make_adapter(r=8, tail_scale=0.1)
    out, decision = self_prune(received, trained, SelfPruneConfig(), available_ranks=[4, 8, 16])
    assert decision.new_rank == 4 and out.r == 4
    written = read_adapter(write_adapter(out, tmp_path / "a"))  # PEFT config follows the new rank
    assert written.r == 4 and written.config["r"] == 4
    p = next(iter(written.modules.values()))
    assert p.scaling == pytest.approx(2.0)  # the scaling of the received rank-8 adapter is kept


def test_no_packaged_rank_small_enough_keeps_the_rank():
    received, trained = make_adapter(r=4), make_adapter(r=4, tail_scale=0.1)
    out, decision = self_prune(received, trained, SelfPruneConfig(), available_ranks=[4, 8])
    assert decision.new_rank == 4 and out is trained and "no packaged rank is ≤ 3" in decision.reason


def test_a_tail_that_grew_is_kept_and_ranks_never_grow():
    received, trained = make_adapter(r=8, tail_scale=0.1), make_adapter(r=8)
    out, decision = self_prune(received, trained, SelfPruneConfig(), available_ranks=[4, 8, 16, 32])
    assert decision.new_rank == 8 and out is trained and decision.reason.startswith("kept rank 8")
    fresh = make_adapter(r=8, tail_scale=0.0)  # PEFT init: B = 0, the tail norm is 0 and cannot decrease
    assert pruned_rank(fresh, fresh, 0.99).new_rank == 8


def test_regularizer_step_shrinks_only_the_tail_along_its_gradient():
    ad = make_adapter(r=8)
    cfg = SelfPruneConfig(gamma=0.75, lam=0.5)  # tail = the last 2 components
    out = regularizer_step(ad, cfg, lr=0.1)
    assert tail_norm(out, 0.75) < tail_norm(ad, 0.75)
    for name, p in ad.modules.items():
        q = out.modules[name]
        assert torch.equal(q.lora_A[:6], p.lora_A[:6]) and torch.equal(q.lora_B[:, :6], p.lora_B[:, :6])
        # the oracle: autograd of λ‖B_t‖‖A_t‖ for this module
        a, b = p.lora_A.clone().requires_grad_(), p.lora_B.clone().requires_grad_()
        (0.5 * b[:, 6:].norm() * a[6:].norm()).backward()
        assert torch.allclose(q.lora_A, p.lora_A - 0.1 * a.grad)
        assert torch.allclose(q.lora_B, p.lora_B - 0.1 * b.grad)
    zero_b = make_adapter(r=8, tail_scale=0.0)
    same = regularizer_step(zero_b, SelfPruneConfig(gamma=0.99), lr=0.1)
    assert all(torch.equal(same.modules[n].lora_A, p.lora_A) for n, p in zero_b.modules.items())


@pytest.mark.parametrize("kwargs, match", [
    ({"gamma": 1.0}, r"gamma must be in \(0, 1\), got 1.0"),
    ({"gamma": 0}, r"gamma must be in \(0, 1\), got 0"),
    ({"lam": -1}, "lam must be a non-negative number, got -1"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SelfPruneConfig(**kwargs)
