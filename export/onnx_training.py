"""ONNX Runtime on-device training: artifact export for one rank, and the session wrapper devices use.

Export (:func:`export_onnx_training`): the loss module ``(input_ids, labels) -> loss`` goes through torch's
dynamo ONNX exporter with ``optimize=False, do_constant_folding=False`` (so LoRA initializers keep their
PEFT names; the default optimizer renames them), then ``onnxruntime.training.artifacts.generate_artifacts``
builds the gradient graph with exactly the LoRA tensors trainable and an AdamW optimizer model. The frozen
weights stay graph initializers and go to one external-data file shared by every rank
(:class:`export.onnx_graph.SharedExternalData`), so a rank's ``checkpoint`` holds only its LoRA tensors.

Runtime (:class:`OnnxTrainer`): ``step(input_ids, labels) -> loss`` (one AdamW step, HF AdamW mode: betas
0.9/0.999, eps 1e-6, no weight decay, bias correction), ``set_lora(adapter)`` to take the server's weights
without re-export, ``get_lora() -> Adapter`` to send the trained weights back.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.adapter import Adapter, LoraPair, peft_config
from export.errors import ConfigError, ExportError, PackageError
from export.lora import LoraSpec, conform
from export.manifest import Compiled, check_compiled

if TYPE_CHECKING:
    import numpy as np

    from export.onnx_graph import SharedExternalData
    from export.package import Package

ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
# PEFT parameter names as the exporter writes them: <wrapper prefix>base_model.model.<module>.lora_A.default.weight
_LORA_NAME = re.compile(r"^(?:.*\.)?base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.default\.weight$")
ADAMW = {"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0}  # onnxblock.optim.AdamW defaults
META_PREFIX = "lorafleet."  # the training graph's metadata_props: what it was compiled with


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

    from export.onnx_graph import fold_weight_transposes, gather_from_transposed, strip_metadata

    quiet_onnxruntime()
    model = to_onnx(loss_module, example)
    names = list(model.graph.initializers)
    lora = [n for n in names if _LORA_NAME.match(n)]
    if not lora:
        raise ExportError("the exported ONNX graph has no LoRA initializers (were the PEFT names lost?)")
    strip_metadata(model)
    fold_weight_transposes(model, set(names) - set(lora))
    gather_from_transposed(model)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True)  # generate_artifacts does not create it
    with shared.linked_into(out_dir) as local, contextlib.chdir(out_dir):
        shared.externalize(model, out_dir, skip=set(lora), location=local)
        proto = ir.serde.serialize_model(model)
        del model
        with _native_stderr_captured() as log:
            try:
                artifacts.generate_artifacts(proto, requires_grad=lora, frozen_params=None,
                                             optimizer=artifacts.OptimType.AdamW, artifact_directory=".")
            except Exception as exc:
                raise ExportError(f"ORT training artifacts failed: {str(exc).strip().splitlines()[0]} "
                                  f"({_last_line(log)})") from exc
    _finish_outputs(out_dir, shared, local, compiled_props(spec, tuple(example[0].shape)))
    return lora


def compiled_props(spec: LoraSpec, input_shape: tuple[int, ...]) -> dict[str, str]:
    """The graph metadata naming what the program computes with."""
    return {f"{META_PREFIX}r": str(spec.r), f"{META_PREFIX}lora_alpha": repr(float(spec.lora_alpha)),
            f"{META_PREFIX}use_rslora": str(bool(spec.use_rslora)).lower(),
            f"{META_PREFIX}target_modules": ",".join(sorted(spec.target_modules)),
            f"{META_PREFIX}input_shape": "x".join(str(d) for d in input_shape)}


def read_compiled(training_model: Path) -> Compiled:
    """What a training graph says it was compiled with (its metadata, written by :func:`compiled_props`)."""
    import onnx

    model = onnx.load(str(training_model), load_external_data=False)
    props = {p.key.removeprefix(META_PREFIX): p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}
    try:
        return Compiled(int(props["r"]), float(props["lora_alpha"]), props["use_rslora"] == "true",
                        tuple(t for t in props["target_modules"].split(",") if t),
                        tuple(int(d) for d in props["input_shape"].split("x")))
    except (KeyError, ValueError):
        raise PackageError(f"{training_model} does not say what it was compiled with (no lorafleet metadata); "
                           f"re-export the package") from None


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
def _native_stderr_captured() -> Iterator[Path]:
    """Send file descriptor 2 to a temporary file while the block runs (yields its path).

    ORT's training graph builder logs hundreds of INFO lines from C++ whatever the Python-side severity.
    """
    import os
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.NamedTemporaryFile(prefix="lorafleet-ort-", suffix=".log") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield Path(f.name)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][-200:] if lines else "no log"


def quiet_onnxruntime() -> None:
    """ORT logs a warning per unfoldable node while building graphs; keep errors only."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)


def _finish_outputs(out_dir: Path, shared: SharedExternalData, local: str, props: dict[str, str]) -> None:
    """Point the saved graphs at the shared file (anything ORT's builder inlined goes there too) and record
    ``props`` in their metadata."""
    import onnx

    for name in ("training_model.onnx", "eval_model.onnx"):
        path = out_dir / name
        model = onnx.load(str(path), load_external_data=False)
        shared.relocate(model, local, out_dir)
        shared.externalize_proto(model, out_dir)
        onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **props})
        onnx.save(model, str(path))


# --- runtime --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraNames:
    """ONNX parameter names of one module's factors."""

    lora_A: str
    lora_B: str


class OnnxTrainer:
    """An ONNX Runtime training session for one rank: AdamW steps on the LoRA tensors only.

    ``artifact_dir`` holds the four ORT artifacts (the package's ``onnx/rank-<r>``); ``spec`` gives the
    LoRA scaling compiled into them. Inputs are int64 ``(B, T)`` arrays (numpy or torch).
    """

    def __init__(self, artifact_dir: str | Path, spec: LoraSpec, *, lr: float = 1e-4,
                 input_shape: tuple[int, int] | None = None, with_eval: bool = False,
                 base_model: str | None = None):
        if not (lr > 0):
            raise ConfigError(f"lr must be positive, got {lr}")
        self.dir = Path(artifact_dir)
        missing = [f for f in ARTIFACT_FILES if not (self.dir / f).exists()]
        if missing:
            raise PackageError(f"{self.dir} lacks ORT training artifacts: {', '.join(missing)}")
        self.spec, self.lr, self.input_shape = spec, lr, input_shape
        self.with_eval, self.base_model = with_eval, base_model
        self._open()

    @classmethod
    def from_package(cls, pkg: Package, rank: int, *, lr: float = 1e-4, with_eval: bool = False) -> OnnxTrainer:
        """The rank's trainer, refused if its program disagrees with the manifest (:func:`check_compiled`)."""
        m = pkg.manifest
        directory = pkg.path_of(rank, "onnx_training")
        check_compiled(m, rank, "onnx_training", read_compiled(directory / "training_model.onnx"))
        spec = LoraSpec(rank, tuple(m.target_modules), m.lora_alpha, m.use_rslora)
        return cls(directory, spec, lr=lr, input_shape=(m.batch_size, m.seq_len), with_eval=with_eval,
                   base_model=m.model.spec)

    def _open(self) -> None:
        from onnxruntime.training.api import CheckpointState, Module, Optimizer

        quiet_onnxruntime()
        self._state = CheckpointState.load_checkpoint(str(self.dir / "checkpoint"))
        eval_model = str(self.dir / "eval_model.onnx") if self.with_eval else None
        self._module = Module(str(self.dir / "training_model.onnx"), self._state, eval_model)
        self._optimizer = Optimizer(str(self.dir / "optimizer_model.onnx"), self._module)
        self._optimizer.set_learning_rate(self.lr)
        self._stepped = False  # AdamW moments are still zero
        self.names = _lora_names(name for name, p in self._state.parameters if p.requires_grad)

    # -- training --
    def step(self, input_ids: Any, labels: Any) -> float:
        """Forward, backward and one AdamW step; returns the loss before the update."""
        self._module.train()
        loss = self._module(*self._inputs(input_ids, labels))
        self._optimizer.step()
        self._module.lazy_reset_grad()
        self._stepped = True
        return float(loss)

    def loss(self, input_ids: Any, labels: Any) -> float:
        """The loss without updating anything (the eval graph if loaded, else a discarded backward)."""
        if self.with_eval:
            self._module.eval()
            return float(self._module(*self._inputs(input_ids, labels)))
        self._module.train()
        loss = float(self._module(*self._inputs(input_ids, labels)))
        self._module.lazy_reset_grad()
        return loss

    def gradients(self, input_ids: Any, labels: Any) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Loss and the LoRA gradients ``{module: (dA (r, in), dB (out, r))}`` of one batch; no update."""
        self._module.train()
        loss = float(self._module(*self._inputs(input_ids, labels)))
        params = self._state.parameters
        grads = {m: (params[n.lora_A].grad.copy(), params[n.lora_B].grad.copy()) for m, n in self.names.items()}
        self._module.lazy_reset_grad()
        return loss, grads

    def set_learning_rate(self, lr: float) -> None:
        self.lr = lr
        self._optimizer.set_learning_rate(lr)

    # -- LoRA weights in and out --
    def set_lora(self, adapter: Adapter, *, reset_optimizer: bool = True) -> None:
        """Load ``adapter`` (truncated to this rank if larger, rescaled to the compiled scaling).

        ``reset_optimizer`` (the default, a new federated round) restarts AdamW: ORT keeps the moments in
        the checkpoint state, so the session is reopened from the packaged checkpoint first (if it stepped).
        """
        import numpy as np

        adapter = conform(adapter, self.spec, expected=set(self.names))
        if reset_optimizer and self._stepped:
            self._open()
        params = self._state.parameters
        for module, n in self.names.items():
            pair = adapter.modules[module]
            for which, name, value in (("lora_A", n.lora_A, pair.lora_A), ("lora_B", n.lora_B, pair.lora_B)):
                # .float(): numpy has no bfloat16, and a bf16 adapter trains like any other
                arr = np.ascontiguousarray(value.detach().cpu().float().numpy(), dtype=np.float32)
                if arr.shape != params[name].data.shape:
                    raise ConfigError(f"{module}.{which} has shape {arr.shape}, the program expects "
                                      f"{params[name].data.shape}")
                params[name].data = arr

    def get_lora(self) -> Adapter:
        """The current LoRA weights as a PEFT :class:`Adapter` (copies)."""
        import torch

        params = self._state.parameters
        mods = {m: LoraPair(torch.from_numpy(params[n.lora_A].data.copy()),
                            torch.from_numpy(params[n.lora_B].data.copy()), self.spec.scaling)
                for m, n in self.names.items()}
        cfg = peft_config(list(self.spec.target_modules), self.spec.r, self.spec.lora_alpha,
                          use_rslora=self.spec.use_rslora, base_model=self.base_model)
        return Adapter(mods, cfg)

    def _inputs(self, input_ids: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        ids = np.ascontiguousarray(np.asarray(input_ids), dtype=np.int64)
        lab = np.ascontiguousarray(np.asarray(labels), dtype=np.int64)
        want = self.input_shape
        for name, arr in (("input_ids", ids), ("labels", lab)):
            if arr.ndim != 2 or (want is not None and tuple(arr.shape) != tuple(want)):
                raise ConfigError(f"{name} must have shape {want or '(B, T)'}, got {tuple(arr.shape)}")
        return ids, lab


def _lora_names(names: Any) -> dict[str, LoraNames]:
    halves: dict[str, dict[str, str]] = {}
    for name in names:
        m = _LORA_NAME.match(name)
        if m is None:
            raise PackageError(f"trainable parameter {name!r} is not a LoRA tensor")
        halves.setdefault(m["module"], {})[m["which"]] = name
    incomplete = sorted(k for k, v in halves.items() if set(v) != {"A", "B"})
    if incomplete or not halves:
        raise PackageError(f"the ORT checkpoint lacks LoRA factor pairs ({incomplete[:3] or 'none found'})")
    return {k: LoraNames(v["A"], v["B"]) for k, v in sorted(halves.items())}


__all__ = ["ADAMW", "OnnxTrainer", "export_onnx_training"]
