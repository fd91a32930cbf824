"""The reference backend: eager PyTorch + PEFT LoRA on the package's foundation model.

The base model comes from the manifest's model spec through :func:`lorafleet.export.compiler.models.load_model` (fp32,
eager attention, as the programs were exported), quantized as the manifest's ``quantize`` says (the compiler's
deterministic :func:`lorafleet.export.compiler.quantize.quantize_model`: the programs' bytes); the LoRA heads are
attached, read and loaded by the compiler's
own :mod:`lorafleet.export.compiler.lora` (one copy of PEFT's wrapping: the manifest's ``target_modules`` at the
rank with its ``lora_alpha``, no dropout). Loss and optimizer are the shared recipe of
:mod:`lorafleet.edge_client.backends.base`.

It runs on the CPU by default, or on a CUDA device (``device="cuda"`` / ``"cuda:N"``: a Jetson's GPU, or the
GPU share a fleet's simulation worker is given); batches are moved there, adapters come back on the CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorafleet.edge_client.backends.base import AdamW, OptimizerConfig, check_rank
from lorafleet.export.formats.adapter import Adapter
from lorafleet.export.formats.errors import ConfigError
from lorafleet.export.formats.program import LoraSpec
from lorafleet.export.formats.quantization import Quantization

if TYPE_CHECKING:
    import torch

    from lorafleet.edge_client.data import Batch
    from lorafleet.export.formats.package import Package


class TorchBackend:
    name = "torch"

    def __init__(self, model_spec: str, target_modules: list[str], rank: int, lora_alpha: float, *,
                 use_rslora: bool = False, optimizer: OptimizerConfig | None = None, seed: int = 0,
                 quantize: str = "none", device: str = "cpu"):
        from lorafleet.export.compiler.lora import attach_lora, lora_modules
        from lorafleet.export.compiler.models import load_model

        self.device = torch_device(device)
        self.rank, self.model_spec = rank, model_spec
        self.spec = LoraSpec(rank, tuple(sorted(target_modules)), float(lora_alpha), use_rslora)
        # a quantized base is the package's: the same bytes its programs compute with (streamed from the
        # checkpoint when the spec has one, so the fp32 model is never held whole)
        base = load_model(model_spec, attn_implementation="eager", with_tokenizer=False,
                          quantization=Quantization.parse(quantize)).model
        self.model = attach_lora(base, self.spec, seed=seed).to(self.device)
        self.model.train()
        layers = lora_modules(self.model)  # adapter module name -> PEFT LoRA layer
        self.params = [w for name in sorted(layers)
                       for w in (layers[name].lora_A["default"].weight, layers[name].lora_B["default"].weight)]
        self.optimizer = AdamW(self.params, optimizer or OptimizerConfig())

    @classmethod
    def from_package(cls, package: Package, rank: int, optimizer: OptimizerConfig, *,
                     device: str = "cpu") -> TorchBackend:
        m = package.manifest
        backend = cls(m.model.spec, m.target_modules, rank, m.lora_alpha, use_rslora=m.use_rslora,
                      optimizer=optimizer, quantize=m.quantize, device=device)
        backend.load_adapter(package.initial_adapter(rank))
        return backend

    def step(self, batch: Batch) -> float:
        """One forward/backward/AdamW step on ``batch``; returns the loss before the update."""
        import torch

        from lorafleet.export.compiler.quantize import recomputed_dequantization

        ids = torch.as_tensor(batch.input_ids, dtype=torch.long, device=self.device)  # (B, S)
        labels = torch.as_tensor(batch.labels, dtype=torch.long, device=self.device)  # (B, S), unshifted, -100 ignored
        with recomputed_dequantization():  # a quantized base: no dequantized weight kept for the backward
            loss = self.model(input_ids=ids, labels=labels, use_cache=False).loss
            grads = torch.autograd.grad(loss, self.params)
        self.optimizer.step(list(grads))
        return float(loss.detach())

    def adapter_state(self) -> Adapter:
        from lorafleet.export.compiler.lora import read_lora

        return read_lora(self.model, self.spec, base_model=self.model_spec)

    def load_adapter(self, adapter: Adapter, *, reset_optimizer: bool = True) -> None:
        """Load ``adapter`` (exactly this rank, exactly the targeted modules), rescaled to this spec (ΔW kept)."""
        from lorafleet.export.compiler.lora import load_lora

        check_rank(adapter, self.rank)
        load_lora(self.model, self.spec, adapter)
        if reset_optimizer:
            self.optimizer.reset()


def torch_device(spec: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a torch device this process can use; a one-line ConfigError
    otherwise (a CPU-only torch build, no GPU visible, an index past the last GPU)."""
    import torch

    text = str(spec).strip().lower()
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (kind == "cpu" and index) or (index and not index.isdigit()):
        raise ConfigError(f"device must be cpu, cuda or cuda:N, got {spec!r}")
    if kind == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible to this process"
        raise ConfigError(f"device {spec!r}: torch sees no CUDA device ({why}; torch {torch.__version__})")
    if index and int(index) >= count:
        raise ConfigError(f"device {spec!r}: torch sees {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device(text)
