"""The real SmolLM2-135M-Instruct exported at rank 8 for both runtimes: logits and loss of every program against
eager transformers + PEFT, recomputed here independently of export's own verification.

One rank: ExecuTorch's lowering of the real model is the suite's longest step (minutes a rank); packages of
several ranks sharing one foundation are tested on random:tiny (test_export_pipeline, test_export_package)."""

import pytest
import torch

from lorafleet.export.compiler.lora import attach_lora, detach_lora
from lorafleet.export.compiler.loss import CausalLMLoss
from lorafleet.export.compiler.models import load_model
from lorafleet.export.compiler.pipeline import ExportConfig, run_export
from lorafleet.export.compiler.verify import probe_adapter
from lorafleet.export.formats.package import open_package
from lorafleet.export.formats.program import LoraSpec

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


@pytest.fixture(scope="module")
def real_package(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "pkg"
    run_export(ExportConfig(model="smollm2-135m", ranks=(8,), target_modules=("q_proj", "v_proj"), out=out,
                            seq_len=16))
    return open_package(out)


def test_real_model_programs_match_eager(real_package):
    check_against_eager(real_package)


def check_against_eager(pkg):
    from lorafleet.export.compiler.executorch import load_inference, load_training
    from lorafleet.export.runtime.onnx import OnnxTrainer

    m = pkg.manifest
    assert m.verification["passed"] and m.model.num_parameters == 134_515_008
    lm = load_model("smollm2-135m", attn_implementation="eager")
    text = ("The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid. "
            "The capital of Germany is Berlin. The capital of Portugal is Lisbon.")
    ids = torch.tensor([lm.tokenizer.encode(text)[:m.seq_len]])
    assert ids.shape == (1, m.seq_len)
    labels = ids.clone()
    model = lm.model
    assert m.ranks == [8]
    for r in m.ranks:
        spec = LoraSpec(r, tuple(m.target_modules), m.lora_alpha)
        probe = probe_adapter(pkg.initial_adapter(r), spec, seed=r)
        peft = attach_lora(model, spec, probe).eval()
        with torch.no_grad():
            want_logits = peft(input_ids=ids).logits
            want_loss = float(CausalLMLoss(peft)(ids, labels))
        foundation = pkg.foundation("executorch")
        inference = load_inference(pkg.path_of(r, "executorch_inference"), foundation)
        inference.set_adapter(probe)
        assert float((inference.logits(ids) - want_logits).abs().max()) <= 1e-3
        training = load_training(pkg.path_of(r, "executorch_training"), foundation)
        training.set_adapter(probe)
        assert training.step(ids, labels).loss == pytest.approx(want_loss, abs=1e-4)
        trainer = OnnxTrainer.from_package(pkg, r)
        trainer.set_lora(probe)
        assert trainer.loss(ids, labels) == pytest.approx(want_loss, abs=1e-4)
        assert 0.5 < want_loss < 8  # a real model on real text, not noise
        model = detach_lora(peft)
