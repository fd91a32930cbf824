"""Greedy chat answers from a model spec (the demo, and smoke tests of the loader)."""

from __future__ import annotations

from typing import Any

from export.errors import ModelSpecError
from export.models import load_model


def answer(spec: str, prompt: str, *, max_new_tokens: int = 32) -> str:
    """Format ``prompt`` with the model's chat template and decode greedily."""
    loaded = load_model(spec)
    return generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=max_new_tokens)


def generate(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 32) -> str:
    import torch

    if tokenizer is None:
        raise ModelSpecError("this model has no tokenizer, so it cannot answer text prompts")
    enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    ids = enc["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=enc["attention_mask"], max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return str(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)).strip()
