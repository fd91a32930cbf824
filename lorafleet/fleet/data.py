"""Each emulated device's local training data: the built-in suite's seen families, or a user's JSONL.

Built-in: every device holds ``examples_per_device`` examples of the *seen* families in the proportions of
its own Dirichlet(α) mixture (:func:`lorafleet.fleet.partition.family_counts`); the examples are generated to
order, each family's ``"train"`` stream dealt out in device order, so no example is given twice.
JSONL: the file's examples carry no family, so they are split evenly at random (α plays no part).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lorafleet import tasks
from lorafleet.edge_client.data import Example, example_record, read_jsonl
from lorafleet.export.formats.errors import ConfigError
from lorafleet.fleet.partition import dirichlet_partition, family_counts


def builtin_device_data(num_devices: int, *, examples_per_device: int, alpha: float,
                        seed: int) -> list[list[Example]]:
    """Per device, ``examples_per_device`` examples of the seen families, non-IID by Dirichlet α."""
    if examples_per_device <= 0:
        raise ConfigError(f"examples_per_device must be positive, got {examples_per_device}")
    names = tasks.seen_families()
    counts = family_counts(num_devices, len(names), examples_per_device, alpha, seed=seed)  # (D, F)
    data: list[list[Example]] = [[] for _ in range(num_devices)]
    for f, name in enumerate(names):
        stream = iter(tasks.generate(name, int(counts[:, f].sum()), seed=seed, stream="train"))
        for d in np.flatnonzero(counts[:, f]):
            data[d] += [next(stream) for _ in range(int(counts[d, f]))]
    return data


def jsonl_device_data(path: str | Path, num_devices: int, *, seed: int) -> list[list[Example]]:
    """The examples of a JSONL file split evenly at random across devices (each gets at least one)."""
    return split_examples(read_jsonl(path).examples, num_devices, seed=seed)


def split_examples(examples: list[Example], num_devices: int, *, seed: int) -> list[list[Example]]:
    """``examples`` split evenly at random across devices (sizes differ by at most one)."""
    parts = dirichlet_partition(np.zeros(len(examples), dtype=np.int64), num_devices, math.inf, seed=seed)
    return [[examples[j] for j in idx] for idx in parts]


def jsonl_eval_split(path: str | Path, *, seed: int, fraction: float = 0.1,
                     limit: int = 64) -> tuple[list[Example], list[Example]]:
    """``(train, held back)``: a seeded ``fraction`` of a JSONL file's examples (at most ``limit``, at least
    one when the file has two or more) is kept out of training and scores the "seen" split."""
    examples = read_jsonl(path).examples
    k = min(limit, max(1 if len(examples) > 1 else 0, round(fraction * len(examples))))
    held = set(np.random.default_rng([seed, 0xE7A1]).choice(len(examples), size=k, replace=False).tolist())
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])


def write_device_data(data: list[list[Example]], out_dir: str | Path, path_of: Callable[[Path, int], Path]) -> None:
    """Every device's examples as a JSONL file (:func:`~lorafleet.edge_client.data.example_record`) under
    ``out_dir``."""
    import json

    from lorafleet.export.formats.atomic import atomic_write_text

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    for d, examples in enumerate(data):
        if not examples:
            raise ConfigError(f"device {d} has no training examples (more devices than examples?)")
        lines = [json.dumps(example_record(ex), ensure_ascii=False) for ex in examples]
        atomic_write_text(path_of(root, d), "\n".join(lines) + "\n")


def example_tokens(tokenizer: Any, example: Example) -> int:
    """Tokens of the whole chat-template rendering (prompt and response) of ``example``."""
    from lorafleet.edge_client.data import chat_messages

    full = str(tokenizer.apply_chat_template(chat_messages(example), tokenize=False))
    return len(tokenizer(full, add_special_tokens=False)["input_ids"])


def fitting_seq_len(tokenizer: Any, examples: Iterable[Example], *, multiple: int = 32, cap: int = 512) -> int:
    """The smallest multiple of ``multiple`` (at most ``cap``) that holds the longest of ``examples``."""
    longest = max((example_tokens(tokenizer, ex) for ex in examples), default=1)
    return min(cap, multiple * math.ceil(longest / multiple))
