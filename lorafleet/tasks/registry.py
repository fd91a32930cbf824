"""The task-family registry: one small function per family, generated deterministically from a seed.

A family is a function ``make(rng) -> (input, output)`` registered with :func:`task`, which names it, gives
its fixed instruction, and puts it in the *seen* split (trained on) or the *held-out* split (only evaluated,
zero-shot — the role Natural-Instructions' unseen tasks play in FlexLoRA, Bai et al., NeurIPS 2024, §5).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from lorafleet.edge_client.data import Example
from lorafleet.export.formats.errors import ConfigError

Split = Literal["seen", "heldout"]
Maker = Callable[[random.Random], tuple[str, str]]
SPLITS: tuple[Split, ...] = ("seen", "heldout")
STREAMS = ("train", "eval")


@dataclass(frozen=True)
class TaskFamily:
    """A generator of instruction examples sharing one instruction."""

    name: str
    instruction: str
    split: Split
    kind: str  # a coarse theme ("arithmetic", "string edit", ...), for summaries
    make: Maker

    def example(self, rng: random.Random) -> Example:
        inp, out = self.make(rng)
        return Example(self.instruction, inp, out)


REGISTRY: dict[str, TaskFamily] = {}


def task(name: str, instruction: str, *, split: Split, kind: str) -> Callable[[Maker], Maker]:
    """Register ``make`` as the family ``name``."""
    if split not in SPLITS:
        raise ConfigError(f"task {name!r}: split must be one of {SPLITS}, got {split!r}")

    def register(make: Maker) -> Maker:
        if name in REGISTRY:
            raise ConfigError(f"task family {name!r} is registered twice")
        REGISTRY[name] = TaskFamily(name, instruction, split, kind, make)
        return make

    return register


def family(name: str) -> TaskFamily:
    """The registered family ``name``; :class:`ConfigError` naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown task family {name!r} (known: {', '.join(sorted(REGISTRY))})") from None


def families(split: Split | None = None) -> list[str]:
    """Names of the registered families (of one split), sorted."""
    return sorted(n for n, f in REGISTRY.items() if split is None or f.split == split)


def generate(name: str, n: int, *, seed: int, stream: str = "train") -> list[Example]:
    """``n`` examples of family ``name``: the same ``(name, seed, stream)`` always gives the same list.

    Streams are independent draws: train on ``"train"``, evaluate on ``"eval"``.
    """
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    if stream not in STREAMS:
        raise ConfigError(f"stream must be one of {STREAMS}, got {stream!r}")
    fam = family(name)
    rng = random.Random(f"lorafleet-tasks:{stream}:{seed}:{name}")  # str seeds hash with sha512: stable
    return [fam.example(rng) for _ in range(n)]


def generate_by_family(names: Iterable[str], n: int, *, seed: int, stream: str = "train") -> dict[str, list[Example]]:
    """``{family: n examples}`` for every family in ``names``."""
    return {name: generate(name, n, seed=seed, stream=stream) for name in names}
