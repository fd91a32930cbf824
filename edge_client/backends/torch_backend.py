"""The reference backend: eager PyTorch + PEFT LoRA on the package's foundation model.

The base model comes from the manifest's model spec through :func:`export.models.load_model` (fp32, eager
attention, as the programs were exported); PEFT wraps the manifest's ``target_modules`` at the rank with the
manifest's ``lora_alpha`` and no dropout. Loss and optimizer are the shared recipe of
:mod:`edge_client.backends.base`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge_client.backends.base import AdamW, OptimizerConfig, check_rank
from export.adapter import Adapter, LoraPair, peft_config, rescale, scaling_for
from export.errors import AdapterError

if TYPE_CHECKING:
    from edge_client.data import Batch
    from export.package import Package

PEFT_ROOT = "base_model.model."


class TorchBackend:
    name = "torch"

    def __init__(self, model_spec: str, target_modules: list[str], rank: int, lora_alpha: float, *,
                 use_rslora: bool = False, optimizer: OptimizerConfig | None = None, seed: int = 0):
        import torch
        from peft import LoraConfig, get_peft_model

        from export.models import load_model

        self.rank, self.lora_alpha, self.use_rslora = rank, float(lora_alpha), use_rslora
        self.model_spec, self.target_modules = model_spec, sorted(target_modules)
        base = load_model(model_spec, attn_implementation="eager", with_tokenizer=False).model
        # PEFT annotates lora_alpha as int but divides it as a number; packages may carry a float alpha
        config = LoraConfig(r=rank, lora_alpha=lora_alpha,  # type: ignore[arg-type]
                            target_modules=self.target_modules, lora_dropout=0.0, use_rslora=use_rslora,
                            bias="none", task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = get_peft_model(base, config)
        self.model.train()
        self.layers = _lora_layers(self.model)  # adapter module name -> (lora_A, lora_B) Linear
        self.params = [w for a, b in self.layers.values() for w in (a.weight, b.weight)]
        self.optimizer = AdamW(self.params, optimizer or OptimizerConfig())

    @classmethod
    def from_package(cls, package: Package, rank: int, optimizer: OptimizerConfig) -> TorchBackend:
        m = package.manifest
        backend = cls(m.model.spec, m.target_modules, rank, m.lora_alpha, use_rslora=m.use_rslora,
                      optimizer=optimizer)
        backend.load_adapter(package.initial_adapter(rank))
        return backend

    def step(self, batch: Batch) -> float:
        """One forward/backward/AdamW step on ``batch``; returns the loss before the update."""
        import torch

        ids = torch.as_tensor(batch.input_ids, dtype=torch.long)  # (B, S)
        labels = torch.as_tensor(batch.labels, dtype=torch.long)  # (B, S), unshifted, -100 ignored
        loss = self.model(input_ids=ids, labels=labels, use_cache=False).loss
        grads = torch.autograd.grad(loss, self.params)
        self.optimizer.step(list(grads))
        return float(loss.detach())

    def adapter_state(self) -> Adapter:
        scaling = scaling_for(self.rank, self.lora_alpha, self.use_rslora)
        modules = {name: LoraPair(a.weight.detach().clone(), b.weight.detach().clone(), scaling)
                   for name, (a, b) in self.layers.items()}
        cfg = peft_config(self.target_modules, self.rank, self.lora_alpha, use_rslora=self.use_rslora,
                          base_model=self.model_spec)
        return Adapter(modules, cfg)

    def load_adapter(self, adapter: Adapter, *, reset_optimizer: bool = True) -> None:
        import torch

        check_adapter_fits(adapter, self.rank, set(self.layers))
        adapter = rescale(adapter, self.lora_alpha, use_rslora=self.use_rslora)
        with torch.no_grad():
            for name, (a, b) in self.layers.items():
                pair = adapter.modules[name]
                a.weight.copy_(pair.lora_A)  # (r, in)
                b.weight.copy_(pair.lora_B)  # (out, r)
        if reset_optimizer:
            self.optimizer.reset()


def check_adapter_fits(adapter: Adapter, rank: int, modules: set[str]) -> None:
    """Raise :class:`AdapterError` unless ``adapter`` has exactly ``modules``, all at ``rank``."""
    check_rank(adapter, rank)
    if set(adapter.modules) != modules:
        missing = sorted(modules - set(adapter.modules))[:2]
        extra = sorted(set(adapter.modules) - modules)[:2]
        raise AdapterError(f"adapter modules do not match the program's LoRA modules (missing {missing}, "
                           f"unexpected {extra})")


def _lora_layers(model: Any) -> dict[str, tuple[Any, Any]]:
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            layers[name.removeprefix(PEFT_ROOT)] = (module.lora_A["default"], module.lora_B["default"])
    return layers
