"""ONNX Runtime training sessions over a package's artifacts: what devices and export's verification run.

:class:`OnnxTrainer`: ``step(input_ids, labels) -> loss`` (one AdamW step, HF AdamW mode: betas 0.9/0.999, eps
1e-6, no weight decay, bias correction), ``set_lora(adapter)`` to take the server's weights without re-export,
``get_lora() -> Adapter`` to send the trained weights back. :meth:`OnnxTrainer.from_package` refuses a program
that disagrees with its manifest (:func:`lorafleet.export.formats.program.check_compiled`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.export.formats.adapter import PEFT_PREFIX, Adapter, LoraPair, conform, parse_lora_key, peft_config
from lorafleet.export.formats.errors import ConfigError, PackageError
from lorafleet.export.formats.program import LoraSpec, StepResult, check_compiled, parse_onnx_props

if TYPE_CHECKING:
    import numpy as np

    from lorafleet.export.formats.package import Package

ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
ADAMW = {"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0}  # onnxblock.optim.AdamW defaults


def session_options() -> Any:
    """ORT session options of every lorafleet session: constant folding off, so a quantized base's
    dequantization runs in each step (from the stored bytes) instead of being folded into fp32 weights held in
    memory at load; an fp32 package has nothing it would fold (its weights are stored pre-transposed). The
    QDQ transformers off too: a quantized base dequantizes with ``DequantizeLinear`` nodes, and they would
    rewrite the float ops after them (e.g. re-quantize around a reshape or transpose)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return opts


def quiet_onnxruntime() -> None:
    """ORT logs a warning per unfoldable node while building graphs; keep errors only."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)



def read_compiled(training_model: Path) -> tuple[LoraSpec, tuple[int, ...]]:
    """What a training graph says it was compiled with (its metadata)."""
    import onnx

    model = onnx.load(str(training_model), load_external_data=False)
    return parse_onnx_props({p.key: p.value for p in model.metadata_props}, str(training_model))


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
        check_compiled(m, rank, "onnx_training", *read_compiled(directory / "training_model.onnx"))
        spec = LoraSpec(rank, tuple(m.target_modules), m.lora_alpha, m.use_rslora)
        return cls(directory, spec, lr=lr, input_shape=(m.batch_size, m.seq_len), with_eval=with_eval,
                   base_model=m.model.spec)

    def _open(self) -> None:
        from onnxruntime.training.api import CheckpointState, Module, Optimizer

        quiet_onnxruntime()
        self._state = CheckpointState.load_checkpoint(str(self.dir / "checkpoint"))
        eval_model = str(self.dir / "eval_model.onnx") if self.with_eval else None
        self._module = Module(str(self.dir / "training_model.onnx"), self._state, eval_model,
                              session_options=session_options())
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

    def gradients(self, input_ids: Any, labels: Any) -> StepResult:
        """Loss and the LoRA gradients (by PEFT key, numpy) of one batch; no update."""
        self._module.train()
        loss = float(self._module(*self._inputs(input_ids, labels)))
        params = self._state.parameters
        grads = {f"{PEFT_PREFIX}{m}.lora_{which}.weight": params[name].grad.copy()
                 for m, n in self.names.items() for which, name in (("A", n.lora_A), ("B", n.lora_B))}
        self._module.lazy_reset_grad()
        return StepResult(loss, grads)

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
        parsed = parse_lora_key(name)
        if parsed is None:
            raise PackageError(f"trainable parameter {name!r} is not a LoRA tensor")
        halves.setdefault(parsed[0], {})[parsed[1]] = name
    incomplete = sorted(k for k, v in halves.items() if set(v) != {"A", "B"})
    if incomplete or not halves:
        raise PackageError(f"the ORT checkpoint lacks LoRA factor pairs ({incomplete[:3] or 'none found'})")
    return {k: LoraNames(v["A"], v["B"]) for k, v in sorted(halves.items())}


__all__ = ["ADAMW", "OnnxTrainer", "read_compiled"]
