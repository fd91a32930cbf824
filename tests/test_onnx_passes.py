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


# --- a quantized base ----------------------------------------------------------------------------------------

class Dequantized(torch.nn.Module):
    """A quantized linear's weight as the exporter writes its dequantization (``forward`` returns the weight,
    chunked like the LM head, so the ONNX values can be compared bit for bit)."""

    def __init__(self, mode: str, chunk_rows: int):
        from lorafleet.export.compiler.quantize import QuantizedLinear
        from lorafleet.export.formats.quantization import Quantization

        super().__init__()
        torch.manual_seed(0)
        self.lin = QuantizedLinear(torch.nn.Linear(64, 40, bias=False), Quantization.parse(mode), chunk_rows=chunk_rows)

    def forward(self, x, y):
        from lorafleet.export.compiler.quantize import dequantize

        rows = self.lin.chunk_rows or self.lin.out_features
        parts = [dequantize(self.lin.qweight[s:s + rows], self.lin.scale[s:s + rows])
                 for s in range(0, self.lin.out_features, rows)]
        return torch.cat(parts) + 0.0 * (x.sum() + y.sum())


def _run_proto(proto, inputs):
    import onnxruntime as ort

    from lorafleet.export.runtime.onnx import session_options

    sess = ort.InferenceSession(proto.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, inputs, strict=True)))[0]


@pytest.mark.parametrize("mode,chunk_rows", [("int4:16", 0), ("int4:32", 16), ("int4:64", 0), ("int8", 0),
                                             ("int8", 24)])
def test_dequantizations_become_uint8_nibbles_and_dequantize_linear_with_the_same_bits(mode, chunk_rows):
    import onnx_ir as ir

    from lorafleet.export.compiler.onnx.graph import lean_dequantizations

    module = Dequantized(mode, chunk_rows)
    x, y = torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64)
    proto = ir.serde.serialize_model(to_onnx(module, (x, y)))
    before = _run_proto(proto, [x.numpy(), y.numpy()])
    storage = {t.name for t in proto.graph.initializer if len(t.dims) == 2}
    chunks = -(-40 // chunk_rows) if chunk_rows else 1
    assert lean_dequantizations(proto, storage) == chunks
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("DequantizeLinear") == chunks and "Floor" not in ops
    assert all(n.op_type != "Cast" for n in proto.graph.node if n.input and n.input[0] in storage)
    after = _run_proto(proto, [x.numpy(), y.numpy()])
    with torch.no_grad():
        want = module(x, y).numpy()
    assert (after == want).all() and (before == want).all()  # the same fp32 weight, bit for bit


def test_a_split_of_stored_bytes_becomes_one_slice_per_piece():
    from onnx import TensorProto, helper, numpy_helper

    from lorafleet.export.compiler.onnx.graph import split_storage_to_slices

    stored = np.arange(10 * 4, dtype=np.uint8).reshape(10, 4)
    graph = helper.make_graph(
        [helper.make_node("Split", ["w", "sizes"], ["a", "b", "c"], axis=0),
         helper.make_node("Split", ["w"], ["d", "e"], axis=1, num_outputs=2),
         helper.make_node("Concat", ["c", "a", "b"], ["abc"], axis=0),
         helper.make_node("Concat", ["e", "d"], ["ed"], axis=1),
         helper.make_node("Concat", ["abc", "ed"], ["both"], axis=0),
         helper.make_node("Cast", ["both"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["f", "x"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [20, 4])],
        [numpy_helper.from_array(stored, "w"), numpy_helper.from_array(np.array([3, 5, 2], dtype=np.int64), "sizes")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.ones((1, 4), dtype=np.float32)
    before = _run_proto(proto, [x])
    assert split_storage_to_slices(proto, {"w"}) == 2
    ops = [n.op_type for n in proto.graph.node]
    assert "Split" not in ops and ops.count("Slice") == 5
    np.testing.assert_array_equal(_run_proto(proto, [x]), before)
    assert split_storage_to_slices(proto, set()) == 0  # only stored tensors are split this way
