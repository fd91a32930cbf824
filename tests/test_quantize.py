"""A quantized frozen base (``--quantize int8|int4[:G]``): the quantizer, the model rewrite, the graph passes
that keep a step from holding the whole model dequantized, and one exported, verified int4 package that every
backend trains with the same weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lorafleet.export.compiler.quantize import (
    QuantizedEmbedding,
    QuantizedLinear,
    dequantize,
    quantize_model,
    quantize_weight,
)
from lorafleet.export.formats.errors import ConfigError
from lorafleet.export.formats.quantization import Quantization

SPEC = {"target_modules": ("q_proj", "v_proj"), "lora_alpha": 16.0}


@pytest.mark.parametrize("text,canonical", [("none", "none"), ("int8", "int8"), ("int4", "int4:32"),
                                            ("int4:64", "int4:64"), ("INT4:128", "int4:128"), (" int4:16 ", "int4:16")])
def test_parse_accepts_the_modes(text, canonical):
    assert str(Quantization.parse(text)) == canonical


@pytest.mark.parametrize("text", ["int3", "fp8", "", "int4:", "int4:x", "int4:7", "int4:0", "int8:32", "none:4"])
def test_parse_refuses_with_one_line(text):
    with pytest.raises(ConfigError) as exc:
        Quantization.parse(text)
    assert "quantize" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("mode", ["int8", "int4:32", "int4:16"])
def test_quantize_weight_matches_torchao_and_is_within_half_a_step(mode):
    from torchao.quantization.quant_primitives import dequantize_affine

    q = Quantization.parse(mode)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    stored, scale = quantize_weight(w, q)
    block = q.block(64)
    assert stored.dtype == (torch.int8 if q.mode == "int8" else torch.uint8)
    assert stored.shape == ((48, 64) if q.mode == "int8" else (48, 32)) and scale.shape == (48, 64 // block)
    got = dequantize(stored, scale)
    if q.mode == "int8":
        values = stored
    else:  # unpack independently of dequantize(): low nibble = even column
        values = torch.stack([stored & 15, stored >> 4], dim=-1).reshape(48, 64).to(torch.int8) - 8
    want = dequantize_affine(values, (1, block), scale, None, torch.int8,
                             quant_min=-128 if q.mode == "int8" else -8, quant_max=127 if q.mode == "int8" else 7)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    step = scale.repeat_interleave(block, dim=1)
    assert ((got - w).abs() <= step * (0.5 + 1e-4)).all()


def test_an_int4_group_that_does_not_divide_the_width_is_refused():
    from lorafleet.export.compiler.quantize import check_quantizable

    model = torch.nn.Sequential(torch.nn.Linear(48, 8))
    with pytest.raises(ConfigError, match="not a multiple of the group size 32"):
        check_quantizable(model, Quantization.parse("int4:32"))
    check_quantizable(model, Quantization.parse("int4:16"))


def _tiny():
    from lorafleet.export.compiler.models import load_model

    return load_model("random:tiny", attn_implementation="eager", with_tokenizer=False).model


@pytest.mark.parametrize("mode", ["int8", "int4:32"])
def test_quantize_model_replaces_every_matrix_and_shares_a_tied_head(mode):
    model = _tiny()
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters()}
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules()) - 1  # the tied head is counted apart
    summary = quantize_model(model, Quantization.parse(mode))
    assert summary is not None and summary.linears == linears and summary.embedding and summary.lm_head == "tied"
    assert not any(type(m) is torch.nn.Linear or type(m) is torch.nn.Embedding for m in model.modules())
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embed, QuantizedEmbedding) and isinstance(head, QuantizedLinear)
    assert head.qweight is embed.qweight  # one copy of the vocabulary matrix
    assert not any(p.requires_grad for p in model.parameters())
    ratio = summary.stored_bytes / summary.fp32_bytes
    assert ratio < (0.27 if mode == "int8" else 0.16)
    w = fp32["model.layers.0.mlp.down_proj.weight"]
    deq = model.model.layers[0].mlp.down_proj.dequantized()
    assert 0 < (deq - w).abs().max() <= w.abs().max() / (127 if mode == "int8" else 7)
    # the embedding lookup dequantizes only the rows it reads, equal to the full dequantization's rows
    ids = torch.tensor([[3, 7, 3]])
    torch.testing.assert_close(embed(ids)[0], dequantize(embed.qweight, embed.scale)[[3, 7, 3]])


def test_the_head_dequantized_in_chunks_equals_the_whole():
    lin = torch.nn.Linear(32, 50)
    q = Quantization.parse("int4:16")
    whole, chunked = QuantizedLinear(lin, q), QuantizedLinear(lin, q, chunk_rows=16)
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(chunked(x), whole(x), rtol=0, atol=1e-6)


def _joint_graph(mode: str):
    from torch.export import export
    from torch.export.experimental import _export_forward_backward

    from lorafleet.export.compiler.executorch.wrappers import lora_parameter_names
    from lorafleet.export.compiler.lora import attach_lora
    from lorafleet.export.compiler.loss import CausalLMLoss
    from lorafleet.export.formats.program import WRAPPED, LoraSpec

    model = _tiny()
    quantize_model(model, Quantization.parse(mode))
    peft = attach_lora(model, LoraSpec(4, **SPEC))
    ids = torch.zeros((1, 8), dtype=torch.long)
    ep = _export_forward_backward(export(CausalLMLoss(peft), (ids, ids.clone()), strict=False))
    return ep, {f"{WRAPPED}.{n}" for n in lora_parameter_names(peft)}


def _last_use_span(ep) -> int:
    """Σ over the dequantized weights (values computed from the integer weights and other constants alone) of
    (index of the value's last reader − index of the value): how long they stay alive in the graph's order."""
    order = {n: i for i, n in enumerate(ep.graph.nodes)}
    const = {n for n in ep.graph.nodes if n.op == "placeholder" and n.name.startswith(("b_", "p_"))
             and ".lora_" not in n.name and "lora_" not in n.name}
    derived = {n for n in const if n.name.endswith("qweight")}
    for n in ep.graph.nodes:
        if n.op == "call_function" and n.all_input_nodes and all(i in const for i in n.all_input_nodes):
            const.add(n)
            if any(i in derived for i in n.all_input_nodes):
                derived.add(n)
    span = 0
    for n in derived - {p for p in const if p.op == "placeholder"}:  # the stored bytes are always there
        readers = [order[u] for u in n.users]
        if readers:
            span += max(readers) - order[n]
    return span


def test_rematerialize_gives_each_backward_product_its_own_dequantization():
    from lorafleet.export.compiler.executorch.passes import rematerialize_constant_subgraphs

    ep, trainable = _joint_graph("int8")
    before = _last_use_span(ep)
    added = rematerialize_constant_subgraphs(ep, trainable)
    assert added > 0
    assert _last_use_span(ep) < before / 4  # dequantized weights no longer live from the forward to the backward
    assert rematerialize_constant_subgraphs(ep, trainable) == 0  # idempotent


def test_rematerialize_leaves_an_fp32_graph_alone():
    from torch.export import export
    from torch.export.experimental import _export_forward_backward

    from lorafleet.export.compiler.executorch.passes import rematerialize_constant_subgraphs
    from lorafleet.export.compiler.executorch.wrappers import lora_parameter_names
    from lorafleet.export.compiler.lora import attach_lora
    from lorafleet.export.compiler.loss import CausalLMLoss
    from lorafleet.export.formats.program import WRAPPED, LoraSpec

    peft = attach_lora(_tiny(), LoraSpec(4, **SPEC))
    ids = torch.zeros((1, 8), dtype=torch.long)
    ep = _export_forward_backward(export(CausalLMLoss(peft), (ids, ids.clone()), strict=False))
    assert rematerialize_constant_subgraphs(ep, {f"{WRAPPED}.{n}" for n in lora_parameter_names(peft)}) == 0


def test_export_cli_refuses_a_bad_mode_before_loading(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lorafleet", "export", "random:tiny", "--ranks", "4",
                          "--target-modules", "q_proj,v_proj", "--quantize", "int4:7", "--out", str(tmp_path / "p")],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert out.returncode != 0 and not (tmp_path / "p").exists()
    assert out.stderr.strip().count("\n") == 0 and "group size" in out.stderr


@pytest.fixture(scope="module")
def int4_package(tmp_path_factory):
    from lorafleet.export.compiler.pipeline import ExportConfig, run_export

    out = tmp_path_factory.mktemp("q") / "pkg"
    with pytest.MonkeyPatch.context() as mp:  # the tiny head (272 rows) in chunks, as a 1B model's is
        mp.setattr("lorafleet.export.compiler.quantize.HEAD_CHUNK_ROWS", 64)
        run_export(ExportConfig(model="random:tiny", ranks=(4,), seq_len=8, out=out, quantize="int4:16", **SPEC))
    return out


def test_int4_package_is_verified_and_records_its_quantization(int4_package):
    m = json.loads((int4_package / "manifest.json").read_text())
    assert m["quantize"] == "int4:16" and m["verification"]["passed"]
    q = m["quantization"]
    assert q["scheme"] == "int4:16" and q["lm_head"] == "tied" and q["embedding"]
    assert q["against_fp32"]["mean_kl_nats"] > 0 and q["against_fp32"]["top1_agreement"] > 0.5
    sizes = {k: v["size"] for k, v in m["shared_files"].items()}
    # each runtime's foundation holds the quantized bytes (and the small fp32 rest), not fp32 matrices
    # (ONNX keeps initializers under 1 KiB, e.g. a small layer's scales, inside the model files)
    nibbles = q["quantized_parameters"] // 2
    for name in ("executorch/foundation.ptd", "onnx/foundation.data"):
        assert nibbles <= sizes[name] < q["stored_bytes"] + q["unquantized_bytes"] + 64 * 1024, name
    assert m["artifacts"]["4"]["estimates"]["memory_breakdown"]["weights"] == q["weight_memory_bytes"]


def test_onnx_artifacts_keep_the_integer_weights_and_a_lora_only_checkpoint(int4_package):
    import onnx

    rank_dir = int4_package / "onnx" / "rank-4"
    model = onnx.load(str(rank_dir / "training_model.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    ints = [t for t in inits.values() if t.data_type == onnx.TensorProto.UINT8]
    assert len(ints) >= 14  # every decoder linear and the embedding
    # no fp32 matrix the size of a dequantized weight (ORT would have folded the dequantization into one)
    assert not [t.name for t in inits.values() if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
                and t.dims[0] * t.dims[1] >= 64 * 32]
    assert {i.name for i in model.graph.input} & set(inits) == set()
    # each dequantization waits for its reader's activation (a Reshape of the stored bytes to their own shape,
    # fed by that activation's Shape) instead of running whenever ORT likes, e.g. all of them up front
    readers = {n.op_type for n in model.graph.node for i in n.input if i in {t.name for t in ints}}
    assert readers <= {"Reshape", "Shape", "Gather"} and "Reshape" in readers
    # each dequantization is nibbles split in uint8 and one DequantizeLinear (no element-wise fp32 chain), for
    # every product of the forward and the backward: 14 linears and 5 head chunks forward, fewer backward
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DequantizeLinear") > 14 + 5
    assert ops.count("Floor") == 1  # the embedding's lookup alone (the rows it reads) stays element-wise
    # the head's chunks are sliced one by one from the stored bytes (ORT's builder had fused them into a Split,
    # which copies every chunk at once, and once more in each backward copy)
    producer = {o: n for n in model.graph.node for o in n.output}
    tied = {o for n in model.graph.node if n.op_type == "Reshape" and n.input[0] in {t.name for t in ints}
            for o in n.output}
    assert not [n.name for n in model.graph.node if n.op_type == "Split" and n.input[0] in tied]
    sliced = [n for n in model.graph.node if n.op_type == "Slice" and n.input[0] in tied]
    assert len(sliced) >= 2 * 5 and all(producer[n.input[0]].op_type == "Reshape" for n in sliced)
    # the eval graph declares the contrib domain its fused products use, and loads
    import onnxruntime as ort

    from lorafleet.export.runtime.onnx import session_options

    evaluation = onnx.load(str(rank_dir / "eval_model.onnx"), load_external_data=False)
    assert "com.microsoft" in {op.domain for op in evaluation.opset_import}
    # ... and is as lean as the forward of the training graph: its builder leaves each scale's Unsqueeze
    # unfolded, which must not keep the element-wise chain (it did for every linear but the head's chunks)
    eval_ops = [n.op_type for n in evaluation.graph.node]
    assert eval_ops.count("Floor") == 1 and eval_ops.count("DequantizeLinear") >= 14 + 5
    ort.InferenceSession(str(rank_dir / "eval_model.onnx"), session_options(), providers=["CPUExecutionProvider"])
    from onnxruntime.training.api import CheckpointState

    state = CheckpointState.load_checkpoint(str(rank_dir / "checkpoint"))
    names = [n for n, _ in state.parameters]
    assert names and all(".lora_" in n for n in names)


def test_every_backend_trains_the_same_quantized_weights(int4_package):
    from lorafleet.edge_client.backends.base import OptimizerConfig
    from lorafleet.edge_client.backends.executorch_backend import ExecutorchBackend
    from lorafleet.edge_client.backends.onnx_backend import OnnxBackend
    from lorafleet.edge_client.backends.torch_backend import TorchBackend
    from lorafleet.edge_client.data import Batch
    from lorafleet.export.compiler.loss import example_batch
    from lorafleet.export.formats.package import open_package

    pkg = open_package(int4_package)
    ids, labels = example_batch(272, 1, 8, seed=5)
    batch = Batch(ids.numpy(), labels.numpy())
    losses = {}
    for cls in (TorchBackend, ExecutorchBackend, OnnxBackend):
        backend = cls.from_package(pkg, 4, OptimizerConfig(lr=1e-2))
        losses[cls.name] = [backend.step(batch) for _ in range(3)]
    for name in ("executorch", "onnxruntime"):
        assert losses[name] == pytest.approx(losses["torch"], abs=1e-4), (name, losses)
    # an fp32 model of the same spec gives other losses: the quantized weights are what they trained
    fp32 = TorchBackend("random:tiny", ["q_proj", "v_proj"], 4, 16.0, optimizer=OptimizerConfig(lr=1e-2))
    fp32.load_adapter(pkg.initial_adapter(4))
    assert abs(fp32.step(batch) - losses["torch"][0]) > 1e-5
