"""The ExecuTorch side of the shared tiny package, loaded the way a device loads it, against eager PEFT."""

import pytest
import torch

from lorafleet.export.compiler.lora import attach_lora, load_lora
from lorafleet.export.compiler.loss import CausalLMLoss, example_batch
from lorafleet.export.compiler.models import load_model
from lorafleet.export.formats.package import open_package
from lorafleet.export.formats.program import LoraSpec
from tests.export_helpers import random_adapter

pytestmark = pytest.mark.filterwarnings("ignore")


def _eager(pkg, r, adapter):
    base = load_model("random:tiny", attn_implementation="eager", with_tokenizer=False).model
    spec = LoraSpec(r, tuple(pkg.manifest.target_modules), pkg.manifest.lora_alpha)
    model = attach_lora(base, spec)
    load_lora(model, spec, adapter)
    return model.eval()


def _batch(pkg, seed=3):
    m = pkg.manifest
    return example_batch(m.model.vocab_size, m.batch_size, m.seq_len, seed=seed)


def test_verification_covers_both_programs_of_every_rank(tiny_package):
    pkg = open_package(tiny_package)
    checks = pkg.manifest.verification["checks"]
    for r in pkg.ranks:
        metrics = {(c["artifact"], c["metric"]) for c in checks if c["rank"] == r}
        assert {("executorch_inference", "logits_max_abs_diff"), ("executorch_inference", "probe_logits_max_abs_diff"),
                ("executorch_training", "loss_abs_diff"), ("executorch_training", "grad_rel_max_abs_diff"),
                ("executorch_training", "lora_max_abs_diff")} <= metrics
    assert all(c["passed"] for c in checks)


def test_one_foundation_for_every_rank(tiny_package):
    pkg = open_package(tiny_package)
    m = pkg.manifest
    foundation = pkg.foundation("executorch").stat().st_size
    tied = m.model.vocab_size * m.model.hidden_size * 4
    assert foundation <= m.model.num_parameters * 4 + tied + 64 * 256  # each frozen tensor at most twice
    for r in pkg.ranks:
        own = sum(e.size for f, e in m.rank(r).files.items() if f.startswith("executorch/"))
        assert own < foundation  # a rank costs its LoRA tensors and program, not a model copy
    assert set(m.shared_files) == {"executorch/foundation.ptd", "onnx/foundation.data"}


def test_inference_program_loads_with_the_runtime_and_matches_eager(tiny_package):
    from executorch.runtime import Runtime

    pkg = open_package(tiny_package)
    ids, _ = _batch(pkg)
    for r in pkg.ranks:
        program = Runtime.get().load_program(str(pkg.path_of(r, "executorch_inference")),
                                             data_path=str(pkg.foundation("executorch")))
        logits = program.load_method("forward").execute([ids])[0]
        with torch.no_grad():
            want = _eager(pkg, r, pkg.initial_adapter(r))(input_ids=ids).logits
        assert logits.shape == (1, pkg.manifest.seq_len, pkg.manifest.model.vocab_size)
        assert float((logits - want).abs().max()) <= 1e-3


def test_training_program_trains_exactly_the_lora_tensors(tiny_package):
    from executorch.extension.pybindings.portable_lib import _load_for_executorch
    from executorch.extension.training import TrainingModule

    pkg = open_package(tiny_package)
    ids, labels = _batch(pkg)
    r = 4
    module = TrainingModule(_load_for_executorch(str(pkg.path_of(r, "executorch_training")),
                                                 data_path=str(pkg.foundation("executorch"))))
    loss = module.forward_backward("forward", (ids, labels))[0]
    names = sorted(module.named_parameters())
    assert len(names) == 2 * len(pkg.initial_adapter(r).modules)
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    with torch.no_grad():
        want = CausalLMLoss(_eager(pkg, r, pkg.initial_adapter(r)))(ids, labels)
    assert float(loss) == pytest.approx(float(want), abs=1e-4)


def test_new_weights_without_reexport_and_read_back(tiny_package):
    from lorafleet.export.compiler.executorch import load_inference, load_training

    pkg = open_package(tiny_package)
    ids, labels = _batch(pkg, seed=5)
    probe = random_adapter(8, seed=8)
    eager = _eager(pkg, 8, probe)
    foundation = pkg.foundation("executorch")
    inference = load_inference(pkg.path_of(8, "executorch_inference"), foundation)
    inference.set_adapter(probe)
    with torch.no_grad():
        assert float((inference.logits(ids) - eager(input_ids=ids).logits).abs().max()) <= 1e-3
    training = load_training(pkg.path_of(8, "executorch_training"), foundation)
    training.set_adapter(probe)
    back = training.adapter()
    for name, pair in probe.modules.items():
        torch.testing.assert_close(back.modules[name].lora_A, pair.lora_A)
        torch.testing.assert_close(back.modules[name].delta(), pair.delta())
    with torch.no_grad():
        assert training.step(ids, labels).loss == pytest.approx(float(CausalLMLoss(eager)(ids, labels)), abs=1e-4)
