"""Fixtures for the aggregation tests: random client adapters and a dense float64 reference of each method,
written as directly from the papers' definitions as possible (dense ΔW, explicit zero padding, full SVD)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from lorafleet.export.formats.adapter import Adapter, LoraPair, scaling_for

SHAPES = {"model.layers.0.self_attn.q_proj": (24, 20), "model.layers.0.mlp.down_proj": (18, 28)}


def make_adapter(r: int | dict[str, int], alpha: float = 16.0, *, seed: int = 0, rslora: bool = False,
                 shapes: dict[str, tuple[int, int]] | None = None, dtype: torch.dtype = torch.float32) -> Adapter:
    """A client adapter with random lora_A and lora_B (both non-zero, as after local training)."""
    shapes = shapes or SHAPES
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name, (out, inp) in shapes.items():
        rk = r[name] if isinstance(r, dict) else r
        mods[name] = LoraPair(torch.randn(rk, inp, generator=g).to(dtype),
                              (torch.randn(out, rk, generator=g) / math.sqrt(rk)).to(dtype),
                              scaling_for(rk, alpha, rslora))
    targets = sorted({n.rsplit(".", 1)[-1] for n in shapes})
    rank = max(r.values()) if isinstance(r, dict) else r
    return Adapter(mods, {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
                          "target_modules": targets, "base_model_name_or_path": "random:tiny"})


def deltas(adapter: Adapter) -> dict[str, torch.Tensor]:
    """ΔW per module in float64."""
    return {n: p.scaling * (p.lora_B.double() @ p.lora_A.double()) for n, p in adapter.modules.items()}


def _norm(weights: Sequence[float] | None, n: int) -> list[float]:
    ws = [1.0] * n if weights is None else list(weights)
    return [w / sum(ws) for w in ws]


def dense_fedavg(clients: Sequence[Adapter], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    w = _norm(weights, len(clients))
    out = {}
    for name in clients[0].modules:
        ps = [c.modules[name] for c in clients]
        b = sum(wk * p.scaling * p.lora_B.double() for wk, p in zip(w, ps, strict=True))
        a = sum(wk * p.lora_A.double() for wk, p in zip(w, ps, strict=True))
        out[name] = b @ a
    return out


def dense_hetlora(clients: Sequence[Adapter], weights: Sequence[float] | None = None, *,
                  use_weights: bool = False) -> dict[str, torch.Tensor]:
    w = _norm(weights, len(clients))
    out = {}
    for name in clients[0].modules:
        ps = [c.modules[name] for c in clients]
        r_max = max(p.r for p in ps)
        norms = [torch.linalg.matrix_norm(p.scaling * p.lora_B.double() @ p.lora_A.double()).item() for p in ps]
        raw = [n * (wk if use_weights else 1.0) for n, wk in zip(norms, w, strict=True)]
        pk = [x / sum(raw) for x in raw]
        b = sum(q * torch.nn.functional.pad(p.scaling * p.lora_B.double(), (0, r_max - p.r))
                for q, p in zip(pk, ps, strict=True))
        a = sum(q * torch.nn.functional.pad(p.lora_A.double(), (0, 0, 0, r_max - p.r))
                for q, p in zip(pk, ps, strict=True))
        out[name] = b @ a
    return out


def dense_weighted_sum(clients: Sequence[Adapter], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """W = Σ w_k ΔW_k per module (float64, dense)."""
    w = _norm(weights, len(clients))
    ds = [deltas(c) for c in clients]
    return {name: sum(wk * d[name] for wk, d in zip(w, ds, strict=True)) for name in clients[0].modules}


def truncated_svd(w: torch.Tensor, r: int) -> torch.Tensor:
    """The rank-r truncated SVD of w (full SVD in float64)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def dense_flexlora(clients: Sequence[Adapter], weights: Sequence[float] | None = None,
                   rank: int | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for name, w in dense_weighted_sum(clients, weights).items():
        r = rank or max(c.modules[name].r for c in clients)
        out[name] = truncated_svd(w, r)
    return out


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def max_rel_err(got: Adapter, ref: dict[str, torch.Tensor]) -> float:
    d = deltas(got)
    assert d.keys() == ref.keys()
    return max(rel_err(d[n], ref[n]) for n in ref)


def tree_digest(path: Path) -> str:
    """A digest of every file under ``path`` (names and bytes), to show inputs are untouched."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def write_raw(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """A PEFT-looking directory written byte by byte as given (for malformed clients)."""
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path
