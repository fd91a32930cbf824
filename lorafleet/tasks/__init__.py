"""The built-in heterogeneous instruction-task suite, generated deterministically in code (no download).

48 small task families — arithmetic, unit conversion, string edits, spelling, counting, sorting, comparison,
list max/min, parity, lexicon classification, field extraction, capitals, antonyms and analogies, date
reasoning — each with short, checkable outputs. *Seen* families are partitioned across devices and trained
on; *held-out* families are only evaluated, as zero-shot generalization (FlexLoRA's protocol with
Natural-Instructions' unseen tasks, Bai et al., NeurIPS 2024).

>>> from lorafleet import tasks
>>> tasks.generate("add", 1, seed=0)[0].output.isdigit()
True
"""

from __future__ import annotations

from lorafleet.edge_client.data import Example
from lorafleet.tasks import knowledge, numeric, text  # noqa: F401  (importing registers the families)
from lorafleet.tasks.registry import (
    REGISTRY,
    SPLITS,
    Split,
    TaskFamily,
    families,
    family,
    generate,
    generate_by_family,
    task,
)

__all__ = [
    "REGISTRY", "SPLITS", "Split", "TaskFamily", "eval_sets", "families", "family", "generate",
    "generate_by_family", "heldout_families", "seen_families", "task",
]


def seen_families() -> list[str]:
    """Families trained on (partitioned across devices)."""
    return families("seen")


def heldout_families() -> list[str]:
    """Families never trained on, evaluated zero-shot."""
    return families("heldout")


def eval_sets(per_family: int, *, seed: int) -> dict[str, dict[str, list[Example]]]:
    """``{"seen": {family: examples}, "heldout": {...}}`` from the ``"eval"`` stream (disjoint draws)."""
    return {split: generate_by_family(families(split), per_family, seed=seed, stream="eval") for split in SPLITS}
