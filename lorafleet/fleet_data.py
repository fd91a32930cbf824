"""Each emulated device's local training data: the built-in suite's seen families, or a user's JSONL.

Built-in: every device holds ``examples_per_device`` examples of the *seen* families in the proportions of
its own Dirichlet(α) mixture (:func:`lorafleet.partition.family_counts`); the examples are generated to
order, each family's ``"train"`` stream dealt out in device order, so no example is given twice.
JSONL: the file's examples carry no family, so they are split evenly at random (α plays no part).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from edge_client.data import Example, read_jsonl
from export.errors import ConfigError
from lorafleet import tasks
from lorafleet.partition import dirichlet_partition, family_counts


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
    examples = read_jsonl(path).examples
    parts = dirichlet_partition(np.zeros(len(examples), dtype=np.int64), num_devices, math.inf, seed=seed)
    return [[examples[j] for j in idx] for idx in parts]
