"""The pinned stack works together: the onnx / onnxscript / onnxruntime-training version decision."""

import onnx
import pytest
import torch


def test_dynamo_onnx_export_trains_in_onnxruntime(tmp_path):
    """onnx 1.17 (IR 10) + onnxscript 0.7.2 + ORT-training 1.19.2: export, build artifacts, one AdamW step."""
    from onnxruntime.training import artifacts
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    class Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = lin

        def forward(self, x, y):
            return ((self.net(x) - y) ** 2).mean()

    x, y = torch.randn(4, 8), torch.randn(4, 1)
    prog = torch.onnx.export(Loss(), (x, y), dynamo=True, optimize=False, do_constant_folding=False,
                             input_names=["x", "y"], output_names=["loss"])
    prog.save(str(tmp_path / "m.onnx"))
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert model.ir_version <= 10, "ORT-training 1.19.2 loads IR ≤ 10"
    names = [i.name for i in model.graph.initializer]
    trainable = [n for n in names if n.startswith("net.2")]
    (tmp_path / "art").mkdir()
    artifacts.generate_artifacts(model, requires_grad=trainable,
                                 frozen_params=[n for n in names if n not in trainable],
                                 optimizer=artifacts.OptimType.AdamW, artifact_directory=str(tmp_path / "art"))
    state = CheckpointState.load_checkpoint(str(tmp_path / "art" / "checkpoint"))
    module = Module(str(tmp_path / "art" / "training_model.onnx"), state, str(tmp_path / "art" / "eval_model.onnx"))
    opt = Optimizer(str(tmp_path / "art" / "optimizer_model.onnx"), module)
    module.train()
    first = float(module(x.numpy(), y.numpy()))
    assert first == pytest.approx(float(Loss()(x, y)), rel=1e-5)
    opt.step()
    module.lazy_reset_grad()
    assert float(module(x.numpy(), y.numpy())) < first
