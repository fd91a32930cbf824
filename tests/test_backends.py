"""The backend protocol: ORT-exact AdamW, adapter in/out, and per-step loss parity of the three backends
(torch eager + PEFT is the reference) on `random:tiny` with the same data, seed and initial adapter."""

import math

import numpy as np
import pytest
import torch
from client_helpers import example_batches, nonzero_adapter, require_native

from lorafleet.edge_client.backends import BACKENDS, AdamW, OptimizerConfig, make_backend
from lorafleet.export.formats.adapter import rescale
from lorafleet.export.formats.errors import AdapterError, ConfigError
from lorafleet.export.formats.package import open_package

RANK = 4
STEPS = 6


def test_adamw_matches_the_ort_hf_mode_formula():
    p = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    cfg = OptimizerConfig(lr=0.1, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.01)
    opt = AdamW([p], cfg)
    ref, m, v = p.clone(), torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for t, g in enumerate([torch.tensor([0.3, -0.1, 2.0]), torch.tensor([-0.2, 0.4, 1.0])], start=1):
        g = g.double()
        opt.step([g])
        m = 0.8 * m + 0.2 * g
        v = 0.9 * v + 0.1 * g * g
        ref = ref - 0.1 * math.sqrt(1 - 0.9**t) / (1 - 0.8**t) * m / (v.sqrt() + 1e-3)
        ref = ref - 0.1 * 0.01 * ref
        assert torch.allclose(p, ref, atol=1e-12)
    opt.reset()
    assert opt.t == 0 and all(float(b.abs().sum()) == 0 for b in (*opt.m, *opt.v))


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": 0}, "lr must be a positive number, got 0"),
    ({"betas": (0.9, 1.0)}, r"betas must lie in \[0, 1\)"),
    ({"eps": 0}, "eps must be positive"),
])
def test_optimizer_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        OptimizerConfig(**kwargs)


@pytest.fixture(scope="module")
def pkg(tiny_package):
    return open_package(tiny_package)


@pytest.fixture(scope="module")
def tiny_batches(pkg):
    return example_batches(pkg, STEPS, seed=1)


def _make(name, pkg, rank, optimizer):
    if name == "native":
        require_native()
    return make_backend(name, pkg, rank, optimizer)


def _run(pkg, name, tiny_batches):
    be = _make(name, pkg, RANK, OptimizerConfig(lr=1e-2))
    be.load_adapter(nonzero_adapter(RANK))
    losses = [be.step(b) for b in tiny_batches]
    return losses, be.adapter_state()


@pytest.fixture(scope="module")
def reference(pkg, tiny_batches):
    return _run(pkg, "torch", tiny_batches)


@pytest.mark.parametrize("name", ["onnxruntime", "executorch", "native"])
def test_per_step_losses_agree_with_torch(pkg, tiny_batches, reference, name):
    ref_losses, ref_adapter = reference
    losses, adapter = _run(pkg, name, tiny_batches)
    assert np.allclose(losses, ref_losses, atol=1e-4), (losses, ref_losses)
    start = nonzero_adapter(RANK)
    assert not all(torch.allclose(ref_adapter.modules[m].lora_B, p.lora_B) for m, p in start.modules.items())
    for mod, p in ref_adapter.modules.items():
        q = adapter.modules[mod]
        assert q.scaling == pytest.approx(p.scaling)
        assert torch.allclose(q.lora_A, p.lora_A, atol=1e-4) and torch.allclose(q.lora_B, p.lora_B, atol=1e-4)


@pytest.mark.parametrize("name", BACKENDS)
def test_adapter_round_trip_and_rescaling(pkg, tiny_batches, name):
    be = _make(name, pkg, RANK, OptimizerConfig(lr=1e-2))
    start = nonzero_adapter(RANK, seed=3)
    be.load_adapter(start)
    out = be.adapter_state()
    assert out.r == RANK and set(out.modules) == set(start.modules)
    assert all(torch.allclose(out.modules[m].delta(), p.delta(), atol=1e-6) for m, p in start.modules.items())
    loss = be.step(tiny_batches[0])
    # the same ΔW expressed with another lora_alpha gives the same loss after reloading
    be.load_adapter(rescale(start, 4.0))
    assert be.step(tiny_batches[0]) == pytest.approx(loss, abs=1e-5)


@pytest.mark.parametrize("name", BACKENDS)
def test_wrong_rank_or_modules_are_refused(pkg, name):
    be = _make(name, pkg, RANK, OptimizerConfig())
    with pytest.raises(AdapterError, match=r"adapter has rank \[2\], the program trains rank 4"):
        be.load_adapter(nonzero_adapter(2))
    bad = nonzero_adapter(RANK)
    bad.modules.pop(next(iter(bad.modules)))
    with pytest.raises(AdapterError, match="do not match"):
        be.load_adapter(bad)


def test_make_backend_errors(pkg):
    assert BACKENDS == ("executorch", "onnxruntime", "torch", "native")
    with pytest.raises(ConfigError, match="unknown backend 'tflite'"):
        make_backend("tflite", pkg, RANK, OptimizerConfig())
    with pytest.raises(Exception, match=r"the package has no rank 16 \(ranks: \[2, 4, 8\]\)"):
        make_backend("torch", pkg, 16, OptimizerConfig())
    with pytest.raises(ConfigError, match="compiled as AdamW"):
        make_backend("onnxruntime", pkg, RANK, OptimizerConfig(weight_decay=0.1))

