"""ExecuTorch lowering and runtime on random:tiny, against eager transformers+PEFT (the oracle)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lorafleet.export.formats.errors import AdapterError, ConfigError, ExportError, PackageError
from tests.et_helpers import BATCH, SEQ_LEN, batch, eager_grads, load_into_peft, random_adapter, tiny_peft

pytestmark = pytest.mark.filterwarnings("ignore")
RANKS = (2, 4)
TRAINING_BACKEND = {2: "linear", 4: "xnnpack"}  # the bench also runs "portable"


@dataclass
class Built:
    inference: Any  # LoweredProgram
    training: Any
    inference_pte: Path
    training_pte: Path
    added: tuple[int, int]  # foundation bytes contributed by (inference, training)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, Built], Path, Any]:
    from lorafleet.export.compiler.executorch import FoundationStore, TrainingLowering, lower_inference, lower_training

    out = tmp_path_factory.mktemp("et")
    store = FoundationStore()
    made = {}
    for r in RANKS:
        inf = lower_inference(tiny_peft(r, random_b=True, seed=r), SEQ_LEN)
        # PEFT's init: every lora_B is zeros (each must still get its own memory)
        tr = lower_training(tiny_peft(r, seed=r), BATCH, SEQ_LEN, TrainingLowering(TRAINING_BACKEND[r]))
        added = (store.add(inf.foundation), store.add(tr.foundation))
        made[r] = Built(inf, tr, inf.write(out / f"inference_r{r}.pte"), tr.write(out / f"training_r{r}.pte"), added)
    return made, store.write(out / "foundation.ptd"), store


def frozen_bytes(peft_model: Any) -> int:
    seen = {p.data_ptr(): p.numel() * p.element_size() for n, p in peft_model.named_parameters() if "lora_" not in n}
    return sum(seen.values())


# --- inference ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", RANKS)
def test_inference_logits_match_eager(built, r):
    from executorch.runtime import Runtime

    from lorafleet.export.compiler.executorch import load_inference

    made, foundation, _ = built
    ids, _ = batch((1, SEQ_LEN))
    with torch.no_grad():
        ref = tiny_peft(r, random_b=True, seed=r)(input_ids=ids).logits
    program = load_inference(made[r].inference_pte, foundation)
    got = program.logits(ids)
    assert got.shape == (1, SEQ_LEN, 272)
    assert (got - ref).abs().max().item() <= 1e-3
    # the contract: plain Runtime.load_program with the shared foundation file
    raw = Runtime.get().load_program(str(made[r].inference_pte), data_path=str(foundation))
    assert torch.equal(raw.load_method("forward").execute([ids])[0], got)


def test_inference_set_adapter_without_reexport(built):
    from lorafleet.export.compiler.executorch import load_inference

    made, foundation, _ = built
    program = load_inference(made[4].inference_pte, foundation)
    eager = tiny_peft(4, random_b=True, seed=4)
    adapter = random_adapter(eager, 4, lora_alpha=32.0, seed=7)  # another alpha: rescaled on the way in
    program.set_adapter(adapter)
    load_into_peft(eager, adapter)
    ids, _ = batch((1, SEQ_LEN), seed=3)
    with torch.no_grad():
        ref = eager(input_ids=ids).logits
    assert (program.logits(ids) - ref).abs().max().item() <= 1e-3
    back = program.adapter()
    assert back.config["lora_alpha"] == 8.0 and back.r == 4
    for name, pair in adapter.modules.items():
        assert torch.allclose(back.modules[name].delta(), pair.delta(), atol=1e-6)


# --- training -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", RANKS)
def test_training_step_matches_eager(built, r):
    from lorafleet.export.compiler.executorch import load_training

    made, foundation, _ = built
    program = load_training(made[r].training_pte, foundation)
    eager = tiny_peft(r, seed=r)
    adapter = random_adapter(eager, r, lora_alpha=8.0, seed=11)  # non-zero B: every gradient is informative
    program.set_adapter(adapter)
    load_into_peft(eager, adapter)
    ids, labels = batch((BATCH, SEQ_LEN), seed=5)
    ref_loss, ref_grads = eager_grads(eager, ids, labels)
    step = program.step(ids, labels)
    assert step.loss == pytest.approx(ref_loss, abs=1e-5)
    assert set(step.gradients) == set(ref_grads) == set(adapter.state_dict())
    for key, g in ref_grads.items():
        assert torch.allclose(step.gradients[key], g, atol=1e-5, rtol=1e-4), key


def test_training_program_trains_only_lora(built):
    made, _, _ = built
    training = made[4].training
    assert all(".lora_" in n for n in training.lora.names)
    assert len(training.lora.names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


def test_training_read_back_round_trip(built):
    from lorafleet.export.compiler.executorch import load_training

    made, foundation, _ = built
    program = load_training(made[2].training_pte, foundation)
    adapter = random_adapter(tiny_peft(2), 2, lora_alpha=8.0, seed=3)
    program.set_adapter(adapter)
    back = program.adapter()
    assert back.state_dict().keys() == adapter.state_dict().keys()
    for key, t in adapter.state_dict().items():
        assert torch.equal(back.state_dict()[key], t), key  # same alpha: bit-exact, each factor its own memory


def test_device_adamw_steps_program_memory(built):
    """The device's AdamW (what ExecutorchBackend runs) over the program's aliased parameters: bit-exact with
    the same optimizer on copies fed the same gradients, and the program's loss follows eager PEFT's."""
    from lorafleet.edge_client.backends.base import AdamW, OptimizerConfig
    from lorafleet.export.compiler.executorch import load_training

    made, foundation, _ = built
    program = load_training(made[4].training_pte, foundation)
    eager = tiny_peft(4, seed=4)
    adapter = random_adapter(eager, 4, lora_alpha=8.0, seed=13)
    program.set_adapter(adapter)
    load_into_peft(eager, adapter)
    config = OptimizerConfig(lr=1e-2, weight_decay=0.1)
    params = program.parameters()
    keys = sorted(params)
    opt = AdamW([params[k] for k in keys], config)
    # the oracles: the same AdamW on copies, fed the same gradients (bit-exact), and on eager PEFT (close)
    copies = {k: t.detach().clone() for k, t in program.get_state().items()}
    ref_opt = AdamW([copies[k] for k in keys], config)
    from lorafleet.export.formats.adapter import peft_key

    named = {peft_key(n): p for n, p in eager.named_parameters() if p.requires_grad}
    eager_keys = [k for k in keys if k in named]
    assert len(eager_keys) == len(keys) == len(named)
    eager_opt = AdamW([named[k] for k in eager_keys], config)
    losses = []
    for seed in (21, 22, 23):
        ids, labels = batch((BATCH, SEQ_LEN), seed=seed)
        step = program.step(ids, labels)
        opt.step([step.gradients[k] for k in keys])
        ref_opt.step([step.gradients[k].clone() for k in keys])
        eager.zero_grad()
        ref = eager(input_ids=ids, labels=labels).loss
        ref.backward()
        eager_opt.step([named[k].grad for k in eager_keys])
        losses.append(step.loss)
        assert step.loss == pytest.approx(float(ref), abs=1e-4)  # the updates reached the program's memory
    assert losses[-1] < losses[0]
    state = program.get_state()
    for key, p in copies.items():
        assert torch.equal(state[key], p), key


# --- one foundation file --------------------------------------------------------------------------------

def test_one_foundation_for_every_rank_and_kind(built):
    made, foundation, store = built
    assert made[4].added == (0, 0)  # a second rank adds nothing to the foundation
    assert made[2].added[1] == 0  # training reuses the inference program's frozen tensors
    expected = frozen_bytes(tiny_peft(2))
    assert expected * 0.95 <= store.nbytes <= expected * 1.05  # equal tensors (norm weights) share bytes
    assert foundation.stat().st_size <= expected * 1.1
    for r in RANKS:
        assert made[r].inference_pte.stat().st_size < expected / 2


def test_foundation_from_files_equals_foundation_from_blobs(built, tmp_path):
    from lorafleet.export.compiler.executorch import FoundationStore

    made, foundation, _ = built
    store = FoundationStore()
    parts = []
    for r in RANKS:
        for kind in ("inference", "training"):
            part = tmp_path / f"r{r}-{kind}.ptd"
            part.write_bytes(getattr(made[r], kind).foundation)
            parts.append((part, store.add_file(part)))
    assert parts[0][1] > 0 and all(added == 0 for _, added in parts[1:])
    assert parts[0][0].exists()  # its segments are the foundation: kept until written
    assert not any(p.exists() for p, _ in parts[1:])  # repeats are deleted at once
    merged = store.write(tmp_path / "merged.ptd")
    assert merged.read_bytes() == foundation.read_bytes()  # the same file as from blobs in memory
    bad = tmp_path / "bad.ptd"
    bad.write_bytes(b"\0" * 64)
    with pytest.raises(ExportError, match="not an ExecuTorch data file"):
        store.add_file(bad)


def test_run_forked_returns_memory_and_reports_errors(tmp_path):
    import os

    from lorafleet.export.compiler.forked import run_forked

    out = tmp_path / "pid"
    run_forked(lambda: out.write_text(str(os.getpid())), "writing a file")
    assert int(out.read_text()) != os.getpid()  # it ran in another process

    def fail() -> None:
        raise ExportError("the lowering failed here")

    with pytest.raises(ExportError, match="^lowering a program failed: the lowering failed here$"):
        run_forked(fail, "lowering a program")
    with pytest.raises(ExportError, match="killed by SIGKILL"):
        run_forked(lambda: os.kill(os.getpid(), 9), "a step")
    with pytest.raises(ExportError, match="ZeroDivisionError"):
        run_forked(lambda: print(1 / 0), "dividing")


def test_foundation_rejects_another_model(built):
    from executorch.exir._serialize._cord import Cord
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    from lorafleet.export.compiler.executorch import FoundationStore

    made, _, _ = built
    blob = made[2].training.foundation
    payload = FlatTensorSerializer().deserialize(Cord(blob))
    key = max(payload.named_data, key=lambda k: len(payload.buffers[payload.named_data[k].buffer_index]))
    index = payload.named_data[key].buffer_index
    payload.buffers[index] = bytes(len(payload.buffers[index]))  # another model: other weights, same names
    store = FoundationStore()
    store.add(blob)
    with pytest.raises(ExportError, match=re.escape(key) + ".*differs between programs"):
        store.add(bytes(FlatTensorSerializer().serialize(payload)))


# --- errors ---------------------------------------------------------------------------------------------

def test_adapter_of_another_rank_is_refused(built):
    from lorafleet.export.compiler.executorch import load_inference, load_training

    made, foundation, _ = built
    wrong = random_adapter(tiny_peft(2), 2, lora_alpha=8.0, seed=1)
    with pytest.raises(AdapterError, match="program rank 4, adapter rank 2"):
        load_inference(made[4].inference_pte, foundation).set_adapter(wrong)
    training = load_training(made[4].training_pte, foundation)
    with pytest.raises(AdapterError, match="program rank 4, adapter rank 2"):
        training.set_adapter(wrong)
    partial = random_adapter(tiny_peft(4), 4, lora_alpha=8.0, seed=1)
    partial.modules.pop(next(iter(partial.modules)))
    with pytest.raises(AdapterError, match="missing"):
        training.set_adapter(partial)


def test_wrong_input_shape_and_missing_files(built, tmp_path):
    from lorafleet.export.compiler.executorch import load_inference, load_training

    made, foundation, _ = built
    program = load_inference(made[2].inference_pte, foundation)
    with pytest.raises(ConfigError, match=r"input_ids must have the program's shape \(1, 12\)"):
        program.logits(torch.zeros((1, 5), dtype=torch.long))
    training = load_training(made[2].training_pte, foundation)
    with pytest.raises(ConfigError, match="labels must have"):
        training.step(*batch((BATCH, SEQ_LEN))[:1], torch.zeros((1, 3), dtype=torch.long))
    with pytest.raises(PackageError, match="not found"):
        load_training(tmp_path / "missing.pte", foundation)
    with pytest.raises(PackageError, match="not found"):
        load_inference(made[2].inference_pte, tmp_path / "missing.ptd")


def test_lowering_validates_its_input():
    from lorafleet.export.compiler.executorch import lower_inference, lower_training

    model = tiny_peft(2)
    with pytest.raises(ExportError, match="seq_len must be a positive integer, got 0"):
        lower_inference(model, 0)
    with pytest.raises(ExportError, match="batch_size must be a positive integer, got -1"):
        lower_training(model, -1, 4)
    model.base_model.model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ExportError, match="only LoRA factors may be trainable"):
        lower_training(model, 1, 4)
    from lorafleet.export.compiler.models import load_model

    with pytest.raises(ExportError, match="no LoRA parameters"):
        lower_inference(load_model("random:tiny", with_tokenizer=False).model, 4)


def test_config_validation():
    from lorafleet.export.compiler.executorch import TrainingLowering
    from lorafleet.export.formats.program import CompiledLora, LoraSpec

    with pytest.raises(ExportError, match="backend must be one of"):
        TrainingLowering("cuda")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="r must be a positive integer, got 0"):
        LoraSpec(0, ("q_proj",), 8.0)
    with pytest.raises(ConfigError, match="no LoRA parameter names"):
        CompiledLora((), LoraSpec(4, ("q_proj",), 8.0))
    with pytest.raises(PackageError, match="unreadable LoRA spec"):
        CompiledLora.from_json("{}")
