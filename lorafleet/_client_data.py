"""TEMPORARY shim for ``edge_client.data`` (the client branch), removed when that branch is merged.

It mirrors the names the client branch will provide — ``Example(instruction, input, output)``,
``chat_messages(example)`` and ``encode_example(tokenizer, example, seq_len)`` — so that lorafleet's task
suite and evaluation are written against them now. Everything in lorafleet imports these names from here
(one place to switch); nothing else formats prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One instruction example: the task, its input (may be empty) and the reference answer."""

    instruction: str
    input: str
    output: str


def chat_messages(example: Example) -> list[dict[str, str]]:
    """The conversation ``[user, assistant]`` the model is trained on (prompt = all but the last)."""
    user = f"{example.instruction}\n\n{example.input}" if example.input else example.instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": example.output}]


def encode_example(tokenizer: Any, example: Example, seq_len: int) -> dict[str, list[int]]:
    """Token ids of the whole conversation and labels with the prompt masked (``-100``), cut to ``seq_len``."""
    messages = chat_messages(example)
    prompt = _ids(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True))
    full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    labels = [IGNORE_INDEX] * len(prompt) + full[len(prompt):]
    return {"input_ids": full[:seq_len], "labels": labels[:seq_len]}


def _ids(encoded: Any) -> list[int]:
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return [int(i) for i in encoded]
