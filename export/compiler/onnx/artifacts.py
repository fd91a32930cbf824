"""ONNX Runtime on-device training artifacts for one rank (the session devices run them with is
:class:`lorafleet.export.runtime.onnx.OnnxTrainer`).

Export (:func:`export_onnx_training`): the loss module ``(input_ids, labels) -> loss`` goes through torch's dynamo ONNX
exporter with ``optimize=False, do_constant_folding=False`` (so LoRA initializers keep their PEFT names; the default
optimizer renames them), then ``onnxruntime.training.artifacts.generate_artifacts`` builds the gradient graph with
exactly the LoRA tensors trainable and an AdamW optimizer model. The frozen weights stay graph initializers and go to
one external-data file shared by every rank (:class:`lorafleet.export.compiler.onnx.graph.SharedExternalData`), so a
rank's ``checkpoint`` holds only its LoRA tensors.

The rank's :class:`~lorafleet.export.formats.program.LoraSpec` and input shape are recorded in the training graph's
metadata (:func:`lorafleet.export.formats.program.onnx_props`) so a loaded program can be checked against its manifest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.export.formats.adapter import LORA_KEY
from lorafleet.export.formats.errors import ExportError
from lorafleet.export.formats.program import LoraSpec, onnx_props
from lorafleet.export.runtime.onnx import quiet_onnxruntime

if TYPE_CHECKING:

    from lorafleet.export.compiler.onnx.graph import SharedExternalData



# --- export ---------------------------------------------------------------------------------------------

def export_onnx_training(loss_module: Any, example: tuple[Any, Any], out_dir: Path,
                         shared: SharedExternalData, spec: LoraSpec) -> list[str]:
    """Write the ORT training artifacts of ``loss_module`` into ``out_dir`` (created); returns the LoRA names.

    ``spec`` (the LoRA settings compiled in) is recorded in the training graph's metadata
    (:data:`META_PREFIX` keys), so a loaded program can be checked against its manifest.
    ``example`` is ``(input_ids, labels)``, each int64 ``(B, T)``: the shapes are fixed in the graphs. The
    frozen weights go to ``shared`` before ORT sees the graph, so ORT's builder works on references only;
    ORT resolves them relative to the working directory when it optimizes a graph held in memory, hence the
    ``chdir`` into ``out_dir``.
    """
    import onnx_ir as ir
    from onnxruntime.training import artifacts

    from lorafleet.export.compiler.onnx.graph import (
        cast_like_to_cast,
        fold_weight_transposes,
        gather_from_transposed,
        quantized_storage,
        sequence_splits_to_split,
        strip_metadata,
    )

    quiet_onnxruntime()
    model = to_onnx(loss_module, example)
    names = list(model.graph.initializers)
    lora = [n for n in names if (m := LORA_KEY.match(n)) is not None and m["adapter"]]
    if not lora:
        raise ExportError("the exported ONNX graph has no LoRA initializers (were the PEFT names lost?)")
    strip_metadata(model)
    cast_like_to_cast(model)
    sequence_splits_to_split(model)
    fold_weight_transposes(model, set(names) - set(lora))
    gather_from_transposed(model)
    storage = quantized_storage(model, skip=set(lora))  # a quantized base: kept from ORT's constant folding
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True)  # generate_artifacts does not create it
    with shared.linked_into(out_dir) as local, contextlib.chdir(out_dir):
        shared.externalize(model, out_dir, skip=set(lora), location=local)
        proto = ir.serde.serialize_model(model)
        del model
        kept = {t.name: _copy(t) for t in proto.graph.initializer if t.name in storage or t.name in lora}
        with _native_stderr_captured() as log:
            try:
                # ``frozen_params`` become graph inputs while the gradient graph is built (inputs are not folded);
                # _finish_outputs turns them back into initializers of the shared file
                artifacts.generate_artifacts(proto, requires_grad=lora, frozen_params=sorted(storage) or None,
                                             optimizer=artifacts.OptimType.AdamW, artifact_directory=".")
            except Exception as exc:
                raise ExportError(f"ORT training artifacts failed: {str(exc).strip().splitlines()[0]} "
                                  f"({_last_line(log)})") from exc
        if storage:
            from onnxruntime.training import onnxblock

            # the checkpoint holds what a rank trains; the quantized base stays in the shared file
            onnxblock.save_checkpoint(([kept[n] for n in lora], []), "checkpoint")
    _finish_outputs(out_dir, shared, local, onnx_props(spec, tuple(example[0].shape)),
                    {n: kept[n] for n in storage})
    return lora


_INTEGER_WEIGHTS = (2, 3)  # onnx.TensorProto.UINT8, INT8


def _copy(t: Any) -> Any:
    import onnx

    c = onnx.TensorProto()
    c.CopyFrom(t)
    return c


def to_onnx(loss_module: Any, example: tuple[Any, Any]) -> Any:
    """The loss module as an ``onnx_ir.Model`` (dynamo exporter, parameter names kept, weights not copied)."""
    import logging
    import warnings

    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(loss_module, example, dynamo=True, optimize=False, do_constant_folding=False,
                                     input_names=["input_ids", "labels"], output_names=["loss"], verbose=False)
        except Exception as exc:
            raise ExportError(f"ONNX export failed: {str(exc).strip().splitlines()[0]}") from exc
    if prog is None:
        raise ExportError("ONNX export returned no program")
    return prog.model


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """File descriptor 2 appended to ``path`` while the block runs (C++ logging included).

    ORT's training graph builder logs hundreds of INFO lines from C++ whatever the Python-side severity.
    """
    import os
    import sys

    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as f:
            os.dup2(f.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[Path]:
    """:func:`stderr_to` a temporary file (yields its path, removed afterwards)."""
    import tempfile

    with tempfile.NamedTemporaryFile(prefix="lorafleet-ort-", suffix=".log") as f, stderr_to(Path(f.name)):
        yield Path(f.name)


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][-200:] if lines else "no log"


def _finish_outputs(out_dir: Path, shared: SharedExternalData, local: str, props: dict[str, str],
                    storage: dict[str, Any]) -> None:
    """Point the saved graphs at the shared file (anything ORT's builder inlined goes there too), make the
    quantized ``storage`` initializers again (recomputing each dequantized weight where the backward reads it),
    and record ``props`` in their metadata."""
    import onnx

    from lorafleet.export.compiler.onnx.graph import (
        lean_dequantizations,
        rematerialize_constant_subgraphs,
        split_storage_to_slices,
    )

    for name in ("training_model.onnx", "eval_model.onnx"):
        path = out_dir / name
        model = onnx.load(str(path), load_external_data=False)
        if storage:
            inputs = [i for i in model.graph.input if i.name not in storage]
            del model.graph.input[:]
            model.graph.input.extend(inputs)
            model.graph.initializer.extend(storage.values())
            split_storage_to_slices(model, set(storage))
            lean_dequantizations(model, set(storage))
            if name == "training_model.onnx":
                frozen = {t.name for t in model.graph.initializer} - {i.name for i in model.graph.input}
                ints = {t.name for t in model.graph.initializer if t.data_type in _INTEGER_WEIGHTS and len(t.dims) >= 2}
                rematerialize_constant_subgraphs(model, frozen, ints & set(storage))
        shared.relocate(model, local, out_dir)
        shared.externalize_proto(model, out_dir)
        onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **props})
        onnx.save(model, str(path))


__all__ = ["export_onnx_training", "to_onnx"]
