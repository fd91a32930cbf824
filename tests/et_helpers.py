"""Fixtures for the ExecuTorch tests: tiny PEFT LoRA models, eager references, random adapters."""

from __future__ import annotations

from typing import Any

import torch

from lorafleet.export.formats.adapter import Adapter, LoraPair, peft_config, scaling_for

TARGETS = ["q_proj", "v_proj"]
SEQ_LEN = 12
BATCH = 2


def tiny_peft(r: int, *, lora_alpha: float = 8.0, random_b: bool = False, seed: int = 0) -> Any:
    """``random:tiny`` (eager attention) wrapped with PEFT LoRA on q,v. PEFT's default init has lora_B = 0;
    ``random_b`` makes both factors random so the LoRA path changes the logits."""
    from peft import LoraConfig, get_peft_model

    from lorafleet.export.compiler.models import load_model

    model = load_model("random:tiny", attn_implementation="eager", with_tokenizer=False).model
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=TARGETS, lora_dropout=0.0,
                     init_lora_weights=not random_b)
    peft = get_peft_model(model, cfg)
    if random_b:
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn_like(p) * 0.2)
    return peft.eval()


def batch(shape: tuple[int, int], seed: int = 1, vocab: int = 272) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``; labels are the ids with the first two positions ignored (-100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    return ids, labels


def random_adapter(peft_model: Any, r: int, lora_alpha: float, seed: int) -> Adapter:
    """An adapter with random factors for every LoRA module of ``peft_model`` at rank ``r``."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a = module.lora_A["default"].weight
            b = module.lora_B["default"].weight
            modules[name] = LoraPair(torch.randn((r, a.shape[1]), generator=g) * 0.3,
                                     torch.randn((b.shape[0], r), generator=g) * 0.3,
                                     scaling_for(r, lora_alpha))
    return Adapter(modules, peft_config(TARGETS, r, lora_alpha))


def load_into_peft(peft_model: Any, adapter: Adapter) -> None:
    """Set ``peft_model``'s factors to ``adapter``'s, expressed at the model's own scaling."""
    from lorafleet.export.formats.adapter import rescale

    cfg = peft_model.peft_config["default"]
    sd = rescale(adapter, cfg.lora_alpha).state_dict()
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, t in sd.items():
            params[key.replace(".lora_A.weight", ".lora_A.default.weight")
                   .replace(".lora_B.weight", ".lora_B.default.weight")].copy_(t)


def eager_grads(peft_model: Any, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """Eager transformers+PEFT loss (``labels=``) and LoRA gradients by PEFT key."""
    from lorafleet.export.formats.adapter import peft_key

    peft_model.zero_grad()
    loss = peft_model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {peft_key(n): p.grad.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.zero_grad()
    return float(loss), grads
