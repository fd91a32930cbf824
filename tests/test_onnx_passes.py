"""The ONNX graph passes that let ONNX Runtime's gradient builder train families beyond Llama: each rewrite
leaves what the graph computes unchanged (checked by running it in ONNX Runtime against torch) and removes
the operator ORT cannot differentiate through."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafleet.export.compiler.onnx.artifacts import to_onnx
from lorafleet.export.compiler.onnx.graph import cast_like_to_cast, sequence_splits_to_split


class Chunked(torch.nn.Module):
    """``Tensor.chunk`` into uneven pieces (10 → 4, 4, 2), read by a negative index too, as Phi-3's MLP does."""

    def __init__(self, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.w = torch.nn.Parameter(torch.randn(6, 10))

    def forward(self, x, y):
        parts = (x @ self.w).chunk(self.chunks, dim=-1)
        return (parts[0] * torch.sigmoid(parts[1])).sum() + parts[-1].square().sum() + y.sum()


class Normed(torch.nn.Module):
    """Gemma's RMSNorm ends in ``type_as``: exported as ``CastLike``."""

    def forward(self, x, y):
        h = x.float()
        out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return out.type_as(x).sum() + y.sum()


def _run(model, inputs):
    import onnx_ir as ir
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, inputs, strict=True)))[0]


def _ops(model):
    return {n.op_type for n in model.graph.all_nodes()}


@pytest.mark.parametrize("chunks", [2, 3])
def test_sequence_splits_become_one_split_with_the_same_values(chunks):
    torch.manual_seed(0)
    module = Chunked(chunks)
    x, y = torch.randn(2, 3, 6), torch.zeros(1, dtype=torch.int64)
    model = to_onnx(module, (x, y))
    assert "SplitToSequence" in _ops(model)
    before = _run(model, [x.numpy(), y.numpy()])
    assert sequence_splits_to_split(model) == 1
    assert {"SplitToSequence", "SequenceAt"}.isdisjoint(_ops(model)) and "Split" in _ops(model)
    after = _run(model, [x.numpy(), y.numpy()])
    with torch.no_grad():
        want = module(x, y).numpy()
    np.testing.assert_allclose(after, before, rtol=1e-6)
    np.testing.assert_allclose(after, want, rtol=1e-5)


def test_cast_like_becomes_cast_with_the_same_values():
    x, y = torch.randn(2, 8), torch.zeros(1, dtype=torch.int64)
    model = to_onnx(Normed(), (x, y))
    assert "CastLike" in _ops(model)
    before = _run(model, [x.numpy(), y.numpy()])
    assert cast_like_to_cast(model) >= 1
    assert "CastLike" not in _ops(model)
    np.testing.assert_allclose(_run(model, [x.numpy(), y.numpy()]), before, rtol=1e-6)
